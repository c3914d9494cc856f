"""Project -> Cloudlet: the panel group (Horizon's enabled-file convention), the plugin's app
(templates, static files) and its scripts: the upload progress bar, the live synthesis page."""

PANEL_GROUP = "cloudlet"
PANEL_GROUP_NAME = "Cloudlet"
PANEL_GROUP_DASHBOARD = "project"

ADD_INSTALLED_APPS = ["cloudlet_dashboard"]
ADD_JS_FILES = ["cloudlet/js/cloudlet.upload.js", "cloudlet/js/cloudlet.refresh.js"]
