"""Horizon customization module: the Instances table's row actions for cloudlet.

Imported once by Horizon at start (HORIZON_CONFIG["customization_module"]); it appends two
row actions to the Instances table, as Horizon's documentation describes for such modules.
"""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from django.utils.http import urlencode
from django.utils.translation import gettext_lazy as _
from horizon import tables
from openstack_dashboard import api
from openstack_dashboard.dashboards.project.instances import tables as instance_tables

# Glance's cloudlet_type of the images a server can be booted from (docs/nova.md)
CLOUDLET_BOOT_TYPES = ("base-disk", "overlay")


def cloudlet_type(request: Any, instance: Any) -> str | None:
    """The cloudlet_type of the image the server was booted from, or None. The Instances
    view puts Glance's image on the row; a row updated alone has only the image's id."""
    image = getattr(instance, "image", None)
    if isinstance(image, dict):
        if not image.get("id"):
            return None
        try:
            image = api.glance.image_get(request, image["id"])
        except Exception:
            return None  # an image the user cannot see: no cloudlet action offered
    properties = getattr(image, "properties", None) or {}
    return properties.get("cloudlet_type")


class CloudletInstanceAction(tables.LinkAction):
    classes = ("ajax-modal",)
    view: str

    def allowed(self, request: Any, instance: Any = None) -> bool:
        return (
            instance is not None
            and instance.status == "ACTIVE"
            and cloudlet_type(request, instance) in CLOUDLET_BOOT_TYPES
        )

    def get_link_url(self, datum: Any) -> str:
        return f"{reverse(self.view)}?{urlencode({'instance_id': datum.id})}"


class CreateOverlay(CloudletInstanceAction):
    name = "create_overlay"
    verbose_name = _("Create Overlay")
    view = "horizon:project:cloudlet_overlays:create"
    policy_rules = (("cloudlet", "cloudlet:overlay:create"),)


class CreateBaseVM(CloudletInstanceAction):
    name = "create_base"
    verbose_name = _("Create Base VM")
    view = "horizon:project:cloudlet_bases:create"
    policy_rules = (("cloudlet", "cloudlet:base:create"),)


def add_instance_actions(table: type[tables.DataTable]) -> None:
    """Append the actions to the table's row menu (once)."""
    present = {action.name for action in table._meta.row_actions}
    added = tuple(a for a in (CreateOverlay, CreateBaseVM) if a.name not in present)
    table._meta.row_actions = tuple(table._meta.row_actions) + added
    table.base_actions.update({a.name: a() for a in added})


add_instance_actions(instance_tables.InstancesTable)
