from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from horizon import tabs

from cloudlet_dashboard.content import charts


class OverviewTab(tabs.Tab):
    name = _("Overview")
    slug = "overview"
    template_name = "cloudlet/overlays/_detail_overview.html"

    def get_context_data(self, request: Any) -> dict[str, Any]:
        overlay = self.tab_group.kwargs["overlay"]
        summary = overlay.summary
        return {
            "overlay": overlay,
            "summary": summary,
            "access_order": (summary or {}).get("meta", {}).get("access_order"),
            "chart": charts.chunk_kinds(summary["chunks"]) if summary else None,
        }


class OverlayDetailTabs(tabs.DetailTabsGroup):
    slug = "overlay_details"
    tabs = (OverviewTab,)
