"""Syntheses a server runs on behalf of clients, each in its own long-lived worker thread.

QEMU is started with PDEATHSIG, which Linux ties to the *thread* that forked it: a synthesis must
be started by a thread that lives as long as its VM. So every synthesis gets one worker thread
that prepares it, starts it, waits for it to complete, and closes it when the client deletes it
(or the server stops); request threads only ask the worker and wait for it.
"""

import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from cloudlet.basevm.store import BaseStore
from cloudlet.errors import (
    ServerBusy,
    ServerError,
    SourceError,
    SourceNotAllowed,
    SynthesisNotFound,
)
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.qemu import Forward
from cloudlet.sources import AllowList, StreamSource, scheme_of
from cloudlet.stats import Stats
from cloudlet.synthesis import (
    MountedImages,
    PlainImages,
    QemuRunner,
    Synthesis,
    SynthesisSpec,
    prepare_synthesis,
)
from cloudlet.vm import HostOptions

LOG = logging.getLogger(__name__)

UPLOAD_PIPE_SIZE = 4 << 20  # bytes of an upload in flight between the client and the synthesis
KEEP_FINISHED = 64  # failed syntheses kept for their status until deleted; oldest dropped first
MIN_UPLOAD_RATE = 16 << 10  # bytes/s an upload must average once UPLOAD_GRACE has passed
UPLOAD_GRACE = 60.0  # seconds
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, missing from older Pythons' fcntl

Prepare = Callable[[CloudletHome, SynthesisSpec, Stats], Synthesis]


@dataclass
class Options:
    """What a client may choose for one synthesis; everything else is the server's."""

    early_start: bool = True
    forwards: list[Forward] = field(default_factory=list)
    fetch_deadline: float = 60.0

    @classmethod
    def parse(
        cls, early_start: object = True, forwards: object = (), fetch_deadline: object = 60.0
    ) -> "Options":
        """Validate client input; ValueError with a message for the client on bad values."""
        if not isinstance(early_start, bool):
            raise ValueError("early_start must be true or false")
        if not isinstance(forwards, list | tuple) or not all(isinstance(f, str) for f in forwards):
            raise ValueError('forwards must be a list of strings like "tcp:8080:80"')
        parsed = [Forward.parse(f) for f in forwards]
        for f in parsed:
            if f.host_addr != "127.0.0.1":
                raise ValueError(f"forwards are bound to 127.0.0.1 only, not {f.host_addr}")
        if (
            not isinstance(fetch_deadline, int | float)
            or isinstance(fetch_deadline, bool)
            or not 0 < fetch_deadline <= 3600
        ):
            raise ValueError("fetch_deadline must be a number of seconds in (0, 3600]")
        return cls(early_start, parsed, float(fetch_deadline))


class Job:
    """One synthesis and the worker thread that owns it."""

    def __init__(
        self,
        manager: "SynthesisManager",
        source: str | Path | StreamSource,
        label: str,
        options: Options,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.label = label
        self.options = options
        self.created = datetime.now(UTC)
        self.stats = Stats()
        self._manager = manager
        self._source = source
        self._lock = threading.Lock()
        self._synth: Synthesis | None = None
        self._phase = "preparing"  # preparing | starting | applying | complete | finished
        self._final: dict | None = None  # status snapshot taken before the synthesis was closed
        self.exception: BaseException | None = None
        self._prepared = threading.Event()  # prepare_synthesis returned or failed
        self._stopping = threading.Event()
        self._on_stop: list[Callable[[], None]] = []
        self.thread = threading.Thread(target=self._run, name=f"synthesis-{self.id}", daemon=True)

    # --- worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        synth: Synthesis | None = None
        try:
            spec = SynthesisSpec(
                source=self._source,
                sink=MountedImages() if self.options.early_start else PlainImages(),
                runner=QemuRunner(HostOptions(forwards=self.options.forwards)),
                timeout=self._manager.timeout,
                fetch_deadline=self.options.fetch_deadline,
                allow=self._manager.allow,
                id=self.id,  # one id in the server's log and its API
            )
            synth = self._manager.prepare(self._manager.home, spec, self.stats)
            with self._lock:
                self._synth, self._phase = synth, "starting"
            self._prepared.set()
            if self._stopping.is_set():
                return
            synth.start()  # from this thread, which lives as long as the VM
            with self._lock:
                self._phase = "applying"
            if self._stopping.is_set():
                return
            synth.wait_complete(self._manager.timeout)
            with self._lock:
                self._phase = "complete"
            LOG.info("synthesis %s complete", self.id)
            self._stopping.wait()
        except BaseException as exc:  # reported through status(); the thread must not die loudly
            if not self._stopping.is_set():
                LOG.warning("synthesis %s failed: %s", self.id, exc)
                self.exception = exc
        finally:
            self._prepared.set()
            try:
                if synth is not None:
                    self._close(synth)
            finally:
                if isinstance(self._source, StreamSource):
                    self._source.close()  # an upload still being written gets BrokenPipeError
                with self._lock:
                    self._phase = "finished"
                if self._stopping.is_set():
                    self._manager.forget(self)  # deleted: gone from the list once cleaned up

    def _close(self, synth: Synthesis) -> None:
        try:
            if self.exception is not None:
                synth.fail(self.exception)
            self._final = synth.status()
        finally:
            synth.close()

    # --- request threads -----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.thread.is_alive()

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Called when the synthesis is stopped (e.g. to end an upload still being received)."""
        self._on_stop.append(callback)

    def wait_prepared(self, timeout: float) -> None:
        """Until the overlay's manifest was read and checked (or that failed)."""
        self._prepared.wait(timeout)

    def stop(self, reason: str) -> None:
        """Ask the worker to stop the VM and clean up; does not wait for it."""
        self._stopping.set()
        for callback in self._on_stop:
            try:
                callback()
            except OSError as exc:
                LOG.debug("stopping synthesis %s: %s", self.id, exc)
        with self._lock:
            synth, phase = self._synth, self._phase
        if synth is not None and phase in ("starting", "applying"):
            synth.fail(ServerError(reason))  # wakes the worker from start() or wait_complete

    def status(self) -> dict:
        with self._lock:
            synth, final, phase = self._synth, self._final, self._phase
        if final is not None:
            st = dict(final)
        elif synth is not None:
            st = synth.status()
        else:
            st = {"state": "preparing", "error": None, "stats": self.stats.as_dict()}
        if self.exception is not None:
            st["state"], st["error"] = "failed", str(self.exception)
        elif phase == "finished" or self._stopping.is_set():
            st["state"] = "stopped" if phase == "finished" else "stopping"
        st.update(
            id=self.id,
            source=self.label,
            created=self.created.isoformat(),
            early_start=self.options.early_start,
            forwards=[f"{f.proto}:{f.host_port}:{f.guest_port}" for f in self.options.forwards],
        )
        return st


class UploadTooSlow(ServerError):
    """An upload that holds a --max-running slot while hardly sending anything."""


class UploadRate:
    """The floor under an upload's average rate: a client sending 1 byte/s would otherwise hold
    a synthesis slot for ever, each read well within its timeout."""

    def __init__(self) -> None:
        self._min_rate, self._grace = MIN_UPLOAD_RATE, UPLOAD_GRACE
        self._started = time.monotonic()

    def check(self, received: int) -> None:
        elapsed = time.monotonic() - self._started
        if elapsed > self._grace and received < self._min_rate * elapsed:
            raise UploadTooSlow(
                f"the upload sent {received} bytes in {elapsed:.0f} s, less than the "
                f"{self._min_rate // 1024} KiB/s this server requires"
            )


class UploadPipe:
    """The write end of an upload's pipe. Unbuffered, so closing it never blocks on a full pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes) -> None:
        """Blocks while the pipe is full; BrokenPipeError once the synthesis stopped reading."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        """The synthesis reads the end of the overlay here; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "UploadPipe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SynthesisManager:
    """Creates, lists and deletes syntheses, at most `max_running` at a time."""

    def __init__(
        self,
        home: CloudletHome,
        *,
        allow: AllowList | None = None,
        overlay_dir: Path | None = None,
        max_running: int = 2,
        timeout: float = 300.0,
        prepare: Prepare = prepare_synthesis,
    ) -> None:
        self.home = home
        self.allow = allow
        self.overlay_dir = overlay_dir.resolve() if overlay_dir else None
        self.max_running = max_running
        self.timeout = timeout
        self.prepare = prepare
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._closed = False
        for left in home.sweep():  # e.g. a server killed with -9: its VMs' mounts and files
            LOG.warning("removed %s, left behind by a process that no longer runs", left)

    def resolve(self, location: str) -> str | Path:
        """Where the server may read `location` from; SourceNotAllowed (with why) otherwise."""
        if scheme_of(location) == "file":
            if self.overlay_dir is None:
                raise SourceNotAllowed(
                    "this server reads no files of its own (start it with --overlay-dir DIR); "
                    "upload the overlay instead"
                )
            name = urlsplit(location).path if location.startswith("file:") else location
            path = (self.overlay_dir / name).resolve()
            if not path.is_relative_to(self.overlay_dir):
                raise SourceNotAllowed(f"{location} is outside the server's overlay directory")
            if not path.is_file():
                raise SourceError(f"no overlay {location} in the server's overlay directory")
            return path
        if self.allow is None:
            raise SourceNotAllowed(
                "this server fetches no URLs (start it with --allow URL-PREFIX); "
                "upload the overlay instead"
            )
        self.allow.check(location)
        return location

    def create(self, location: str, options: Options) -> Job:
        """Start synthesizing from a URL or a file in the overlay directory."""
        source = self.resolve(location)
        return self._start(Job(self, source, location, options))

    def create_upload(self, options: Options, size: int | None = None) -> tuple[Job, UploadPipe]:
        """Start synthesizing from bytes the caller writes into the returned pipe (then closes).

        The pipe holds at most UPLOAD_PIPE_SIZE bytes, so an upload is never buffered whole;
        writing fails with BrokenPipeError once the synthesis has ended.
        """
        read_fd, write_fd = os.pipe()
        try:
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, UPLOAD_PIPE_SIZE)
        except OSError as exc:  # above /proc/sys/fs/pipe-max-size for an unprivileged user
            LOG.debug("upload pipe keeps its default size: %s", exc)
        writer = UploadPipe(write_fd)
        source = StreamSource(os.fdopen(read_fd, "rb"), url="upload", size=size)
        try:
            return self._start(Job(self, source, "upload", options)), writer
        except BaseException:
            source.close()
            writer.close()
            raise

    def _start(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise ServerError("the server is shutting down")
            running = sum(j.active for j in self._jobs.values())
            if running >= self.max_running:
                raise ServerBusy(
                    f"already running {running} syntheses, the most this server allows "
                    "(--max-running): delete one or try again later"
                )
            self._jobs[job.id] = job
            self._forget_old()
            job.thread.start()
        LOG.info("synthesis %s started from %s", job.id, job.label)
        return job

    def _forget_old(self) -> None:
        finished = sorted((j for j in self._jobs.values() if not j.active), key=lambda j: j.created)
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise SynthesisNotFound(f"no synthesis {job_id} on this server")
        return job

    def statuses(self) -> list[dict]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.created)
        return [j.status() for j in jobs]

    def delete(self, job_id: str, timeout: float = 120.0) -> None:
        """Stop the VM, unmount, remove its files; the synthesis is gone once this returns."""
        job = self.get(job_id)
        job.stop("deleted by the client")
        job.thread.join(timeout)
        if job.thread.is_alive():
            raise ServerError(
                f"synthesis {job_id} did not stop within {timeout:.0f} s; it is still being "
                "stopped and disappears from the list once it has"
            )
        self.forget(job)
        LOG.info("synthesis %s deleted", job_id)

    def forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def bases(self) -> list[dict]:
        return [b.summary() for b in BaseStore(self.home).list()]

    def shutdown(self, timeout: float = 120.0) -> None:
        """Stop every synthesis (VMs stopped, files removed) and refuse new ones."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job.stop("the server is shutting down")
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.thread.join(max(0.0, deadline - time.monotonic()))
            if job.thread.is_alive():
                LOG.error("synthesis %s did not stop within %.0f s", job.id, timeout)
        with self._lock:
            self._jobs.clear()
