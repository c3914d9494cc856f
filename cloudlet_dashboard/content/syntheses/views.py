from __future__ import annotations

from typing import Any

from django.urls import reverse_lazy
from django.utils.translation import gettext_lazy as _
from horizon import tables, tabs
from horizon.utils import memoized

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.content import common
from cloudlet_dashboard.content.syntheses import tables as synthesis_tables
from cloudlet_dashboard.content.syntheses import tabs as synthesis_tabs

INDEX_URL = reverse_lazy("horizon:project:cloudlet_syntheses:index")


class IndexView(tables.DataTableView):
    table_class = synthesis_tables.SynthesesTable
    page_title = _("Syntheses")

    def get_data(self) -> list[Any]:
        try:
            return cloudlet.synthesis_list(self.request)
        except cloudlet.CloudletError as e:
            common.report(self.request, _("Unable to retrieve syntheses"), e)
            return []


class DetailView(tabs.TabView):
    tab_group_class = synthesis_tabs.SynthesisDetailTabs
    template_name = "cloudlet/syntheses/detail.html"
    page_title = "{{ synthesis.name }}"

    @memoized.memoized_method
    def get_synthesis(self) -> Any:
        try:
            return cloudlet.synthesis_get(self.request, self.kwargs["synthesis_id"])
        except cloudlet.CloudletError as e:
            common.fail_to(self.request, _("Unable to retrieve the synthesis"), e, INDEX_URL)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        synthesis = self.get_synthesis()
        context["synthesis"] = synthesis
        context["url"] = INDEX_URL
        context["running"] = synthesis.state == "running"
        return context

    def get_tabs(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self.tab_group_class(request, synthesis=self.get_synthesis(), **kwargs)
