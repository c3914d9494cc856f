"""Client of cloudlet-api: an openstacksdk service (`conn.cloudlet`, sdk/) and the
`openstack cloudlet ...` commands on it (osc/)."""
