"""openstacksdk support for service type `cloudlet`.

import openstack
from cloudletclient.sdk import register
conn = register(openstack.connect(cloud="mycloud"))
for overlay in conn.cloudlet.overlays():
    print(overlay.name, overlay.base_id)
"""

from __future__ import annotations

from typing import Any

from openstack import service_description

from cloudletclient.sdk import proxy

SERVICE_TYPE = "cloudlet"


class CloudletService(service_description.ServiceDescription):
    supported_versions = {"1": proxy.Proxy}


def register(conn: Any) -> Any:
    """Attach `conn.cloudlet` to an openstack.connection.Connection (returns it).

    Every connection is registered, even when an earlier one already put the `cloudlet`
    attribute on the Connection class: the service is enabled in each connection's own config
    (a second connection of one process, e.g. the dashboard's one per request, was refused
    with ServiceDisabledException). A proxy the connection already made is kept."""
    conn.add_service(CloudletService(service_type=SERVICE_TYPE))
    return conn
