"""Every policy rule of cloudlet-api, one module per resource (the `oslo.policy.policies` entry
point; etc/cloudlet-api.policy.yaml.sample is generated from it)."""

from __future__ import annotations

import itertools

from oslo_policy import policy

from cloudlet_api.policies import bases, overlays, syntheses, tasks


def list_rules() -> list[policy.RuleDefault]:
    return list(
        itertools.chain(
            bases.list_rules(), overlays.list_rules(), syntheses.list_rules(), tasks.list_rules()
        )
    )
