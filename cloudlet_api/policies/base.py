"""The standard personas the defaults are written on (Keystone's default roles, project scope).

Keystone expands implied roles into the token (admin implies manager implies member implies
reader), so `role:reader` also matches members, managers and admins of the project.
"""

PROJECT_READER = "role:reader and project_id:%(project_id)s"
PROJECT_MEMBER = "role:member and project_id:%(project_id)s"
PROJECT_MANAGER = "role:manager and project_id:%(project_id)s"
ADMIN = "role:admin"

ADMIN_OR_PROJECT_READER = f"({ADMIN}) or ({PROJECT_READER})"
ADMIN_OR_PROJECT_MEMBER = f"({ADMIN}) or ({PROJECT_MEMBER})"
ADMIN_OR_PROJECT_MANAGER = f"({ADMIN}) or ({PROJECT_MANAGER})"

SCOPE = ["project"]
