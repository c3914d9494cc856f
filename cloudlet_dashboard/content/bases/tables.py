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

BASE_TASK_KINDS = ("import-base", "create-base")


class ImportBase(tables.LinkAction):
    name = "import"
    verbose_name = _("Import Package")
    url = "horizon:project:cloudlet_bases:import"
    classes = ("ajax-modal",)
    icon = "upload"
    policy_rules = (("cloudlet", "cloudlet:base:import"),)


class CreateBase(tables.LinkAction):
    name = "create"
    verbose_name = _("Create from Instance")
    url = "horizon:project:cloudlet_bases:create"
    classes = ("ajax-modal",)
    icon = "camera"
    policy_rules = (("cloudlet", "cloudlet:base:create"),)


class LaunchFromBase(tables.LinkAction):
    name = "launch"
    verbose_name = _("Launch Instance")
    url = "horizon:project:cloudlet_bases:launch"
    classes = ("ajax-modal", "btn-launch")
    icon = "cloud-upload"
    policy_rules = (("compute", "os_compute_api:servers:create"),)

    def allowed(self, request: Any, datum: Any = None) -> bool:
        return datum is not None and tasks.is_result(datum) and datum.status == "active"


class ExportBase(tables.LinkAction):
    name = "export"
    verbose_name = _("Export Package")
    url = "horizon:project:cloudlet_bases:export"
    icon = "download"
    policy_rules = (("cloudlet", "cloudlet:base:export"),)

    def allowed(self, request: Any, datum: Any = None) -> bool:
        return datum is not None and tasks.is_result(datum) and datum.status == "active"


class DeleteBase(tables.DeleteAction):
    name = "delete"
    policy_rules = (("cloudlet", "cloudlet:base:delete"),)

    @staticmethod
    def action_present(count: int) -> str:
        return ngettext_lazy("Delete Base VM", "Delete Base VMs", count)

    @staticmethod
    def action_past(count: int) -> str:
        return ngettext_lazy("Deleted Base VM", "Deleted Base VMs", count)

    def allowed(self, request: Any, datum: Any = None) -> bool:
        return datum is None or tasks.is_result(datum)

    def delete(self, request: Any, obj_id: str) -> None:
        try:
            cloudlet.base_delete(request, obj_id)
        except cloudlet.CloudletError as e:
            # the service's message, e.g. which overlays of the project still depend on it
            name = self.table.get_object_display(self.table.get_object_by_id(obj_id))
            common.refused(request, _("Unable to delete base VM %s") % name, e)


class UpdateRow(tables.Row):
    ajax = True

    def get_data(self, request: Any, row_id: str) -> Any:
        """A base; a task until it made its base (then the base's own row)."""
        if not tasks.is_task_row(row_id):
            return cloudlet.base_get(request, row_id)
        task = cloudlet.task_get(request, tasks.task_id_of(row_id))
        disk = (task.images or {}).get("disk")
        if task.state == "succeeded" and disk:
            return cloudlet.base_get(request, disk)
        return tasks.TaskRow(task)


def disk_size(datum: Any) -> str:
    if not tasks.is_result(datum):
        return "-"
    size = datum.disk_size or datum.size
    return filesizeformat(size) if size else "-"


def memory_size(datum: Any) -> str:
    """The memory image's size (what a host fetches), else the guest RAM the image asks for."""
    if not tasks.is_result(datum):
        return "-"
    if datum.memory_size:
        return filesizeformat(datum.memory_size)
    return f"{datum.min_ram} MB" if datum.min_ram else "-"


def configuration(datum: Any) -> str:
    """Machine type, vCPUs, RAM and CPU model the memory snapshot was saved with: what a host
    must offer to resume it."""
    config = datum.configuration if tasks.is_result(datum) else None
    if not config:
        return "-"
    parts = [
        config.get("machine"),
        f"{config['vcpus']} vCPU" if config.get("vcpus") else None,
        f"{config['memory_mib']} MiB" if config.get("memory_mib") else None,
        config.get("cpu"),
        f"QEMU {config['qemu_version']}" if config.get("qemu_version") else None,
    ]
    return ", ".join(str(p) for p in parts if p)


def cached_on(datum: Any) -> str:
    """Compute hosts holding the base in their cache (absent when policy hides host names)."""
    hosts = datum.cached_on if tasks.is_result(datum) else None
    return ", ".join(hosts) if hosts else "-"


def activity(datum: Any) -> str:
    return datum.activity if not tasks.is_result(datum) else "-"


def detail_link(datum: Any) -> str | None:
    if not tasks.is_result(datum):
        return None
    return reverse("horizon:project:cloudlet_bases:detail", args=[datum.id])


class BasesTable(tables.DataTable):
    name = tables.WrappingColumn("name", verbose_name=_("Name"), link=detail_link)
    base_id = tables.Column(
        "base_id", verbose_name=_("Base ID"), truncate=16, attrs={"class": "cloudlet-base-id"}
    )
    disk = tables.Column(disk_size, verbose_name=_("Disk"), attrs={"data-type": "size"})
    memory = tables.Column(memory_size, verbose_name=_("Memory"))
    configuration = tables.WrappingColumn(configuration, verbose_name=_("Configuration"))
    cached_on = tables.WrappingColumn(cached_on, verbose_name=_("Cached on"))
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
        name = "bases"
        verbose_name = _("Base VMs")
        status_columns = ["status"]
        row_class = UpdateRow
        table_actions = (ImportBase, CreateBase, DeleteBase)
        row_actions = (LaunchFromBase, ExportBase, DeleteBase)
