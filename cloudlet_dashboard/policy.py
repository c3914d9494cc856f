"""The service's policy in the dashboard: Horizon's own policy engine (openstack_auth.policy)
with the defaults of cloudlet-api's rules, which conf/default_policies/cloudlet.yaml holds as
Horizon's `dump_default_policies --namespace cloudlet_api` writes them (a test fails when it
is stale), and the site's overrides in POLICY_FILES_PATH/cloudlet_policy.yaml if it has one."""

from __future__ import annotations

from pathlib import Path

SERVICE = "cloudlet"
DEFAULTS = Path(__file__).parent / "conf" / "default_policies" / "cloudlet.yaml"
OVERRIDES = "cloudlet_policy.yaml"


def add_to_settings(policy_files: dict[str, str], default_policy_files: dict[str, str]) -> None:
    """Register the `cloudlet` scope in Horizon's POLICY_FILES / DEFAULT_POLICY_FILES (an
    absolute path: Horizon joins it to POLICY_FILES_PATH, which keeps it as it is)."""
    policy_files.setdefault(SERVICE, OVERRIDES)
    default_policy_files[SERVICE] = str(DEFAULTS)
