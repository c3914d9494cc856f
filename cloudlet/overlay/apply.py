"""Apply an overlay from a local file or a pipe onto plain output files, in one call.

The work is the pipeline's (cloudlet.pipeline: ZERO and BASE_* chunks first, then frames
verified, decompressed and written by concurrent stages, every written chunk hashed and both
result digests checked against the manifest) into a FileSink: sparse copies of the base images
under temporary names, renamed into place only once both digests match.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloudlet.chunks import Kind, Target
from cloudlet.overlay.reader import OverlayReader
from cloudlet.pipeline import BaseImages, FileSink, Pipeline, Progress, check_base

LOG = logging.getLogger(__name__)

# ApplyStats stage name <- the pipeline's per-stage seconds that make it up
_STAGES = {
    "apply base": ("base",),
    "read + verify frames": ("fetch", "verify"),
    "decompress": ("decompress", "hash"),
    "apply frames": ("apply",),
    "verify": ("result",),
    "finish": ("commit",),
}


@dataclass
class ApplyStats:
    """Where the time and bytes of one apply went (worker stages summed over threads)."""

    seconds: dict[str, float] = field(default_factory=dict)
    compressed_bytes: int = 0  # frame bytes read and verified
    raw_bytes: int = 0  # frame bytes after decompression
    written_bytes: int = 0  # chunk bytes written into the outputs (holes excluded)
    chunks: dict[Target, dict[Kind, int]] = field(default_factory=dict)

    def stage_seconds(self) -> dict[str, float]:
        return dict(self.seconds)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def apply_overlay(
    reader: OverlayReader,
    base_disk: Path,
    base_disk_digests: np.ndarray,
    base_memory: Path,
    base_memory_digests: np.ndarray,
    out_disk: Path,
    out_memory: Path,
    expected_base_id: str,
    progress: Progress | None = None,
    fsync: bool = False,
) -> ApplyStats:
    """Build the two result images of `reader` over the base; verify them; rename into place.

    Raises WrongBase (before touching anything) if the overlay was made for another base,
    CorruptOverlay / TruncatedOverlay for a damaged overlay, VerificationFailed when a result
    digest differs from the manifest. On any error no output file is left behind. `fsync`
    makes the outputs durable before the rename (not needed for a VM resumed at once).
    """
    base = BaseImages(
        Path(base_disk), base_disk_digests, Path(base_memory), base_memory_digests, expected_base_id
    )
    check_base(reader, base)
    stats = ApplyStats()
    t = time.perf_counter()
    sizes = {target: reader.images[target].size for target in Target}
    sink = FileSink(base, Path(out_disk), Path(out_memory), sizes, fsync=fsync)
    stats.add("copy", time.perf_counter() - t)
    if progress:
        progress("copy", len(Target), len(Target))
    try:
        pipeline = Pipeline(reader, None, base, sink, progress=progress)
    except BaseException as e:
        sink.abort(e)
        raise
    try:
        pipeline.start()
        pipeline.wait(None)  # a local file or pipe: every stage ends with its input
    finally:
        pipeline.close()
    status = pipeline.status()
    for name, parts in _STAGES.items():
        stats.add(name, sum(status["seconds"][p] for p in parts))
    stats.compressed_bytes = status["bytes_fetched"]
    stats.raw_bytes = status["raw_bytes"]
    stats.written_bytes = sink.written_bytes
    for target in Target:
        per = np.bincount(reader.map_for(target)["kind"], minlength=len(Kind))
        stats.chunks[target] = {k: int(per[k]) for k in Kind}
    LOG.info(
        "applied overlay %s: %d frames, %d bytes written, %s",
        reader.name,
        len(reader.frames),
        stats.written_bytes,
        ", ".join(f"{k} {v:.2f}s" for k, v in stats.seconds.items()),
    )
    return stats
