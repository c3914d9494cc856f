from oslo_policy import policy

from cloudlet_api.policies import base

PREFIX = "cloudlet:task:%s"
LIST = PREFIX % "list"
SHOW = PREFIX % "show"

_rules = [
    policy.DocumentedRuleDefault(
        name=LIST,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="List the project's tasks (imports, captures, base creations, syntheses).",
        operations=[{"method": "GET", "path": "/tasks"}],
    ),
    policy.DocumentedRuleDefault(
        name=SHOW,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="Show one task: its stage and progress, and its result once done.",
        operations=[{"method": "GET", "path": "/tasks/{task_id}"}],
    ),
]


def list_rules() -> list[policy.RuleDefault]:
    return _rules
