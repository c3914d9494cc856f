"""Synthesize a VM: base + overlay (a file, a URL, an upload, a Glance image) -> a resumed guest.

One engine API for every front end (the CLI, `cloudlet serve`, the Nova driver):

1. `prepare_synthesis` opens the overlay's source, reads and verifies everything before the
   frames, and matches the base (found in the home, or the one the caller already chose and
   verified) and the VM configuration, once; the runner checks this host can resume it.
   Nothing has started yet.
2. `Synthesis.start()` materializes the result images into the spec's sink while the frame
   pipeline (cloudlet.pipeline) verifies every frame and both result digests:
   - `PlainImages`: plain files, complete and verified before the runner starts;
   - `MountedImages` (early start): cloudletfs serves the images while frames arrive, a read of
     a missing chunk fetches its frame first, and the runner starts at once.
3. ... and resumes them with the spec's runner: `QemuRunner` here (guest RAM mapped privately
   from the mount with early start, so the guest resumes before the overlay is in); the Nova
   driver's libvirt restore (cloudlet_nova.runner) is another. Without a runner the verified
   plain images are the result (Nova restores them once it has defined the domain).

A failure on any thread (a frame digest, a lost source, a read past the fetch deadline, a result
digest, the runner) fails the whole synthesis: the guest is killed, waiting reads get EIO, the
mount, the run directory and every image the sink made go.
"""

import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from cloudlet.basevm.store import BaseStore, BaseVM
from cloudlet.chunks import Target, chunk_count
from cloudlet.errors import BaseNotFound, CloudletError, WrongBase
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig
from cloudlet.hypervisor.qemu import MAIN_RAM_BLOCK, QemuVM, check_host_can_resume
from cloudlet.memory.stream import MemoryLayout
from cloudlet.overlay.reader import OverlayReader
from cloudlet.pipeline import BaseImages, FileSink, FramePlan, Pipeline
from cloudlet.sinks import ChunkSink
from cloudlet.sources import AllowList, OverlaySource, open_source
from cloudlet.stats import Stats
from cloudlet.vm import HostOptions, resume_base

LOG = logging.getLogger(__name__)

IMAGE_NAMES = {Target.DISK: "disk.raw", Target.MEMORY: "memory.img"}  # also the trace's names
RAM_VIEW = "guest-ram"  # the cloudletfs file QEMU maps guest RAM from
_REQUEST_TIMEOUT = 30.0  # one network request without a byte (open_source's default)
_TEARDOWN_TIMEOUT = 120.0  # QEMU quit (10 s), pipeline join, unmount: each bounded


@dataclass
class Resumable:
    """What a runner resumes: the base's hardware and the result images (verified, or served
    by cloudletfs and verified as they arrive)."""

    base: BaseVM
    disk: Path  # raw
    memory: Path  # the flat memory image
    layout: MemoryLayout  # how `memory` becomes the QEMU stream
    work_dir: Path  # where the runner may put its sockets, FIFOs and save files
    ram_file: Path | None = None  # early start: guest RAM mapped lazily from this file


class Runner(Protocol):
    """Resumes a guest from a Resumable; stop() may come from any thread, at any time."""

    def check_host(self, base: BaseVM, layout: MemoryLayout) -> None:
        """Raise (HostCannotResume, ...) before any frame is read if this host cannot."""

    def resume(self, images: Resumable, stats: Stats, timeout: float) -> None:
        """The guest runs when this returns (stages "restore memory", "resume")."""

    def stop(self, failed: bool) -> None:
        """Stop the guest (killed at once when `failed`); idempotent and bounded. A stop before
        resume() started the guest makes that resume fail."""


class Sink(Protocol):
    """Where the result images are materialized for the runner."""

    early: bool  # the runner starts before every frame has arrived

    def open(self, synth: "Synthesis") -> tuple[ChunkSink, Resumable]:
        """The pipeline's ChunkSink and what the runner will resume (under synth.run_dir)."""

    def fail(self, error: BaseException) -> None:
        """The synthesis failed: readers waiting for chunks fail now (any thread)."""

    def close(self, synth: "Synthesis", failed: bool) -> None:
        """Tear down; after a failure nothing the sink made is left."""

    def summary(self) -> dict[str, Any] | None:
        """Numbers for status() while it runs, if any."""


class QemuRunner:
    """Resumes the guest in a QEMU this process starts (standalone and `cloudlet serve`).

    QEMU dies with the thread that calls resume() (PDEATHSIG): call it from one that lives as
    long as the VM.
    """

    def __init__(self, host: HostOptions | None = None) -> None:
        self.host = host or HostOptions()
        self.vm: QemuVM | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def check_host(self, base: BaseVM, layout: MemoryLayout) -> None:
        check_host_can_resume_overlay(base, layout)

    def resume(self, images: Resumable, stats: Stats, timeout: float) -> None:
        resume_base(
            images.base,
            disk=images.disk,
            disk_format="raw",
            memory_image=images.memory,
            layout=images.layout,
            run_dir=images.work_dir,
            host=self.host,
            stats=stats,
            timeout=timeout,
            ram_file=images.ram_file,
            on_launch=self._launched,
        )

    def _launched(self, vm: QemuVM) -> None:
        """QEMU runs (not yet restored): from now on stop() on any thread can kill it."""
        with self._lock:
            self.vm = vm
            stopped = self._stopped
        if stopped:
            vm.kill()  # stopped while QEMU was starting: the restore fails at once

    def stop(self, failed: bool) -> None:
        with self._lock:
            self._stopped = True
            vm = self.vm
        if vm is None:
            return
        if not failed:
            with contextlib.suppress(Exception):
                vm.quit(timeout=10)
        vm.kill()


@dataclass
class SynthesisSpec:
    source: str | os.PathLike[str] | OverlaySource  # path or URL, or an opened source
    sink: Sink = field(default_factory=lambda: MountedImages())
    runner: Runner | None = field(default_factory=QemuRunner)  # None: the images are the result
    base: BaseVM | None = None  # the base the caller chose and verified; default: the home's
    timeout: float = 300.0  # bound on each step that waits (restore, a whole local apply)
    fetch_deadline: float = 60.0  # a guest read of a missing chunk, or the source, waits no longer
    allow: AllowList | None = None  # remote URLs the source may be fetched from
    id: str | None = None  # what logs and status call it (a server passes its own); default new


def find_base(home: CloudletHome, base_id: str) -> BaseVM:
    try:
        return BaseStore(home).get(base_id)
    except BaseNotFound:
        raise WrongBase(
            f"this overlay needs base VM {base_id}, which is not in {home.path}: "
            "import its package with `cloudlet base import`"
        ) from None


def check_overlay_fits(reader: OverlayReader, base: BaseVM) -> MemoryLayout:
    """Refuse an overlay made for another base, or whose VM configuration or RAM layout differs
    from the base's. Returns the overlay's memory layout (what the restored stream must be)."""
    if reader.base_id != base.id:
        raise WrongBase(f"the overlay was made for base VM {reader.base_id}, not {base.short_id}")
    config = VMConfig.from_dict(base.config)
    config.check_compatible(VMConfig.from_dict(json.loads(reader.blob("vm-config"))))
    layout = MemoryLayout.from_bytes(reader.blob("memory-layout"))
    if not layout.ram_compatible(MemoryLayout.from_bytes(base.memory_layout_path.read_bytes())):
        raise WrongBase("the overlay's RAM layout does not match the base VM's")
    return layout


def check_host_can_resume_overlay(base: BaseVM, layout: MemoryLayout) -> None:
    """Raise HostCannotResume unless this host's QEMU can load the base's machine type and
    devices and the streams of the QEMUs that saved the base and the overlay."""
    base_layout = MemoryLayout.from_bytes(base.memory_layout_path.read_bytes())
    check_host_can_resume(
        VMConfig.from_dict(base.config),
        [base_layout.saved_by, layout.saved_by],
        f"the overlay of base {base.name!r} ({base.short_id})",
    )


def base_images(base: BaseVM) -> BaseImages:
    return BaseImages(
        disk=base.disk_path,
        disk_digests=base.chunk_index("disk").digests,
        memory=base.memory_path,
        memory_digests=base.chunk_index("memory").digests,
        base_id=base.id,
    )


def prepare_synthesis(home: CloudletHome, spec: SynthesisSpec, stats: Stats) -> "Synthesis":
    """Open the overlay, verify its manifest, match its base and configuration and let the
    runner check this host; start nothing."""
    with stats.stage("open + verify manifest"):
        if isinstance(spec.source, OverlaySource):
            source = spec.source
        else:  # a request may sit silent for half the bound, then once more on a new connection
            request_timeout = min(_REQUEST_TIMEOUT, spec.fetch_deadline / 2)
            source = open_source(spec.source, allow=spec.allow, timeout=request_timeout)
        # a silent source fails the synthesis within one bound, whether the guest waits or idles
        source.stall_limit = spec.fetch_deadline
        stream: BinaryIO | None = None
        reader: OverlayReader | None = None
        try:
            stream = source.stream(0)
            reader = OverlayReader.open(stream, name=source.url)
            _skip_to_frames(stream, reader)
            base = spec.base or find_base(home, reader.base_id)
            layout = check_overlay_fits(reader, base)
            if spec.runner is not None:
                spec.runner.check_host(base, layout)  # before reading any frame
        except BaseException:
            for closing in (reader, stream, source):
                if closing is not None:
                    with contextlib.suppress(Exception):
                        closing.close()
            raise
    return Synthesis(home, spec, source, stream, reader, base, layout, stats)


def synthesize(home: CloudletHome, spec: SynthesisSpec, stats: Stats) -> "Synthesis":
    """prepare_synthesis + start: a running VM (close() it), or the reason it could not run."""
    synth = prepare_synthesis(home, spec, stats)
    try:
        synth.start()
    except BaseException:
        synth.close()
        raise
    return synth


class PlainImages:
    """Plain result files, complete and verified before the runner starts.

    In `directory` (the caller's from then on: kept after close, removed after a failure), or
    by default in the run directory (removed at close).
    """

    early = False

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._made: list[Path] = []

    def open(self, synth: "Synthesis") -> tuple[ChunkSink, Resumable]:
        assert synth.run_dir is not None
        where = self.directory or synth.run_dir
        disk, memory = where / IMAGE_NAMES[Target.DISK], where / IMAGE_NAMES[Target.MEMORY]
        sizes = {t: synth.reader.images[t].size for t in Target}
        sink = FileSink(base_images(synth.base), disk, memory, sizes)
        self._made = [disk, memory]
        return sink, Resumable(synth.base, disk, memory, synth.layout, synth.run_dir)

    def fail(self, error: BaseException) -> None:
        """Nobody reads plain files before they are complete (the pipeline aborts the sink)."""

    def close(self, synth: "Synthesis", failed: bool) -> None:
        if failed:  # a runner's failure comes after the commit renamed them into place
            for made in self._made:
                made.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any] | None:
        return None


class _FSSink:
    """The pipeline's chunks go into cloudletfs, where waiting guest reads pick them up."""

    def __init__(self, fs: Any, on_abort: Any) -> None:
        self._fs = fs
        self._on_abort = on_abort

    def write(self, target: Target, chunks: np.ndarray, data: np.ndarray) -> None:
        self._fs.write_chunks(IMAGE_NAMES[target], chunks, data)

    def zero(self, target: Target, chunks: np.ndarray) -> None:
        self._fs.zero_chunks(IMAGE_NAMES[target], chunks)

    def frame_applied(self, index: int) -> None:
        pass  # write_chunks already woke the readers of that frame's chunks

    def abort(self, error: BaseException) -> None:
        # the synthesis fails cloudletfs with it, unless the owner is stopping it: a pipeline
        # cut short by a normal stop is no failure to report
        self._on_abort(error)

    def commit(self) -> None:
        pass  # the images are complete and verified; cloudletfs serves them from now on


class MountedImages:
    """Early start: a cloudletfs mount over the base serves the result images while frames
    arrive; a read of a chunk still missing asks the pipeline for its frame and waits (up to the
    fetch deadline). `trace_out`: the guest's chunk access trace is written there at the end.
    """

    early = True

    def __init__(self, trace_out: Path | None = None) -> None:
        # resolved where the user named it, before anything runs (FileSource does the same)
        self.trace_out = None if trace_out is None else Path(trace_out).absolute()
        self.fs: Any = None  # cloudletfs.CloudletFS once mounted
        self._mounted = False

    def open(self, synth: "Synthesis") -> tuple[ChunkSink, Resumable]:
        from cloudletfs import CloudletFS, ImageSpec, View  # FUSE only where early start runs

        assert synth.run_dir is not None
        images = base_images(synth.base)
        plan = FramePlan.of(synth.reader)
        specs = []
        for target, name in IMAGE_NAMES.items():
            base_path, _ = images.image(target)
            size = synth.reader.images[target].size
            state, frame = _initial_state(plan, target, size, os.path.getsize(base_path))
            specs.append(ImageSpec(name, size, base_path, synth.run_dir / f"{name}.layer",
                                   state, frame))  # fmt: skip
        ram = synth.layout.block(MAIN_RAM_BLOCK)
        views = [View(RAM_VIEW, IMAGE_NAMES[Target.MEMORY], ram.offset, ram.length)]
        mnt = synth.run_dir / "mnt"
        mnt.mkdir()
        with synth.stats.stage("mount cloudletfs"):
            self.fs = CloudletFS(
                mnt,
                specs,
                views,
                on_demand=synth.demand,
                on_failure=synth.fail,
                fetch_deadline=synth.spec.fetch_deadline,
            )
            self.fs.mount(timeout=synth.spec.timeout)
            self._mounted = True
        resumable = Resumable(
            synth.base,
            disk=self.fs.path(IMAGE_NAMES[Target.DISK]),
            memory=self.fs.path(IMAGE_NAMES[Target.MEMORY]),
            layout=synth.layout,
            work_dir=synth.run_dir,
            ram_file=self.fs.path(RAM_VIEW),
        )
        return _FSSink(self.fs, synth.fail), resumable

    def fail(self, error: BaseException) -> None:
        if self.fs is not None:
            self.fs.fail(error)

    def close(self, synth: "Synthesis", failed: bool) -> None:
        fs = self.fs
        if fs is None:
            return
        if failed:
            fs.fail(synth.error)
        if self.trace_out is not None:
            _logged(self._write_trace, fs.trace())
        for key, value in _fs_summary(fs.stats()).items():
            synth.stats.counters[f"cloudletfs {key}"] = value
        self._mounted = False
        _logged(fs.unmount)

    def summary(self) -> dict[str, Any] | None:
        return _fs_summary(self.fs.stats()) if self._mounted else None

    def _write_trace(self, rows: list[dict]) -> None:
        assert self.trace_out is not None
        tmp = self.trace_out.with_name(self.trace_out.name + ".partial")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.trace_out)


class Synthesis:
    """One synthesis on this host, from prepared to closed. Thread-safe."""

    def __init__(
        self,
        home: CloudletHome,
        spec: SynthesisSpec,
        source: OverlaySource,
        stream: BinaryIO,
        reader: OverlayReader,
        base: BaseVM,
        layout: MemoryLayout,
        stats: Stats,
    ) -> None:
        self.id = spec.id or secrets.token_hex(8)
        self.home, self.spec, self.base, self.stats = home, spec, base, stats
        self.source, self._stream, self.reader, self.layout = source, stream, reader, layout
        self.sink, self.runner = spec.sink, spec.runner
        self.run_dir: Path | None = None
        self.pipeline: Pipeline | None = None
        self.images: Resumable | None = None  # what the sink made, once it opened
        self._lock = threading.RLock()
        self._state = "prepared"
        self._error: BaseException | None = None
        self._complete = threading.Event()  # every frame applied and verified, or failed
        self._teardown_thread: threading.Thread | None = None
        self._in_start = False  # start() runs: it tears down itself if anything fails
        self._start_done = threading.Event()
        self._started_at = time.monotonic()
        self._running_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Materialize the images into the sink and resume them with the runner: the guest
        runs when this returns (early start: before the overlay is in). Without a runner, the
        images are complete and verified when it returns.

        Call it from a thread that lives as long as the VM: QEMU dies with that thread.
        """
        with self._lock:
            if self._state != "prepared":
                raise CloudletError(f"synthesis {self.id} is {self._state}, not prepared")
            self._state = "starting"
            self._in_start = True
            self.run_dir = self.home.new_run_dir("synthesis")
        error: BaseException | None = None
        try:
            self._materialize_and_resume()
        except BaseException as e:
            error = e
        with self._lock:
            self._in_start = False
            self._start_done.set()
            error = self._error or error  # a failure elsewhere is the cause of ours
            if error is None:
                self._running_at = time.monotonic()
                if self._state == "starting":
                    self._state = "complete" if self._complete.is_set() else "running"
        if error is not None:
            self.fail(error)
            self._start_teardown().join(_TEARDOWN_TIMEOUT)
            raise error
        if self.runner is not None:
            LOG.info("synthesis %s: guest running from base %s", self.id, self.base.id[:16])

    def _materialize_and_resume(self) -> None:
        chunk_sink, images = self.sink.open(self)
        self.images = images
        try:
            self.pipeline = Pipeline(
                self.reader,
                self.source,
                base_images(self.base),
                chunk_sink,
                stats=self.stats,
                frames_stream=self._stream,
            )
        except BaseException as e:
            chunk_sink.abort(e)
            raise
        if self.sink.early:
            self.pipeline.start()  # ZERO and BASE_* chunks are in before the guest reads any
            threading.Thread(target=self._watch, name=f"synthesis-{self.id}", daemon=True).start()
        else:
            with self.stats.stage("apply overlay", self.reader.total_length):
                self.pipeline.start()
                self.pipeline.wait(self.spec.timeout)
            self._pipeline_done()
        if self.runner is None:
            return
        self.runner.resume(images, self.stats, self.spec.timeout)
        if not self.sink.early:
            images.memory.unlink(missing_ok=True)  # restored into the guest; the disk stays

    def demand(self, frame: int) -> None:
        """A reader waits for a chunk of `frame` (cloudletfs): fetch it ahead of the stream."""
        pipeline = self.pipeline
        if pipeline is not None:
            pipeline.demand(frame)

    def _watch(self) -> None:
        """Early start: the rest of the overlay streams in behind the running guest."""
        assert self.pipeline is not None
        try:
            self.pipeline.wait(None)
        except BaseException as e:  # noqa: BLE001 - handed to fail(), reported by status()
            self.fail(e)
            return
        self._pipeline_done()
        with self._lock:
            if self._state == "running":
                self._state = "complete"
        LOG.info("synthesis %s: overlay complete and verified", self.id)

    def _pipeline_done(self) -> None:
        assert self.pipeline is not None
        status = self.pipeline.status()
        self.stats.counters["overlay complete after s"] = round(
            time.monotonic() - self._started_at, 3
        )
        self.stats.counters["frames fetched on demand"] = status["demand_fetches"]
        for stage, seconds in status["seconds"].items():
            self.stats.counters[f"pipeline {stage} s"] = round(seconds, 3)
        self._complete.set()

    def wait_complete(self, timeout: float) -> None:
        """Until the whole overlay is applied and verified; raises the synthesis's failure."""
        if not self._complete.wait(timeout):
            raise CloudletError(
                f"synthesis {self.id}: the overlay was not complete after {timeout:.0f} s"
            )
        if self._error is not None:
            raise self._error

    def fail(self, error: BaseException) -> None:
        """Fail the synthesis: the guest is killed, readers get EIO, mount and files go.

        Safe from any thread (a pipeline stage, a cloudletfs deadline, the owner). While start()
        runs, only what it waits on is stopped (the runner, cloudletfs reads) and start() tears
        down as it returns; otherwise the tear-down runs on a thread of its own, since it joins
        the pipeline and unmounts the filesystem.
        """
        with self._lock:
            if self._error is None and self._state != "closed":
                self._error = error
                self._state = "failed"
                LOG.error("synthesis %s failed: %s", self.id, error)
            in_start = self._in_start
        self._complete.set()
        if not in_start:
            self._start_teardown()
            return
        _logged(self.source.close)  # a fetch blocked on the network fails at once
        if self.runner is not None:
            self.runner.stop(failed=True)
        self.sink.fail(error)

    def close(self) -> None:
        """Stop the guest and remove everything the synthesis made but the images a sink hands
        over (PlainImages with a directory); idempotent, bounded.

        Called while start() still runs (another thread), it stops the start first.
        """
        with self._lock:
            in_start = self._in_start
        if in_start:
            self.fail(CloudletError(f"synthesis {self.id} was stopped while it started"))
            self._start_done.wait(_TEARDOWN_TIMEOUT)
        with self._lock:
            if self._state != "failed":
                self._state = "closed"
        self._start_teardown().join(_TEARDOWN_TIMEOUT)

    def _start_teardown(self) -> threading.Thread:
        with self._lock:
            if self._teardown_thread is None:
                self._teardown_thread = threading.Thread(
                    target=self._teardown, name=f"synthesis-{self.id}-teardown", daemon=True
                )
                self._teardown_thread.start()
            return self._teardown_thread

    def __enter__(self) -> "Synthesis":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _teardown(self) -> None:
        failed = self._error is not None
        try:
            if self.runner is not None:
                _logged(self.runner.stop, failed)
            _logged(self.source.close)  # wakes a fetch blocked on the network at once
            if self.pipeline is not None:
                _logged(self.pipeline.close)
            _logged(self.sink.close, self, failed)
            for closing in (self.reader, self._stream):
                _logged(closing.close)
        finally:
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- status ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def error(self) -> BaseException | None:
        return self._error

    def status(self) -> dict[str, Any]:
        with self._lock:
            progress = self.pipeline.status() if self.pipeline is not None else {}
            progress.pop("seconds", None)
            out: dict[str, Any] = {
                "id": self.id,
                "state": self._state,
                "error": None if self._error is None else str(self._error),
                "base_id": self.base.id,
                "overlay": self.source.url,
                "early_start": self.sink.early,
                "progress": progress,
                "stats": self.stats.as_dict(),
            }
            if self._running_at is not None:
                out["running_after"] = round(self._running_at - self._started_at, 3)
            summary = self.sink.summary()
            if summary is not None:
                out["cloudletfs"] = summary
            return out


def _initial_state(
    plan: FramePlan, target: Target, size: int, base_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """cloudletfs chunk states before any frame arrives: the base, zeros past its end, and
    PENDING for every chunk a frame supplies (ZERO/BASE_* rows land in pipeline.start())."""
    from cloudletfs import ChunkState

    count = chunk_count(size)
    state = np.full(count, ChunkState.BASE, dtype=np.uint8)
    state[min(count, base_size // 4096) :] = ChunkState.ZERO
    if base_size % 4096 and base_size // 4096 < count:
        state[base_size // 4096] = ChunkState.BASE  # the base's partial last chunk
    frame = np.full(count, -1, dtype=np.int32)
    chunks, frames = plan.supplied(target)
    state[chunks] = ChunkState.PENDING
    frame[chunks] = frames
    return state, frame


def _skip_to_frames(stream: BinaryIO, reader: OverlayReader) -> None:
    """Leave `stream` at the first frame (the pipeline goes on reading frames from it)."""
    if stream.seekable():
        stream.seek(reader.frames_offset)
        return
    gap = reader.frames_offset - reader.consumed
    while gap > 0:
        block = stream.read(min(gap, 1 << 20))
        if not block:
            break  # truncated: the pipeline reports it when it reads the first frame
        gap -= len(block)


def _logged(step: Callable[..., object], *args: object) -> None:
    """One step of a tear-down: a failure is logged and the tear-down goes on."""
    try:
        step(*args)
    except Exception:
        LOG.exception("synthesis clean-up: %s failed", getattr(step, "__qualname__", step))


def _fs_summary(stats: dict[str, Any]) -> dict[str, Any]:
    keep = ("reads", "read_bytes", "writes", "demand_misses", "frames_demanded", "eio")
    out = {k: stats[k] for k in keep if k in stats}
    for k in ("wait_total", "wait_max"):
        if k in stats:
            out[k] = round(float(stats[k]), 4)
    return out
