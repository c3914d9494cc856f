# Horizon settings snippet: copy into openstack_dashboard/local/local_settings.d/ beside the
# enabled files. Horizon exec()s it inside its settings module, where these names exist.
from cloudlet_dashboard.policy import add_to_settings

add_to_settings(POLICY_FILES, DEFAULT_POLICY_FILES)  # noqa: F821
