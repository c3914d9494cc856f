from oslo_policy import policy

from cloudlet_api.policies import base

PREFIX = "cloudlet:base:%s"
LIST = PREFIX % "list"
SHOW = PREFIX % "show"
IMPORT = PREFIX % "import"
CREATE = PREFIX % "create"
DELETE = PREFIX % "delete"
EXPORT = PREFIX % "export"
CACHE_HOSTS = PREFIX % "cache_hosts"

_rules = [
    policy.DocumentedRuleDefault(
        name=LIST,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="List the base VMs visible to the project (its own and public ones).",
        operations=[{"method": "GET", "path": "/bases"}],
    ),
    policy.DocumentedRuleDefault(
        name=SHOW,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="Show one base VM.",
        operations=[{"method": "GET", "path": "/bases/{base_id}"}],
    ),
    policy.DocumentedRuleDefault(
        name=CACHE_HOSTS,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="See which compute hosts hold a base VM in their cache (the `cached_on` "
        "field of a base; absent without this rule). Host names are operator information: "
        "edge users pick the cloudlet that already caches their base, so project readers may "
        "by default; an operator who keeps host names private restricts this rule (e.g. to "
        "role:admin).",
        operations=[
            {"method": "GET", "path": "/bases"},
            {"method": "GET", "path": "/bases/{base_id}"},
        ],
    ),
    policy.DocumentedRuleDefault(
        name=EXPORT,
        check_str=base.ADMIN_OR_PROJECT_READER,
        scope_types=base.SCOPE,
        description="Download a base VM as a package (.cbase) another cloudlet can import.",
        operations=[{"method": "GET", "path": "/bases/{base_id}/package"}],
    ),
    policy.DocumentedRuleDefault(
        name=IMPORT,
        check_str=base.ADMIN_OR_PROJECT_MEMBER,
        scope_types=base.SCOPE,
        description="Import a base-VM package (.cbase), uploaded or fetched from an allowed "
        "URL, into the project's images.",
        operations=[{"method": "POST", "path": "/bases/import"}],
    ),
    policy.DocumentedRuleDefault(
        name=CREATE,
        check_str=base.ADMIN_OR_PROJECT_MEMBER,
        scope_types=base.SCOPE,
        description="Create a base VM from one of the project's running servers.",
        operations=[{"method": "POST", "path": "/bases"}],
    ),
    policy.DocumentedRuleDefault(
        name=DELETE,
        check_str=base.ADMIN_OR_PROJECT_MANAGER,
        scope_types=base.SCOPE,
        description="Delete a base VM (its disk and memory images). Every overlay made over it "
        "becomes unusable, hence a manager's operation by default.",
        operations=[{"method": "DELETE", "path": "/bases/{base_id}"}],
    ),
]


def list_rules() -> list[policy.RuleDefault]:
    return _rules
