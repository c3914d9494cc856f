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
    """Attach `conn.cloudlet` to an openstack.connection.Connection (returns it). Done for every
    connection: add_service puts the attribute on the Connection class, but enables the service
    only in this connection's config (a second connection that skipped it gets
    ServiceDisabledException)."""
    conn.add_service(CloudletService(service_type=SERVICE_TYPE))
    return conn
