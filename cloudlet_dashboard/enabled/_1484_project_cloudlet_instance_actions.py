"""The Instances panel's row menu gains "Create overlay" and "Create base VM" (for servers
booted from cloudlet images), through Horizon's customization module hook. Horizon takes one
customization module: if the site already names one, import cloudlet_dashboard.overrides
from it instead of enabling this file."""

FEATURE = "cloudlet_instance_actions"
UPDATE_HORIZON_CONFIG = {"customization_module": "cloudlet_dashboard.overrides"}
