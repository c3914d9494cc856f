"""Project -> Cloudlet -> Bases."""

PANEL = "cloudlet_bases"
PANEL_DASHBOARD = "project"
PANEL_GROUP = "cloudlet"
ADD_PANEL = "cloudlet_dashboard.content.bases.panel.Bases"
