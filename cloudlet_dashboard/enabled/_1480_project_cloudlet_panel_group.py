"""Project -> Cloudlet: the panel group (Horizon's enabled-file convention)."""

from openstack_dashboard import exceptions

PANEL_GROUP = "cloudlet"
PANEL_GROUP_NAME = "Cloudlet"
PANEL_GROUP_DASHBOARD = "project"

ADD_INSTALLED_APPS = ["cloudlet_dashboard"]
ADD_JS_FILES = ["cloudlet/js/cloudlet.upload.js", "cloudlet/js/cloudlet.refresh.js"]
ADD_EXCEPTIONS = {
    "recoverable": exceptions.RECOVERABLE,
    "not_found": exceptions.NOT_FOUND,
    "unauthorized": exceptions.UNAUTHORIZED,
}
AUTO_DISCOVER_STATIC_FILES = False
