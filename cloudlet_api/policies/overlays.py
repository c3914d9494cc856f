from oslo_policy import policy

from cloudlet_api.policies import base

PREFIX = "cloudlet:overlay:%s"
LIST = PREFIX % "list"
SHOW = PREFIX % "show"
DOWNLOAD = PREFIX % "download"
CREATE = PREFIX % "create"
DELETE = PREFIX % "delete"

_rules = [
    policy.DocumentedRuleDefault(
        name=LIST,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="List the overlays visible to the project.",
        operations=[{"method": "GET", "path": "/overlays"}],
    ),
    policy.DocumentedRuleDefault(
        name=SHOW,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="Show one overlay.",
        operations=[{"method": "GET", "path": "/overlays/{overlay_id}"}],
    ),
    policy.DocumentedRuleDefault(
        name=DOWNLOAD,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="Download an overlay file.",
        operations=[{"method": "GET", "path": "/overlays/{overlay_id}/file"}],
    ),
    policy.DocumentedRuleDefault(
        name=CREATE,
        check_str=base.ADMIN_OR_PROJECT_MEMBER,
        scope_types=base.SCOPE,
        description="Capture an overlay of one of the project's running servers.",
        operations=[{"method": "POST", "path": "/overlays"}],
    ),
    policy.DocumentedRuleDefault(
        name=DELETE,
        check_str=base.ADMIN_OR_PROJECT_MEMBER,
        scope_types=base.SCOPE,
        description="Delete an overlay.",
        operations=[{"method": "DELETE", "path": "/overlays/{overlay_id}"}],
    ),
]


def list_rules() -> list[policy.RuleDefault]:
    return _rules
