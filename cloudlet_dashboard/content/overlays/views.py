from __future__ import annotations

from typing import Any

from django.http import StreamingHttpResponse
from django.urls import reverse, reverse_lazy
from django.utils.translation import gettext_lazy as _
from horizon import tables, tabs
from horizon.utils import memoized
from openstack_dashboard.utils import futurist_utils

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.content import common, tasks
from cloudlet_dashboard.content.forms import CloudletFormView
from cloudlet_dashboard.content.overlays import forms as overlay_forms
from cloudlet_dashboard.content.overlays import tables as overlay_tables
from cloudlet_dashboard.content.overlays import tabs as overlay_tabs

INDEX_URL = reverse_lazy("horizon:project:cloudlet_overlays:index")


class IndexView(tables.DataTableView):
    table_class = overlay_tables.OverlaysTable
    page_title = _("Overlays")

    def get_data(self) -> list[Any]:
        try:
            pending = tasks.pending_rows(self.request, overlay_tables.OVERLAY_TASK_KINDS)
            overlays = cloudlet.overlay_list(self.request)
        except cloudlet.CloudletError as e:
            common.report(self.request, _("Unable to retrieve overlays"), e)
            return []
        # each summary reads the head of one overlay file: in parallel, as Horizon's
        # Instances view gathers its images, flavors and volumes
        if not overlays:
            return pending
        rows = futurist_utils.call_functions_parallel(
            *[(overlay_tables.with_summary, (self.request, o)) for o in overlays]
        )
        return pending + list(rows)


class DetailView(tabs.TabView):
    tab_group_class = overlay_tabs.OverlayDetailTabs
    template_name = "horizon/common/_detail.html"
    page_title = "{{ overlay.name }}"

    @memoized.memoized_method
    def get_overlay(self) -> Any:
        try:
            overlay = cloudlet.overlay_get(self.request, self.kwargs["overlay_id"])
        except cloudlet.CloudletError as e:
            common.fail_to(self.request, _("Unable to retrieve the overlay"), e, INDEX_URL)
        return overlay_tables.with_summary(self.request, overlay)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        overlay = self.get_overlay()
        context["overlay"] = overlay
        context["url"] = INDEX_URL
        table = overlay_tables.OverlaysTable(self.request)
        context["actions"] = table.render_row_actions(overlay)
        return context

    def get_tabs(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self.tab_group_class(request, overlay=self.get_overlay(), **kwargs)


class CreateView(CloudletFormView):
    form_class = overlay_forms.CreateOverlayForm
    submit_url = reverse_lazy("horizon:project:cloudlet_overlays:create")
    success_url = INDEX_URL
    page_title = modal_header = submit_label = _("Create Overlay from Instance")
    help_paragraphs = (
        _(
            "The instance's changes to the base VM it was launched from (disk and memory) are "
            "captured into an overlay image of the project."
        ),
        _("Afterwards the instance goes on running, or is deleted if you choose so."),
    )

    def get_initial(self) -> dict[str, Any]:
        return {"instance": self.request.GET.get("instance_id")}


class SynthesizeView(CloudletFormView):
    form_class = overlay_forms.SynthesizeForm
    page_title = modal_header = submit_label = _("Synthesize")
    help_paragraphs = (
        _(
            "A new instance is made from the overlay: the compute host fetches the base VM and "
            "the overlay, rebuilds the VM and resumes it running."
        ),
        _("The synthesis page shows its stages as the host measures them."),
    )

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["submit_url"] = reverse(
            "horizon:project:cloudlet_overlays:synthesize", args=[self.kwargs["overlay_id"]]
        )
        return context

    def get_initial(self) -> dict[str, Any]:
        return {"overlay_id": self.kwargs["overlay_id"]}

    def get_success_url_from_handled(self, synthesis: Any) -> str:
        """The new synthesis's page (ModalFormView's hook for the object the form made)."""
        return reverse("horizon:project:cloudlet_syntheses:detail", args=[synthesis.id])


def download(request: Any, overlay_id: str) -> StreamingHttpResponse:
    """The overlay file, relayed from the service as it streams."""
    try:
        overlay = cloudlet.overlay_get(request, overlay_id)
        stream = cloudlet.overlay_file(request, overlay_id)
    except cloudlet.CloudletError as e:
        common.fail_to(request, _("Unable to download the overlay"), e, INDEX_URL)
    response = StreamingHttpResponse(stream.chunks, content_type="application/octet-stream")
    response["Content-Disposition"] = (
        f'attachment; filename="{common.file_name(overlay.name, "overlay")}.overlay"'
    )
    if stream.size:
        response["Content-Length"] = str(stream.size)
    return response
