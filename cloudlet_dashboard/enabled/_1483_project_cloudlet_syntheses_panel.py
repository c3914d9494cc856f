"""Project -> Cloudlet -> Syntheses."""

PANEL = "cloudlet_syntheses"
PANEL_DASHBOARD = "project"
PANEL_GROUP = "cloudlet"
ADD_PANEL = "cloudlet_dashboard.content.syntheses.panel.Syntheses"
