"""The policy enforcer: defaults from cloudlet_api.policies, overrides from [oslo_policy]
policy_file. oslo.policy 6 always enforces scope and the new defaults: a rule whose scope_types
do not include the token's scope is refused (InvalidScope)."""

from __future__ import annotations

from typing import Any

from oslo_config import cfg
from oslo_policy import opts as policy_opts
from oslo_policy import policy

from cloudlet_api import errors, policies

POLICY_FILE = "policy.yaml"


def make_enforcer(conf: cfg.ConfigOpts) -> policy.Enforcer:
    policy_opts.set_defaults(conf, policy_file=POLICY_FILE)
    enforcer = policy.Enforcer(conf)
    enforcer.register_defaults(policies.list_rules())
    enforcer.load_rules()
    return enforcer


def get_enforcer() -> policy.Enforcer:
    """The `oslo.policy.enforcer` entry point (oslopolicy-policy-generator, -checker)."""
    conf = cfg.ConfigOpts()
    conf([], project="cloudlet")
    return make_enforcer(conf)


def authorize(enforcer: policy.Enforcer, rule: str, context: Any, target: dict[str, Any]) -> None:
    """Raise errors.Forbidden unless `context` may do `rule` on `target`."""
    try:
        enforcer.authorize(rule, target, context, do_raise=True)
    except policy.InvalidScope:
        raise errors.Forbidden(
            f"policy does not allow {rule} with a token of this scope: use a project-scoped token"
        ) from None
    except policy.PolicyNotAuthorized:
        raise errors.Forbidden(f"policy does not allow {rule} to be performed") from None
