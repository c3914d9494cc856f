"""cloudletfs: a FUSE filesystem that serves a synthesized VM's images while they still arrive,
so the VM can resume before the overlay is complete (early start)."""

from cloudletfs.fs import STATS_FILE, TRACE_FILE, CloudletFS
from cloudletfs.state import ChunkState, ImageSpec, View

__all__ = ["STATS_FILE", "TRACE_FILE", "ChunkState", "CloudletFS", "ImageSpec", "View"]
