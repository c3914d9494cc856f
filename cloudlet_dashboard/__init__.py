"""cloudlet in the OpenStack dashboard: a Horizon plugin (Project -> Cloudlet)."""
