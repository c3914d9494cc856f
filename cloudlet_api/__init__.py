"""cloudlet-api: the REST service for base VMs, overlays, syntheses and tasks (service type
`cloudlet`), a thin adapter over Glance, Nova and the compute hosts' cloudlet RPC endpoint."""
