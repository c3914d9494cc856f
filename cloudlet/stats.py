"""Per-stage timings and byte counts, and a live progress line for long stages."""

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    bytes: int = 0
    failed: bool = False  # ended by an exception: never shown as "ok"
    # seconds since the Stats was created: first start and last end of this stage (a timeline
    # draws it as a bar; stages may overlap, e.g. early start's pipeline under the running guest)
    start: float | None = None
    end: float | None = None


@dataclass
class Stats:
    """Ordered stage timings plus counters, printed by the CLI and kept in overlays.

    Counters are numbers (a unit, if any, ends the name: "first response after s"), so that
    --json output is numbers a script can compare, not text to parse.
    """

    stages: dict[str, Stage] = field(default_factory=dict)
    counters: dict[str, int | float] = field(default_factory=dict)
    # told when a stage starts (seconds None) and ends, and whether it failed: the CLI's live
    # stage line
    listener: Callable[[str, float | None, bool], None] | None = None
    created: float = field(default_factory=time.monotonic)  # what start/end count from

    @contextmanager
    def stage(self, name: str, nbytes: int = 0) -> Iterator[Stage]:
        st = self.stages.setdefault(name, Stage(name))
        start = time.monotonic()
        if st.start is None:
            st.start = start - self.created
        if self.listener:
            self.listener(name, None, False)
        failed = True
        try:
            yield st
            failed = False
        finally:
            end = time.monotonic()
            elapsed = end - start
            st.seconds += elapsed
            st.bytes += nbytes
            st.failed = st.failed or failed
            st.end = end - self.created
            if self.listener:
                self.listener(name, elapsed, failed)

    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages.values())

    def as_dict(self) -> dict:
        return {
            "stages": {
                k: {
                    "seconds": round(s.seconds, 4),
                    "bytes": s.bytes,
                    "failed": s.failed,
                    "start": _rounded(s.start),
                    "end": _rounded(s.end),
                }
                for k, s in self.stages.items()
            },
            "counters": dict(self.counters),
        }

    def render(self) -> str:
        width = max([len(n) for n in self.stages] + [len(n) for n in self.counters] + [5])
        lines = []
        for s in self.stages.values():
            extra = f"  {human_bytes(s.bytes):>10}" if s.bytes else ""
            failed = "  FAILED" if s.failed else ""
            lines.append(f"  {s.name:<{width}}  {s.seconds:8.2f} s{extra}{failed}")
        lines.append(f"  {'total':<{width}}  {self.total_seconds():8.2f} s")
        for k, v in self.counters.items():
            shown = f"{v:.2f}" if isinstance(v, float) else str(v)
            lines.append(f"  {k:<{width}}  {shown}")
        return "\n".join(lines)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """A live `stage: 42% 12.0/28.5 MiB` line on a terminal; sparse plain lines otherwise.

    Callable with the number of bytes done so far, so engine functions take it as a plain
    `progress(done)` callback and never know about terminals.
    """

    def __init__(
        self, label: str, total: int | None, out: TextIO | None = None, interval: float = 0.2
    ) -> None:
        self.label = label
        self.total = total
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.interval = interval if self.tty else 10.0
        self.start = time.monotonic()
        self._last = 0.0
        self._done = 0

    def __call__(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(final=False)

    def _emit(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = f"{human_bytes(self._done / elapsed)}/s"
        if self.total:
            pct = min(100.0, 100.0 * self._done / self.total)
            done, total = human_bytes(self._done), human_bytes(self.total)
            text = f"{self.label}: {pct:5.1f}% {done}/{total} {rate}"
        else:
            text = f"{self.label}: {human_bytes(self._done)} {rate}"
        if self.tty:
            self.out.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        self._emit(final=True)


class StageLine:
    """Shows which stage is running: `... boot until ready` then `ok  boot until ready  8.9 s`
    (or `FAILED boot until ready  8.9 s`: the error follows).

    On a terminal the running line is rewritten in place; in logs each end gets its own line.
    """

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()

    def __call__(self, name: str, seconds: float | None, failed: bool = False) -> None:
        if seconds is None:
            if self.tty:
                self.out.write(f"\r\033[K... {name}")
        else:
            outcome = "FAILED" if failed else "ok "
            line = f"{outcome} {name}  {seconds:.2f} s\n"
            self.out.write(("\r\033[K" if self.tty else "") + line)
        self.out.flush()
