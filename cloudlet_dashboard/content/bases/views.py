from __future__ import annotations

from typing import Any

from django.http import StreamingHttpResponse
from django.urls import reverse, reverse_lazy
from django.utils.translation import gettext_lazy as _
from horizon import tables, tabs
from horizon.utils import memoized

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.content import common, tasks
from cloudlet_dashboard.content.bases import forms as base_forms
from cloudlet_dashboard.content.bases import tables as base_tables
from cloudlet_dashboard.content.bases import tabs as base_tabs
from cloudlet_dashboard.content.forms import CloudletFormView
from cloudlet_dashboard.content.instances import smallest_flavor_for

INDEX_URL = reverse_lazy("horizon:project:cloudlet_bases:index")


class IndexView(tables.DataTableView):
    table_class = base_tables.BasesTable
    page_title = _("Base VMs")

    def get_data(self) -> list[Any]:
        try:
            rows = tasks.pending_rows(self.request, base_tables.BASE_TASK_KINDS)
            return rows + cloudlet.base_list(self.request)
        except cloudlet.CloudletError as e:
            common.report(self.request, _("Unable to retrieve base VMs"), e)
            return []


class DetailView(tabs.TabView):
    tab_group_class = base_tabs.BaseDetailTabs
    template_name = "horizon/common/_detail.html"
    page_title = "{{ base.name }}"

    @memoized.memoized_method
    def get_base(self) -> Any:
        try:
            return cloudlet.base_get(self.request, self.kwargs["base_id"])
        except cloudlet.CloudletError as e:
            common.fail_to(self.request, _("Unable to retrieve the base VM"), e, INDEX_URL)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        base = self.get_base()
        context["base"] = base
        context["url"] = INDEX_URL
        context["actions"] = base_tables.BasesTable(self.request).render_row_actions(base)
        return context

    def get_tabs(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self.tab_group_class(request, base=self.get_base(), **kwargs)


class ImportView(CloudletFormView):
    form_class = base_forms.ImportBaseForm
    submit_url = reverse_lazy("horizon:project:cloudlet_bases:import")
    success_url = INDEX_URL
    page_title = modal_header = submit_label = _("Import Base VM Package")
    upload = True
    help_paragraphs = (
        _(
            "A package (.cbase) holds a base VM's disk and memory; the service verifies every "
            "digest in it before anything appears in the project's images."
        ),
        _("Upload it from this computer, or give an http(s) URL the service may fetch from."),
    )


class CreateView(CloudletFormView):
    form_class = base_forms.CreateBaseForm
    submit_url = reverse_lazy("horizon:project:cloudlet_bases:create")
    success_url = INDEX_URL
    page_title = modal_header = submit_label = _("Create Base VM from Instance")
    help_paragraphs = (
        _(
            "The running instance is saved (disk and memory) as a new base VM of the project; "
            "it goes on running afterwards."
        ),
    )

    def get_initial(self) -> dict[str, Any]:
        return {"instance": self.request.GET.get("instance_id")}


class LaunchView(CloudletFormView):
    form_class = base_forms.LaunchForm
    success_url = reverse_lazy("horizon:project:instances:index")
    page_title = modal_header = submit_label = _("Launch Instance from Base VM")
    help_paragraphs = (
        _(
            "The instance resumes the base VM's saved memory: it starts running where the base "
            "was saved instead of booting."
        ),
    )

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["submit_url"] = reverse(
            "horizon:project:cloudlet_bases:launch", args=[self.kwargs["base_id"]]
        )
        return context

    def get_initial(self) -> dict[str, Any]:
        try:
            base = cloudlet.base_get(self.request, self.kwargs["base_id"])
        except cloudlet.CloudletError as e:
            common.fail_to(self.request, _("Unable to retrieve the base VM"), e, INDEX_URL)
        return {
            "base_id": base.id,
            "name": base.name,
            "flavor": smallest_flavor_for(self.request, base.min_ram),
        }


def export_package(request: Any, base_id: str) -> StreamingHttpResponse:
    """The base's package, relayed from the service as it streams."""
    try:
        base = cloudlet.base_get(request, base_id)
        download = cloudlet.base_package(request, base_id)
    except cloudlet.CloudletError as e:
        common.fail_to(request, _("Unable to export the base VM"), e, INDEX_URL)
    response = StreamingHttpResponse(download.chunks, content_type="application/octet-stream")
    response["Content-Disposition"] = (
        f'attachment; filename="{common.file_name(base.name, "base")}.cbase"'
    )
    if download.size:
        response["Content-Length"] = str(download.size)
    return response
