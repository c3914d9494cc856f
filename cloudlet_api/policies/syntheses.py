from oslo_policy import policy

from cloudlet_api.policies import base

PREFIX = "cloudlet:synthesis:%s"
LIST = PREFIX % "list"
SHOW = PREFIX % "show"
CREATE = PREFIX % "create"

_rules = [
    policy.DocumentedRuleDefault(
        name=LIST,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="List the project's syntheses.",
        operations=[{"method": "GET", "path": "/syntheses"}],
    ),
    policy.DocumentedRuleDefault(
        name=SHOW,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="Show one synthesis and its server's state.",
        operations=[{"method": "GET", "path": "/syntheses/{synthesis_id}"}],
    ),
    policy.DocumentedRuleDefault(
        name=CREATE,
        check_str=base.ADMIN_OR_PROJECT_MEMBER,
        scope_types=base.SCOPE,
        description="Synthesize a server from an overlay (a Nova server create).",
        operations=[{"method": "POST", "path": "/syntheses"}],
    ),
]


def list_rules() -> list[policy.RuleDefault]:
    return _rules
