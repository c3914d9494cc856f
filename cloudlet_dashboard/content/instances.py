"""Servers and flavors as the cloudlet forms offer them (through Horizon's own Nova and Neutron
API wrappers, with the user's token)."""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from horizon import exceptions
from openstack_dashboard import api
from openstack_dashboard.api import _nova

# Nova's special network values, beside the project's networks
AUTO_NETWORK = "auto"
NO_NETWORK = "none"
# how Horizon's api.nova.server_create spells Nova's automatic allocation
HORIZON_AUTO_ALLOCATE = "__auto_allocate__"


def active_server_choices(request: Any) -> list[tuple[str, str]]:
    try:
        servers, _more = api.nova.server_list(request)
    except Exception:
        exceptions.handle(request, _("Unable to retrieve instances."))
        return []
    return [(s.id, s.name or s.id) for s in servers if s.status == "ACTIVE"]


def flavor_choices(request: Any) -> list[tuple[str, str]]:
    try:
        flavors = sorted(api.nova.flavor_list(request), key=lambda f: (f.ram, f.vcpus, f.name))
    except Exception:
        exceptions.handle(request, _("Unable to retrieve flavors."))
        return []
    return [(f.id, f"{f.name} ({f.vcpus} VCPU, {f.ram} MB RAM)") for f in flavors]


def smallest_flavor_for(request: Any, ram_mb: int | None) -> str | None:
    """The id of the smallest flavor with at least `ram_mb` of RAM (a base resumes with the
    memory it was saved with)."""
    try:
        flavors = api.nova.flavor_list(request)
    except Exception:
        return None
    fitting = sorted(
        (f for f in flavors if f.ram >= (ram_mb or 0)), key=lambda f: (f.ram, f.vcpus, f.name)
    )
    return fitting[0].id if fitting else None


def network_choices(request: Any) -> list[tuple[str, str]]:
    choices = [
        (AUTO_NETWORK, _("Automatic (Nova allocates one)")),
        (NO_NETWORK, _("No network")),
    ]
    try:
        networks = api.neutron.network_list_for_tenant(request, request.user.project_id)
    except Exception:
        exceptions.handle(request, _("Unable to retrieve networks."))
        return choices
    return [(n.id, n.name_or_id) for n in networks] + choices


def launch(request: Any, name: str, image_id: str, flavor_id: str, network: str) -> Any:
    """Boot `image_id` with Nova as the user. `network`: a network id, AUTO_NETWORK or
    NO_NETWORK. Horizon's server_create takes a list of NICs only, so a server without a
    network is created through Horizon's novaclient at the microversion that knows "none"."""
    if network == NO_NETWORK:
        version = api.nova.get_microversion(request, "auto_allocated_network")
        client = _nova.novaclient(request, version=version)
        return client.servers.create(name, image_id, flavor_id, nics=NO_NETWORK)
    net_id = HORIZON_AUTO_ALLOCATE if network == AUTO_NETWORK else network
    return api.nova.server_create(
        request,
        name,
        image_id,
        flavor_id,
        key_name=None,
        user_data=None,
        security_groups=None,
        nics=[{"net-id": net_id}],
    )
