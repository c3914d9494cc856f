from django.utils.translation import gettext_lazy as _
from horizon import tabs


class OverviewTab(tabs.Tab):
    name = _("Overview")
    slug = "overview"
    template_name = "cloudlet/bases/_detail_overview.html"

    def get_context_data(self, request):
        return {"base": self.tab_group.kwargs["base"]}


class BaseDetailTabs(tabs.DetailTabsGroup):
    slug = "base_details"
    tabs = (OverviewTab,)
