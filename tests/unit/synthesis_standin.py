"""A stand-in for cloudlet.synthesis.Synthesis, for unit tests of the server's HTTP and 8021 layers.

Only routing, auth, framing and the upload pipe are under test there, so the stand-in runs no VM:
it reads the overlay stream it is given (a real pipe, fed by the real server) and reports states
as a synthesis does. tests/functional/test_server.py runs real syntheses on real QEMU guests.
"""

from cloudlet.errors import TruncatedOverlay, UnsupportedFormat
from cloudlet.home import CloudletHome
from cloudlet.sources import StreamSource
from cloudlet.stats import Stats
from cloudlet.synthesis import SynthesisSpec

MAGIC = b"OVL1"  # what the stand-in takes for an overlay header


class StandInSynthesis:
    made: list["StandInSynthesis"] = []

    def __init__(self, spec: SynthesisSpec, stats: Stats) -> None:
        self.spec = spec
        self.stats = stats
        self.state = "prepared"
        self.error: str | None = None
        self.closed = False
        self.received = 0
        self.stream = None

    @classmethod
    def prepare(cls, home: CloudletHome, spec: SynthesisSpec, stats: Stats) -> "StandInSynthesis":
        synth = cls(spec, stats)
        if isinstance(spec.source, StreamSource):
            with stats.stage("open + verify manifest"):
                synth.stream = spec.source.stream(0)
                if synth.stream.read(len(MAGIC)) != MAGIC:
                    raise UnsupportedFormat("not an overlay (bad magic)")
                synth.received = len(MAGIC)
        cls.made.append(synth)
        return synth

    def start(self) -> None:
        self.state = "running" if self.spec.sink.early else "starting"

    def wait_complete(self, timeout: float) -> None:
        if self.stream is not None:
            with self.stats.stage("apply overlay"):
                while data := self.stream.read(65536):
                    self.received += len(data)
            size = self.spec.source.size()
            if size is not None and self.received != size:
                raise TruncatedOverlay(f"overlay cut short: {self.received} of {size} bytes")
        if self.state == "failed":  # fail() was called while the overlay was being read
            raise TruncatedOverlay(self.error or "failed")
        self.state = "complete"

    def fail(self, error: BaseException) -> None:
        self.state, self.error = "failed", str(error)

    def close(self) -> None:
        self.closed = True
        if self.state != "failed":
            self.state = "closed"

    def status(self) -> dict:
        size = self.spec.source.size() if isinstance(self.spec.source, StreamSource) else None
        return {
            "id": "standin",
            "state": self.state,
            "error": self.error,
            "base_id": "0" * 64,
            "progress": {"bytes_fetched": self.received, "bytes_total": size},
            "stats": self.stats.as_dict(),
        }
