from __future__ import annotations

from typing import Any

from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from horizon import tables
from horizon.utils import filters

from cloudlet_dashboard.api import cloudlet

STATE_CHOICES = (("succeeded", True), ("failed", False))  # "running": the row keeps updating
STATE_DISPLAY = (("succeeded", _("Active")), ("failed", _("Error")), ("running", _("Running")))


class UpdateRow(tables.Row):
    ajax = True

    def get_data(self, request: Any, synthesis_id: str) -> Any:
        return cloudlet.synthesis_get(request, synthesis_id)


def activity(synthesis: Any) -> str:
    """The stage and progress while it runs, the service's message if it failed."""
    if synthesis.state == "failed":
        return synthesis.error or _("failed, no reason given")
    if synthesis.state == "succeeded":
        return "-"
    return f"{synthesis.stage or _('scheduling')} ({round((synthesis.progress or 0) * 100)}%)"


def overlay_link(synthesis: Any) -> str | None:
    if not synthesis.overlay_id:
        return None
    return reverse("horizon:project:cloudlet_overlays:detail", args=[synthesis.overlay_id])


class SynthesesTable(tables.DataTable):
    name = tables.WrappingColumn(
        "name", verbose_name=_("Instance"), link="horizon:project:cloudlet_syntheses:detail"
    )
    overlay = tables.Column("overlay_id", verbose_name=_("Overlay"), link=overlay_link, truncate=12)
    status = tables.Column(
        "state",
        verbose_name=_("Status"),
        status=True,
        status_choices=STATE_CHOICES,
        display_choices=STATE_DISPLAY,
    )
    task = tables.WrappingColumn(activity, verbose_name=_("Stage"))
    created = tables.Column(
        "created_at",
        verbose_name=_("Started"),
        filters=(filters.parse_isotime, filters.timesince_sortable),
        attrs={"data-type": "timesince"},
    )

    class Meta:
        name = "syntheses"
        verbose_name = _("Syntheses")
        status_columns = ["status"]
        row_class = UpdateRow
        table_actions = ()
        row_actions = ()
        multi_select = False
