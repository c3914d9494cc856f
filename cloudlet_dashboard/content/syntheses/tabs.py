from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from horizon import tabs

from cloudlet_dashboard.content import charts

# counters of the engine's Stats that describe early start (cloudlet/synthesis.py)
EARLY_START_HINTS = ("on demand", "before resume", "complete after", "first response")


class OverviewTab(tabs.Tab):
    name = _("Overview")
    slug = "overview"
    template_name = "cloudlet/syntheses/_detail_overview.html"

    def get_context_data(self, request: Any) -> dict[str, Any]:
        synthesis = self.tab_group.kwargs["synthesis"]
        statistics = getattr(synthesis, "statistics", None) or None
        stages = (statistics or {}).get("stages") or []
        counters = (statistics or {}).get("counters") or {}
        early = {k: v for k, v in counters.items() if any(h in k for h in EARLY_START_HINTS)}
        return {
            "synthesis": synthesis,
            "statistics": statistics,
            "timeline": charts.timeline(stages),
            "stages": stages,
            "early_start": early,
            "other_counters": {k: v for k, v in counters.items() if k not in early},
            "running": synthesis.state == "running",
        }


class SynthesisDetailTabs(tabs.DetailTabsGroup):
    slug = "synthesis_details"
    tabs = (OverviewTab,)
