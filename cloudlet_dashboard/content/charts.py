"""Charts drawn on the server as SVG (templates cloudlet/_*_chart.html): no JavaScript to load
or to fail, the numbers are in the page as text (readable without the picture, by a screen
reader or a test), and the same figures the service reported are what gets drawn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.utils.translation import gettext as _

WIDTH = 640  # drawing width of the bars' area, in SVG units
LABEL_WIDTH = 150
ROW_HEIGHT = 26
BAR_HEIGHT = 18
# the overlay format's chunk kinds (docs/overlay-format.md), in its order, with their meaning
KIND_LABELS = {
    "NEW": "new content",
    "SELF": "copy of a new chunk",
    "BASE_DISK": "from the base disk",
    "BASE_MEMORY": "from the base memory",
    "ZERO": "zeros",
}
KIND_COLOURS = {
    "NEW": "#d9534f",
    "SELF": "#f0ad4e",
    "BASE_DISK": "#5bc0de",
    "BASE_MEMORY": "#337ab7",
    "ZERO": "#999999",
}


@dataclass
class Bar:
    label: str
    x: float
    width: float
    y: float
    colour: str
    text: str
    data: dict[str, Any]

    @property
    def end(self) -> float:
        return self.x + self.width


@dataclass
class Tick:
    x: float
    label: str


@dataclass
class Chart:
    bars: list[Bar]
    height: int
    ticks: list[Tick] = field(default_factory=list)  # a time axis under the bars, if any
    width: int = WIDTH + LABEL_WIDTH + 110
    label_width: int = LABEL_WIDTH
    bar_height: int = BAR_HEIGHT

    @property
    def label_x(self) -> int:
        return self.label_width - 8

    @property
    def axis_y(self) -> int:
        """Where the time axis' labels go: under the last bar."""
        return len(self.bars) * ROW_HEIGHT


def chunk_kinds(chunks: dict[str, int]) -> Chart | None:
    """One bar per chunk kind the overlay holds, proportional to its count of chunks."""
    counts = [(kind, int(chunks.get(kind, 0))) for kind in KIND_LABELS]
    counts = [(kind, n) for kind, n in counts if n > 0]
    if not counts:
        return None
    total = sum(n for _, n in counts)
    largest = max(n for _, n in counts)
    bars = [
        Bar(
            label=kind,
            x=LABEL_WIDTH,
            width=max(1.0, WIDTH * n / largest),
            y=i * ROW_HEIGHT,
            colour=KIND_COLOURS[kind],
            text=f"{n} ({100 * n / total:.1f}%)",
            data={"kind": kind, "chunks": n, "meaning": KIND_LABELS[kind]},
        )
        for i, (kind, n) in enumerate(counts)
    ]
    return Chart(bars, height=len(bars) * ROW_HEIGHT)


TICKS = 4  # intervals of the time axis
STAGE_COLOUR = "#337ab7"
RUNNING_COLOUR = "#9acfea"
FAILED_COLOUR = "#d9534f"


def timeline(stages: list[dict[str, Any]]) -> Chart | None:
    """One bar per stage from its start to its end (seconds since the synthesis began, as the
    compute host measured them); overlapping stages overlap on the time axis. A stage still
    running (no end yet) reaches to the latest moment the record knows."""
    started = [s for s in stages if s.get("start") is not None]
    if not started:
        return None
    moments = [float(s["start"]) for s in started] + [
        float(s["end"]) for s in started if s.get("end") is not None
    ]
    span = max(moments) or 1.0
    bars = []
    for i, stage in enumerate(started):
        running = stage.get("end") is None
        start = float(stage["start"])
        end = span if running else float(stage["end"])
        seconds = float(stage.get("seconds") or 0.0)
        if stage.get("failed"):
            colour = FAILED_COLOUR
        else:
            colour = RUNNING_COLOUR if running else STAGE_COLOUR
        bars.append(
            Bar(
                label=stage["name"],
                x=LABEL_WIDTH + WIDTH * start / span,
                width=max(1.0, WIDTH * (end - start) / span),
                y=i * ROW_HEIGHT,
                colour=colour,
                text=_("running") if running else f"{seconds:.2f} s",
                data={
                    "stage": stage["name"],
                    "start": f"{start:.3f}",
                    "end": "" if running else f"{end:.3f}",
                    "seconds": f"{seconds:.3f}",
                    "bytes": stage.get("bytes") or 0,
                    "running": "true" if running else "false",
                },
            )
        )
    ticks = [
        Tick(LABEL_WIDTH + WIDTH * i / TICKS, f"{span * i / TICKS:.2f} s") for i in range(TICKS + 1)
    ]
    return Chart(bars, height=len(bars) * ROW_HEIGHT + ROW_HEIGHT, ticks=ticks)
