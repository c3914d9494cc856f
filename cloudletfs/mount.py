"""Mount and unmount lifecycle of one in-process FUSE filesystem (mfusepy over libfuse3).

libfuse's loop runs in a background thread; mount returns once the kernel's handshake reached
it, unmount is bounded whatever the filesystem's users do.
"""

import ctypes
import logging
import os
import signal
import threading
import time
from pathlib import Path

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would take libfuse2 if installed
import mfusepy  # noqa: E402

from cloudlet.errors import FilesystemError  # noqa: E402
from cloudlet.fsutil import abort_fuse_connection, fuse_mounts_under, unmount_fuse  # noqa: E402

log = logging.getLogger(__name__)

# libfuse's fuse_main installs process-wide handlers for these where none is set (SIGTERM and
# SIGHUP in a Python process): they would turn `kill` into "end one mount". We put back what
# was there; the lock keeps two mounts from saving each other's libfuse handlers.
_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
_SIGACTION_BYTES = 512  # more than sizeof(struct sigaction) on any Linux ABI
_libc = ctypes.CDLL(None, use_errno=True)
_handlers_lock = threading.Lock()


def _save_handlers() -> dict[int, ctypes.Array]:
    saved = {}
    for sig in _SIGNALS:
        buf = ctypes.create_string_buffer(_SIGACTION_BYTES)
        if _libc.sigaction(int(sig), None, buf) == 0:
            saved[int(sig)] = buf
    return saved


def _restore_handlers(saved: dict[int, ctypes.Array]) -> None:
    for sig, buf in saved.items():
        _libc.sigaction(sig, buf, None)


class FuseMount:
    """One mount of `operations` at `mountpoint`, served by libfuse threads in this process."""

    def __init__(self, mountpoint: Path, operations: mfusepy.Operations, *,
                 fsname: str, allow_other: bool = False) -> None:
        self.mountpoint = Path(mountpoint).absolute()
        self._ops = operations
        # max_idle_threads: libfuse 3.14 takes "unset" (UINT_MAX) for an invalid value and
        # prints "Ignoring invalid max threads value" on every mount; 10 is its old default.
        self._options = {"fsname": fsname, "subtype": fsname, "default_permissions": True,
                         "allow_other": allow_other, "max_idle_threads": 10}
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self.connection: int | None = None

    def mark_ready(self) -> None:
        """Called from the filesystem's init: the kernel handshake is done, requests flow."""
        self._ready.set()

    @property
    def mounted(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float) -> None:
        if self._thread is not None:
            raise FilesystemError(f"{self.mountpoint} is already mounted by this filesystem")
        if fuse_mounts_under(self.mountpoint):
            raise FilesystemError(f"{self.mountpoint} already has a FUSE mount: unmount it "
                                  "(fusermount3 -u) or choose another mountpoint")
        if not os.path.exists("/dev/fuse"):
            raise FilesystemError("/dev/fuse is missing: load the fuse kernel module")
        deadline = time.monotonic() + timeout
        # fuse_main changes the process's working directory to / before it serves: we put
        # the caller's back, or relative paths given by the user would name files under /.
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with _handlers_lock:
            saved = _save_handlers()
            self._thread = threading.Thread(
                target=self._serve, name=f"cloudletfs {self.mountpoint}", daemon=True
            )
            self._thread.start()
            try:
                while not self._ready.wait(0.05):
                    if not self._thread.is_alive() or time.monotonic() > deadline:
                        break
            finally:
                _restore_handlers(saved)
                os.fchdir(cwd)
                os.close(cwd)
        if not self._ready.is_set():
            error = self._error
            if self._thread.is_alive():
                self.stop(min(timeout, 10.0))
                raise FilesystemError(f"mounting {self.mountpoint} did not answer within "
                                      f"{timeout:g} s")
            self._thread = None
            raise FilesystemError(f"mounting {self.mountpoint} failed: {error or 'see the log'};"
                                  " is fuse3 (fusermount3) installed and /dev/fuse usable?")
        found = [conn for mp, conn in fuse_mounts_under(self.mountpoint) if mp == self.mountpoint]
        self.connection = found[0] if found else None
        log.info("mounted cloudletfs at %s (FUSE connection %s)", self.mountpoint, self.connection)

    def stop(self, timeout: float) -> None:
        """Unmount, bounded: plain unmount, else lazy unmount, else abort the connection.
        Requests still waiting must have been released by the caller first."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        self._stopping = True

        def left(share: float) -> float:
            return max(0.1, (deadline - time.monotonic()) * share)

        steps = [
            ("unmount", lambda: unmount_fuse(self.mountpoint, timeout=left(0.3))),
            ("lazy unmount", lambda: unmount_fuse(self.mountpoint, lazy=True, timeout=left(0.3))),
            ("abort", lambda: self.connection is not None
             and abort_fuse_connection(self.connection)),
        ]
        for i, (name, step) in enumerate(steps):
            if step():
                thread.join(left(0.5 if i < len(steps) - 1 else 1.0))
            if not thread.is_alive():
                break
            log.warning("cloudletfs at %s still served after %s", self.mountpoint, name)
        if thread.is_alive():
            raise FilesystemError(f"could not unmount {self.mountpoint} within {timeout:g} s; "
                                  f"try: fusermount3 -uz {self.mountpoint}")
        self._thread = None
        self._stopping = False
        log.info("unmounted cloudletfs at %s", self.mountpoint)

    def _serve(self) -> None:
        try:
            mfusepy.FUSE(self._ops, str(self.mountpoint), raw_fi=True, foreground=True,
                         **self._options)
        except BaseException as e:  # reported by start(), or logged if the mount was up
            self._error = e
            if self._ready.is_set() and not self._stopping:
                log.error("cloudletfs at %s stopped: %s", self.mountpoint, e)
