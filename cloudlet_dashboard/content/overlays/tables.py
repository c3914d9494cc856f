from __future__ import annotations

from typing import Any

from django.template.defaultfilters import filesizeformat, title
from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext_lazy
from horizon import tables
from horizon.utils import filters

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.content import common, tasks

OVERLAY_TASK_KINDS = ("capture-overlay",)


class CreateOverlay(tables.LinkAction):
    name = "create"
    verbose_name = _("Create from Instance")
    url = "horizon:project:cloudlet_overlays:create"
    classes = ("ajax-modal",)
    icon = "camera"
    policy_rules = (("cloudlet", "cloudlet:overlay:create"),)


class Synthesize(tables.LinkAction):
    name = "synthesize"
    verbose_name = _("Synthesize")
    url = "horizon:project:cloudlet_overlays:synthesize"
    classes = ("ajax-modal", "btn-launch")
    icon = "cloud-upload"
    policy_rules = (("cloudlet", "cloudlet:synthesis:create"),)

    def allowed(self, request: Any, datum: Any = None) -> bool:
        return datum is not None and tasks.is_result(datum) and datum.status == "active"


class DownloadOverlay(tables.LinkAction):
    name = "download"
    verbose_name = _("Download")
    url = "horizon:project:cloudlet_overlays:download"
    icon = "download"
    policy_rules = (("cloudlet", "cloudlet:overlay:download"),)

    def allowed(self, request: Any, datum: Any = None) -> bool:
        return datum is not None and tasks.is_result(datum) and datum.status == "active"


class DeleteOverlay(tables.DeleteAction):
    name = "delete"
    policy_rules = (("cloudlet", "cloudlet:overlay:delete"),)

    @staticmethod
    def action_present(count: int) -> str:
        return ngettext_lazy("Delete Overlay", "Delete Overlays", count)

    @staticmethod
    def action_past(count: int) -> str:
        return ngettext_lazy("Deleted Overlay", "Deleted Overlays", count)

    def allowed(self, request: Any, datum: Any = None) -> bool:
        return datum is None or tasks.is_result(datum)

    def delete(self, request: Any, obj_id: str) -> None:
        try:
            cloudlet.overlay_delete(request, obj_id)
        except cloudlet.CloudletError as e:
            name = self.table.get_object_display(self.table.get_object_by_id(obj_id))
            common.refused(request, _("Unable to delete overlay %s") % name, e)


class UpdateRow(tables.Row):
    ajax = True

    def get_data(self, request: Any, row_id: str) -> Any:
        """An overlay; a capture task until it made its overlay (then the overlay's row)."""
        if not tasks.is_task_row(row_id):
            return with_summary(request, cloudlet.overlay_get(request, row_id))
        task = cloudlet.task_get(request, tasks.task_id_of(row_id))
        made = (task.images or {}).get("overlay")
        if task.state == "succeeded" and made:
            return with_summary(request, cloudlet.overlay_get(request, made))
        return tasks.TaskRow(task)


def with_summary(request: Any, overlay: Any) -> OverlayRow:
    """The overlay's row, with its file's summary if the file is there to read."""
    if overlay.status != "active":
        return OverlayRow(overlay, None)
    try:
        return OverlayRow(overlay, cloudlet.overlay_summary(request, overlay.id))
    except cloudlet.CloudletError as e:
        return OverlayRow(overlay, None, _("unreadable: %s") % e)


class OverlayRow:
    """An overlay with what its file holds (`summary`: OverlayReader.summary(), None when the
    file could not be read; the reason is in `summary_error`)."""

    is_task = False

    def __init__(self, overlay: Any, summary: dict[str, Any] | None, error: str | None = None):
        self.overlay, self.summary, self.summary_error = overlay, summary, error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.overlay, name)


def image_bytes(target: str):  # noqa: ANN201 - a column's value function
    def value(datum: Any) -> str:
        summary = getattr(datum, "summary", None)
        return filesizeformat(summary["images"][target]["size"]) if summary else "-"

    value.__name__ = f"{target}_bytes"
    return value


def chunk_kinds(datum: Any) -> str:
    """Modified chunks by kind, largest first, e.g. "NEW 1200, ZERO 40"."""
    summary = getattr(datum, "summary", None)
    if not summary:
        return getattr(datum, "summary_error", None) or "-"
    counts = sorted(
        ((n, k) for k, n in summary["chunks"].items() if n), key=lambda c: (-c[0], c[1])
    )
    return ", ".join(f"{k} {n}" for n, k in counts) or _("none")


def access_ordered(datum: Any) -> str:
    summary = getattr(datum, "summary", None)
    if not summary:
        return "-"
    return _("Yes") if "access_order" in (summary.get("meta") or {}) else _("No")


def file_size(datum: Any) -> str:
    return filesizeformat(datum.size) if tasks.is_result(datum) and datum.size else "-"


def activity(datum: Any) -> str:
    return datum.activity if not tasks.is_result(datum) else "-"


def detail_link(datum: Any) -> str | None:
    if not tasks.is_result(datum):
        return None
    return reverse("horizon:project:cloudlet_overlays:detail", args=[datum.id])


def base_link(datum: Any) -> str | None:
    disk = getattr(datum, "base_disk_image_id", None)
    return reverse("horizon:project:cloudlet_bases:detail", args=[disk]) if disk else None


class OverlaysTable(tables.DataTable):
    name = tables.WrappingColumn("name", verbose_name=_("Name"), link=detail_link)
    base = tables.Column(
        "base_id",
        verbose_name=_("Base"),
        truncate=16,
        link=base_link,
        attrs={"class": "cloudlet-base-id"},
    )
    size = tables.Column(file_size, verbose_name=_("Size"), attrs={"data-type": "size"})
    disk = tables.Column(image_bytes("disk"), verbose_name=_("Disk"))
    memory = tables.Column(image_bytes("memory"), verbose_name=_("Memory"))
    chunks = tables.WrappingColumn(chunk_kinds, verbose_name=_("Chunks by kind"))
    access_ordered = tables.Column(access_ordered, verbose_name=_("Access-ordered"))
    visibility = tables.Column("visibility", verbose_name=_("Visibility"), filters=(title,))
    status = tables.Column(
        "status",
        verbose_name=_("Status"),
        status=True,
        status_choices=tasks.ROW_STATUS_CHOICES,
        filters=(title, filters.replace_underscores),
    )
    task = tables.WrappingColumn(activity, verbose_name=_("Task"))
    created = tables.Column(
        "created_at",
        verbose_name=_("Created"),
        filters=(filters.parse_isotime, filters.timesince_sortable),
        attrs={"data-type": "timesince"},
    )

    class Meta:
        name = "overlays"
        verbose_name = _("Overlays")
        status_columns = ["status"]
        row_class = UpdateRow
        table_actions = (CreateOverlay, DeleteOverlay)
        row_actions = (Synthesize, DownloadOverlay, DeleteOverlay)
