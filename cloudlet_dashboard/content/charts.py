"""Charts drawn on the server as SVG (templates cloudlet/_*_chart.html): no JavaScript to load
or to fail, the numbers are in the page as text (readable without the picture, by a screen
reader or a test), and the same figures the service reported are what gets drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
class Chart:
    bars: list[Bar]
    height: int
    width: int = WIDTH + LABEL_WIDTH + 110
    label_width: int = LABEL_WIDTH
    bar_height: int = BAR_HEIGHT

    @property
    def label_x(self) -> int:
        return self.label_width - 8


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


STAGE_COLOUR = "#337ab7"
FAILED_COLOUR = "#d9534f"


def timeline(stages: list[dict[str, Any]]) -> Chart | None:
    """One bar per stage from its start to its end (seconds since the synthesis began, as the
    compute host measured them); overlapping stages overlap on the time axis."""
    timed = [s for s in stages if s.get("start") is not None and s.get("end") is not None]
    if not timed:
        return None
    span = max(float(s["end"]) for s in timed) or 1.0
    bars = []
    for i, stage in enumerate(timed):
        start, end = float(stage["start"]), float(stage["end"])
        seconds = float(stage.get("seconds") if stage.get("seconds") is not None else end - start)
        bars.append(
            Bar(
                label=stage["name"],
                x=LABEL_WIDTH + WIDTH * start / span,
                width=max(1.0, WIDTH * (end - start) / span),
                y=i * ROW_HEIGHT,
                colour=FAILED_COLOUR if stage.get("failed") else STAGE_COLOUR,
                text=f"{seconds:.2f} s",
                data={
                    "stage": stage["name"],
                    "start": f"{start:.3f}",
                    "end": f"{end:.3f}",
                    "seconds": f"{seconds:.3f}",
                    "bytes": stage.get("bytes") or 0,
                },
            )
        )
    return Chart(bars, height=len(bars) * ROW_HEIGHT + ROW_HEIGHT)
