"""Project -> Cloudlet -> Overlays."""

PANEL = "cloudlet_overlays"
PANEL_DASHBOARD = "project"
PANEL_GROUP = "cloudlet"
ADD_PANEL = "cloudlet_dashboard.content.overlays.panel.Overlays"
