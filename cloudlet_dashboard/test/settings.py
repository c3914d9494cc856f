"""Django settings for the dashboard's unit tests: Horizon's test settings with the panels
enabled from cloudlet_dashboard/enabled, as a site's openstack_dashboard/local/enabled has them."""

import openstack_dashboard.enabled
from horizon.test.settings import *  # noqa: F403
from openstack_dashboard.test.settings import *  # noqa: F403
from openstack_dashboard.utils import settings as settings_utils

from cloudlet_dashboard import enabled
from cloudlet_dashboard.policy import add_to_settings

HORIZON_CONFIG.pop("dashboards", None)  # noqa: F405
HORIZON_CONFIG.pop("default_dashboard", None)  # noqa: F405
settings_utils.update_dashboards(
    [enabled, openstack_dashboard.enabled],
    HORIZON_CONFIG,  # noqa: F405
    INSTALLED_APPS,  # noqa: F405
)
INSTALLED_APPS = list(dict.fromkeys(INSTALLED_APPS))  # noqa: F405

DEFAULT_POLICY_FILES = dict(DEFAULT_POLICY_FILES)  # noqa: F405
add_to_settings(POLICY_FILES, DEFAULT_POLICY_FILES)  # noqa: F405
