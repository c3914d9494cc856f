"""Direct QEMU adapter: launch a VM, talk QMP, drive its serial console, save and restore memory.

The guest-visible device set is derived only from a VMConfig, so a VM saved by one QemuVM and
restored by another always presents identical hardware. Memory is saved as a standard QEMU
migration stream (QMP `migrate` to a file descriptor) and restored with `-incoming defer` +
`migrate-incoming`, leaving the VM paused until `cont()`.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import functools
import http.client
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudlet.errors import (
    ConfigMismatch,
    GuestCommandFailed,
    GuestTimeout,
    HostCannotResume,
    HypervisorError,
)
from cloudlet.hashing import file_sha256
from cloudlet.hypervisor.config import (
    VMConfig,
    machine_types,
    qemu_binary,
    qemu_has_device,
    qemu_version,
    resolve_machine,
)
from cloudlet.hypervisor.qmp import QMPClient, QMPConnectionLost

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LOG = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
GUEST_MAC = "52:54:00:12:34:56"
CONSOLE_BUFFER_LIMIT = 8 << 20  # keep at most this much console text in memory
_EXIT_GRACE = 5.0  # seconds a QEMU whose QMP connection broke gets to finish exiting
# what a guest kernel prints when it has crashed or is about to (checked after a resume)
_KERNEL_CRASH = re.compile(
    rb"Kernel panic|kernel BUG at|BUG: |Oops: |general protection fault|exited with irqs disabled"
)
MIGRATION_BANDWIDTH = 1 << 40  # bytes/s: unlimited in practice (QEMU's default is 32 MiB/s)
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes

NIC_DEVICES = {"e1000": "e1000", "virtio": "virtio-net-pci", "rtl8139": "rtl8139"}
# Fixed PCI slots so the guest sees the same topology whatever else changes on the host.
VGA_SLOT, NIC_SLOT, DISK_SLOT, BALLOON_SLOT = 2, 3, 4, 5
MAIN_RAM_BLOCK = "pc.ram"  # the guest RAM block of QEMU's x86 pc and q35 machines


# --- accelerator -------------------------------------------------------------------------------


def detect_accel() -> str:
    """ "kvm" when KVM really works here, else "tcg"; $CLOUDLET_ACCEL overrides.

    /dev/kvm alone is not enough: on nested machines without vmx/svm it exists but guests hang.
    """
    forced = os.environ.get("CLOUDLET_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise HypervisorError(f"CLOUDLET_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
        return forced
    return "kvm" if _kvm_usable() else "tcg"


@functools.cache
def _kvm_usable() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = {
                flag
                for line in f
                if line.startswith("flags")
                for flag in line.partition(":")[2].split()
            }
    except OSError:
        return False
    if not flags & {"vmx", "svm"}:
        LOG.info("no vmx/svm CPU flag: using TCG")
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        LOG.info("cannot open /dev/kvm (%s): using TCG", exc)
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


# --- can this host resume a snapshot? ----------------------------------------------------------


def guest_devices(cfg: VMConfig) -> list[str]:
    """The QEMU device types a VM of `cfg` has (build_command's, or Nova's domain: nic_model
    "none" is a Nova server booted without a network, which has no NIC)."""
    devices = [] if cfg.nic_model == "none" else [NIC_DEVICES.get(cfg.nic_model, cfg.nic_model)]
    devices.append({"virtio": "virtio-blk-pci", "ide": "ide-hd"}.get(cfg.disk_bus, cfg.disk_bus))
    if cfg.balloon:
        devices.append("virtio-balloon-pci")
    if cfg.display == "std":
        devices.append("VGA")
    return devices


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def check_host_can_resume(
    cfg: VMConfig, saved_by: Sequence[str | None], what: str, binary: str | None = None
) -> None:
    """Raise HostCannotResume unless this host's QEMU can load a snapshot of `cfg`.

    `saved_by` holds the versions of the QEMUs that wrote the snapshot's streams (None for
    layouts recorded before cloudlet kept it: then only the machine type and devices are
    checked). QEMU loads streams of its own or older versions for a machine type it offers; a
    newer QEMU's stream into an older one is not something cloudlet tests, so it is refused.
    Cheap (cached `-machine help`, `-device NAME,help`, `--version`): call it before fetching
    anything big.
    """
    binary = binary or qemu_binary()
    here = qemu_version(binary)
    known = sorted((v for v in saved_by if v is not None), key=_version_tuple)
    saved = f" (saved by QEMU {known[-1]})" if known else ""
    hint = "use a host (or CLOUDLET_QEMU) with a QEMU that offers it"
    if cfg.machine not in machine_types(binary):
        raise HostCannotResume(
            f"{what} needs QEMU machine type {cfg.machine!r}{saved}, which this host's QEMU "
            f"{here} ({binary}) does not offer: {hint}"
        )
    missing = [d for d in guest_devices(cfg) if not qemu_has_device(binary, d)]
    if missing:
        raise HostCannotResume(
            f"{what} needs QEMU devices {missing}{saved}, which this host's QEMU {here} "
            f"({binary}) does not offer: {hint}"
        )
    if known and _version_tuple(known[-1]) > _version_tuple(here):
        raise HostCannotResume(
            f"{what} was saved by QEMU {known[-1]}, newer than this host's QEMU {here} "
            f"({binary}): a QEMU only loads snapshots of its own or older versions; use a host "
            f"with QEMU >= {known[-1]}"
        )


# --- launch description ------------------------------------------------------------------------


@dataclass
class Forward:
    """A host port forwarded to a guest port through QEMU user networking."""

    proto: str
    host_port: int
    guest_port: int
    host_addr: str = "127.0.0.1"

    @classmethod
    def parse(cls, text: str) -> Forward:
        """'tcp:8080:80' or 'tcp:127.0.0.1:8080:80' (proto:[host_addr:]host_port:guest_port)."""
        parts = text.split(":")
        try:
            if len(parts) == 3:
                return cls(parts[0], int(parts[1]), int(parts[2]))
            if len(parts) == 4:
                return cls(parts[0], int(parts[2]), int(parts[3]), host_addr=parts[1])
        except ValueError:
            pass
        raise ValueError(f"bad forward {text!r}: expected proto:[host_addr:]host_port:guest_port")

    def __post_init__(self) -> None:
        if self.proto not in ("tcp", "udp"):
            raise ValueError(f"forward protocol must be tcp or udp, not {self.proto!r}")

    def hostfwd(self) -> str:
        return f"{self.proto}:{self.host_addr}:{self.host_port}-:{self.guest_port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (for tests; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LaunchSpec:
    """Everything needed to start one QEMU process.

    Only `config` decides what the guest sees; the rest (paths, forwards, VNC) is host-side.
    """

    config: VMConfig
    disk: Path
    disk_format: str
    run_dir: Path
    kernel: Path | None = None
    initrd: Path | None = None
    forwards: list[Forward] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)  # host-side only: no guest devices
    vnc: str | None = None  # -vnc argument; the config has no display device, so mostly empty
    incoming: Path | None = None  # migration stream to restore; VM stays paused until cont()
    accel: str | None = None  # None: detect_accel()
    restrict_net: bool = True  # guest cannot reach out through user networking; forwards work
    # Map guest RAM privately from this file (memory-backend-file, share=off) instead of
    # anonymous memory: pages are read when the guest first touches them, and guest writes
    # never reach the file. Early start points it at cloudletfs.
    ram_file: Path | None = None


def _check_boot_files(spec: LaunchSpec) -> None:
    """The kernel/initrd given must be the ones the config (and so the snapshot) names."""
    cfg = spec.config
    for name, path, want in (
        ("kernel", spec.kernel, cfg.kernel_sha256),
        ("initrd", spec.initrd, cfg.initrd_sha256),
    ):
        if want is None and path is not None:
            raise ConfigMismatch(f"a {name} was given but the VM config has no {name}_sha256")
        if want is not None:
            if path is None:
                raise ConfigMismatch(f"the VM config boots a {name} (sha256 {want}); pass it")
            got = file_sha256(Path(path))
            if got != want:
                raise ConfigMismatch(
                    f"{name} {path} has sha256 {got}, the VM config expects {want}"
                )


def build_command(
    spec: LaunchSpec, qmp_sock: Path, console_sock: Path, binary: str | None = None
) -> list[str]:
    """The qemu-system command line for `spec` (device set derived from spec.config only)."""
    binary = binary or qemu_binary()
    cfg = spec.config
    if resolve_machine(cfg.machine, binary) != cfg.machine:
        raise ConfigMismatch(
            f"machine {cfg.machine!r} is an alias; store the concrete type "
            f"{resolve_machine(cfg.machine, binary)!r} (see resolve_machine)"
        )
    accel = spec.accel or detect_accel()
    run_dir = Path(spec.run_dir)
    machine = f"{cfg.machine},accel={accel}"
    ram: list[str] = []
    if spec.ram_file is not None:
        # The backend's id becomes the RAM block's name: keep the one the snapshot was saved
        # with, so the migration stream's block list matches.
        ram = [
            "-object",
            f"memory-backend-file,id={MAIN_RAM_BLOCK},mem-path={_opt(Path(spec.ram_file))},"
            f"size={cfg.memory_mib}M,share=off,prealloc=off",
        ]
        machine += f",memory-backend={MAIN_RAM_BLOCK}"
    args = [
        binary,
        "-nodefaults",
        "-no-user-config",
        "-name",
        "cloudlet",
        "-msg",
        "timestamp=on",
        *ram,
        "-machine",
        machine,
        "-cpu",
        cfg.cpu,
        "-smp",
        str(cfg.vcpus),
        "-m",
        f"{cfg.memory_mib}M",
        "-chardev",
        f"socket,id=console0,path={_opt(console_sock)},server=on,wait=off,"
        f"logfile={_opt(run_dir / 'console.log')},logappend=on",
        "-serial",
        "chardev:console0",
        "-chardev",
        f"socket,id=qmp0,path={_opt(qmp_sock)},server=on,wait=off",
        "-mon",
        "chardev=qmp0,mode=control",
    ]
    args += ["-display", "none"]
    if cfg.display == "std":
        args += ["-device", f"VGA,id=video0,addr={VGA_SLOT:#x}"]
    if spec.vnc:
        args += ["-vnc", spec.vnc]
    if spec.kernel is not None:
        args += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            args += ["-initrd", str(spec.initrd)]
        if cfg.append is not None:
            args += ["-append", cfg.append]
    # Disk.
    args += [
        "-drive",
        f"file={_opt(Path(spec.disk))},format={spec.disk_format},if=none,id=drive0,cache=writeback",
    ]
    boot = ",bootindex=1" if spec.kernel is None else ""
    if cfg.disk_bus == "virtio":
        args += ["-device", f"virtio-blk-pci,id=disk0,drive=drive0,addr={DISK_SLOT:#x}{boot}"]
    elif cfg.disk_bus == "ide":
        args += ["-device", f"ide-hd,id=disk0,drive=drive0,bus=ide.0,unit=0{boot}"]
    else:
        raise HypervisorError(f"unsupported disk_bus {cfg.disk_bus!r} (virtio or ide)")
    # NIC on user networking, with the requested host forwards.
    if cfg.nic_model not in NIC_DEVICES:
        raise HypervisorError(f"unsupported nic_model {cfg.nic_model!r} ({sorted(NIC_DEVICES)})")
    netdev = "user,id=net0"
    if spec.restrict_net:
        netdev += ",restrict=on"
    for fwd in spec.forwards:
        netdev += f",hostfwd={fwd.hostfwd()}"
    args += [
        "-netdev",
        netdev,
        "-device",
        f"{NIC_DEVICES[cfg.nic_model]},id=nic0,netdev=net0,mac={GUEST_MAC},addr={NIC_SLOT:#x}",
    ]
    if cfg.balloon:
        args += [
            "-object",
            "iothread,id=iothread0",
            "-device",
            "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=iothread0,"
            f"addr={BALLOON_SLOT:#x}",
        ]
    if spec.incoming is not None:
        args += ["-S", "-incoming", "defer"]
    args += list(spec.extra_args)
    return args


def _opt(path: Path) -> str:
    """A path as a QEMU option value (commas are doubled)."""
    return str(path).replace(",", ",,")


# --- the VM ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the forked child: QEMU gets SIGKILL when the process that started it dies.

    A killed `cloudlet` must not leave a guest running that nothing will ever stop. (The signal
    follows the *thread* that started QEMU: launch long-lived VMs from a long-lived thread.)
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Kill a QEMU process if it still runs (finalizer: never leave one behind)."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


class QemuVM:
    """One running QEMU process. Use as a context manager: leaving it always ends QEMU."""

    def __init__(
        self,
        spec: LaunchSpec,
        proc: subprocess.Popen[bytes],
        qmp_sock: Path,
        console_sock: Path,
        sock_dir: Path | None,
    ) -> None:
        self.spec = spec
        self.run_dir = Path(spec.run_dir)
        self.proc = proc
        self.qmp = QMPClient(qmp_sock)
        self._console_sock_path = console_sock
        self._sock_dir = sock_dir
        self._console: socket.socket | None = None
        self._con_buf = bytearray()
        self._con_base = 0  # absolute offset of _con_buf[0] (the buffer is trimmed at the front)
        self._con_cond = threading.Condition()
        self._con_closed = False
        self._reader: threading.Thread | None = None
        self._cmd_lock = threading.Lock()  # one run_in_guest at a time on the console
        self._qmp_lock = threading.RLock()  # QMPClient is not thread-safe
        self._finalizer = weakref.finalize(self, _terminate, proc)

    # -- lifecycle

    @classmethod
    def launch(cls, spec: LaunchSpec, binary: str | None = None, timeout: float = 30.0) -> QemuVM:
        """Start QEMU for `spec` (default qemu_binary()), connect QMP and the console; start a
        restore if incoming."""
        binary = binary or qemu_binary()
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not Path(spec.disk).exists():
            raise HypervisorError(f"disk image {spec.disk} does not exist")
        if spec.incoming is not None and not Path(spec.incoming).exists():  # a file or a FIFO
            raise HypervisorError(f"memory stream {spec.incoming} does not exist")
        _check_boot_files(spec)
        sock_dir = None
        if len(str(run_dir / "console.sock")) > _SOCKET_PATH_MAX:
            sock_dir = Path(tempfile.mkdtemp(prefix="cloudlet-"))
        base = sock_dir or run_dir
        qmp_sock, console_sock = base / "qmp.sock", base / "console.sock"
        for p in (qmp_sock, console_sock):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        args = build_command(spec, qmp_sock, console_sock, binary)
        LOG.info("starting QEMU: %s", " ".join(args))
        (run_dir / "console.log").unlink(missing_ok=True)
        with open(run_dir / "qemu.log", "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=run_dir,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise HypervisorError(f"cannot start {binary}: {exc}") from exc
        vm = cls(spec, proc, qmp_sock, console_sock, sock_dir)
        try:
            vm._connect(timeout)
            if spec.incoming is not None:
                vm._start_incoming(Path(spec.incoming), timeout)
        except BaseException:
            vm.kill()
            raise
        return vm

    def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.qmp.path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise HypervisorError(f"QEMU did not create {self.qmp.path}: {self._log_tail()}")
            time.sleep(0.02)
        try:
            self.qmp.connect(max(1.0, deadline - time.monotonic()), check=self._check_alive)
        except HypervisorError:
            # a QEMU that is exiting resets the connection before it can be reaped: give it a
            # moment, so the error is its own words rather than the broken socket's
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(_EXIT_GRACE)
            self._check_alive()
            raise
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self._console_sock_path))
        except OSError as exc:
            sock.close()
            raise HypervisorError(f"cannot connect to the serial console: {exc}") from exc
        sock.settimeout(0.5)
        self._console = sock
        self._reader = threading.Thread(target=self._read_console, name="qemu-console", daemon=True)
        self._reader.start()

    def __enter__(self) -> QemuVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """Quit QEMU (kill it if it does not quit in time) and release sockets."""
        if not self._finalizer.alive:
            return  # already killed
        if self.alive():
            try:
                self.quit(timeout)
            except HypervisorError as exc:
                LOG.warning("QEMU did not quit cleanly (%s); killing it", exc)
        self.kill()

    def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to exit; kill it if it has not exited within `timeout`."""
        if self.alive():
            with contextlib.suppress(HypervisorError):
                self.qmp.execute("quit", timeout=timeout)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("QEMU pid %d ignored quit for %.0f s; killing it", self.pid, timeout)
        self.kill()

    def kill(self) -> None:
        """End QEMU now (SIGKILL) and release everything; safe to call more than once."""
        _terminate(self.proc)
        self._finalizer.detach()
        self._release()

    def _release(self) -> None:
        self.qmp.close()
        self._con_closed = True
        if self._console is not None:
            with contextlib.suppress(OSError):
                self._console.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    # -- errors

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.run_dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return "(no qemu.log)"
        own = text.rsplit("\n--- ", 1)[-1].split("\n", 1)[-1]  # this launch, minus its header
        tail = [ln for ln in own.splitlines() if ln.strip()][-lines:]
        return " | ".join(tail) if tail else "(qemu.log is empty)"

    def _check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            # QEMU's own words, not the log's path: a failed run's directory is removed
            raise HypervisorError(f"QEMU exited with status {code}: {self._log_tail()}")

    def _qmp(self, command: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        """A QMP command; if QEMU died meanwhile, say so (with its log) instead."""
        self._check_alive()
        try:
            with self._qmp_lock:
                return self.qmp.execute(command, arguments, **kw)
        except QMPConnectionLost:
            # QEMU closes QMP a moment before it exits: give it time, then quote its log.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            self._check_alive()
            raise
        except HypervisorError:
            self._check_alive()
            raise

    # -- run state

    def status(self) -> str:
        """QEMU's run state: "running", "paused", "inmigrate", "postmigrate", ..."""
        return self._qmp("query-status")["status"]

    def pause(self) -> None:
        self._qmp("stop")

    def cont(self) -> None:
        self._qmp("cont")

    # -- memory save / restore

    def save_memory(
        self, path: Path, timeout: float = 300.0, live: bool = False, converge: float = 10.0
    ) -> None:
        """Write the VM's memory + device state as a QEMU migration stream to `path`.

        live=False stops the guest first. live=True copies RAM while the guest runs, so that a
        virtio-balloon with free-page hinting can tell QEMU which pages are free and they are
        not sent at all; if the copy has not converged after `converge` seconds the guest is
        paused so it finishes. Either way the VM ends paused. The stream is written to
        `path`.part and renamed only once QEMU reports the migration completed, so a failed
        save never leaves a complete-looking file.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        if self.status() == "postmigrate":
            raise HypervisorError(
                "this VM's memory was already saved and QEMU will not save it again while it is "
                "paused; resume it with cont() first"
            )
        if not live:
            self.pause()
        self._qmp("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        ok = False
        started = time.monotonic()
        try:
            try:
                self._qmp("getfd", {"fdname": "cloudlet-save"}, fds=[fd])
            finally:
                os.close(fd)
            self._qmp("migrate", {"uri": "fd:cloudlet-save"})
            info = None
            if live:
                try:
                    info = self._wait_migration(converge, outgoing=True, cancel=False)
                except GuestTimeout:
                    LOG.info("live save not converged after %.0f s: pausing the guest", converge)
                    self.pause()
            if info is None:
                info = self._wait_migration(timeout, outgoing=True)
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            ok = True
            LOG.info(
                "saved memory to %s: %d bytes in %.2f s (QEMU: %s ms)",
                path,
                path.stat().st_size,
                time.monotonic() - started,
                info.get("total-time"),
            )
        finally:
            if not ok:
                tmp.unlink(missing_ok=True)

    def _wait_migration(
        self, timeout: float, outgoing: bool, cancel: bool = True
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            info = self._qmp("query-migrate")
            state = info.get("status")
            if state == "completed":
                return info
            if state in ("failed", "cancelled"):
                desc = info.get("error-desc", "no reason given")
                raise HypervisorError(
                    f"QEMU migration {'to file' if outgoing else 'from file'} {state}: {desc}; "
                    f"qemu.log ends: {self._log_tail(5)}"
                )
            if time.monotonic() > deadline:
                if outgoing and cancel:
                    with contextlib.suppress(HypervisorError):
                        self._qmp("migrate_cancel")
                raise GuestTimeout(
                    f"QEMU migration still {state!r} after {timeout:.0f} s "
                    f"({info.get('ram', {}).get('transferred', '?')} bytes of RAM moved)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _start_incoming(self, path: Path, timeout: float) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._qmp("getfd", {"fdname": "cloudlet-incoming"}, fds=[fd], timeout=timeout)
        finally:
            os.close(fd)
        self._qmp("migrate-incoming", {"uri": "fd:cloudlet-incoming"}, timeout=timeout)

    def wait_incoming(self, timeout: float = 300.0) -> None:
        """Wait until the restore from LaunchSpec.incoming has finished; the VM is then paused."""
        if self.spec.incoming is None:
            raise HypervisorError("this VM was not launched with an incoming memory image")
        deadline = time.monotonic() + timeout
        self._wait_migration(timeout, outgoing=False)
        while (state := self.status()) == "inmigrate":
            if time.monotonic() > deadline:
                raise GuestTimeout(f"VM still in state {state!r} {timeout:.0f} s after restore")
            time.sleep(0.01)
        LOG.info("restored memory from %s; VM is %s", self.spec.incoming, state)

    # -- serial console

    def _read_console(self) -> None:
        sock = self._console
        assert sock is not None
        while not self._con_closed:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._con_cond:
                self._con_buf += data
                excess = len(self._con_buf) - CONSOLE_BUFFER_LIMIT
                if excess > 0:
                    del self._con_buf[:excess]
                    self._con_base += excess
                self._con_cond.notify_all()
        with self._con_cond:
            self._con_closed = True
            self._con_cond.notify_all()

    def console_output(self) -> str:
        """Everything the guest printed on its serial console since this QEMU started."""
        try:
            return (self.run_dir / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _console_send(self, data: bytes) -> None:
        if self._console is None:
            raise HypervisorError("serial console is not connected")
        try:
            self._console.sendall(data)
        except OSError as exc:
            self._check_alive()
            raise HypervisorError(f"cannot write to the serial console: {exc}") from exc

    def _console_end(self) -> int:
        with self._con_cond:
            return self._con_base + len(self._con_buf)

    def _wait_console(
        self, pattern: re.Pattern[bytes], start: int, deadline: float
    ) -> tuple[int, int, re.Match[bytes]]:
        """Wait for `pattern` in console output after absolute offset `start`.

        Returns the absolute (start, end) offsets of the match, and the match itself.
        """
        with self._con_cond:
            while True:
                begin = max(0, start - self._con_base)
                m = pattern.search(self._con_buf, begin)
                if m:
                    return m.start() + self._con_base, m.end() + self._con_base, m
                self._check_alive()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._con_closed:
                    tail = bytes(self._con_buf[-300:]).decode(errors="replace")
                    raise GuestTimeout(
                        f"guest console did not show {pattern.pattern!r} in time; "
                        f"last output: {tail!r}"
                    )
                self._con_cond.wait(min(remaining, 0.5))

    def run_in_guest(self, script: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run shell text on the guest's serial console shell; return its stdout+stderr.

        The script travels base64-encoded in short lines (the line editor caps line length), is
        run by `sh` with stdin from /dev/null, and its output is cut out between two markers that
        never appear in the echoed input. With check=True a non-zero exit raises
        GuestCommandFailed.
        """
        token = secrets.token_hex(6)
        tmp = f"/tmp/.cloudlet-{token}"
        b64 = base64.b64encode(script.encode()).decode()
        chunks = [b64[i : i + 384] for i in range(0, len(b64), 384)] or [""]
        final = (
            f"printf '%s-%s\\n' CLB {token}; base64 -d {tmp}.b64 >{tmp}.sh && "
            f"sh {tmp}.sh </dev/null 2>&1; r=$?; rm -f {tmp}.b64 {tmp}.sh; "
            f"printf '\\n%s-%s-%s\\n' CLE {token} $r\n"
        )
        deadline = time.monotonic() + timeout
        with self._cmd_lock:
            try:
                for i, chunk in enumerate(chunks[:-1]):
                    start = self._console_end()
                    self._console_send(
                        f"echo {chunk} >>{tmp}.b64; printf '%s-%s-%d\\n' CLA {token} {i}\n".encode()
                    )
                    ack = re.compile(f"CLA-{token}-{i}\r?\n".encode())
                    self._wait_console(ack, start, deadline)
                start = self._console_end()
                self._console_send(f"echo {chunks[-1]} >>{tmp}.b64; {final}".encode())
                _, out_start, _ = self._wait_console(
                    re.compile(f"CLB-{token}\r?\n".encode()), start, deadline
                )
                out_end, _, end = self._wait_console(
                    re.compile(f"\r?\nCLE-{token}-(\\d+)\r?\n".encode()), out_start, deadline
                )
            except GuestTimeout:
                with contextlib.suppress(HypervisorError):
                    self._console_send(b"\x03")  # interrupt whatever still runs
                raise
            with self._con_cond:
                off = self._con_base
                if out_start < off:
                    raise HypervisorError(
                        f"guest command output exceeded {CONSOLE_BUFFER_LIMIT} bytes"
                    )
                raw = bytes(self._con_buf[out_start - off : out_end - off])
        output = raw.decode(errors="replace").replace("\r\n", "\n")
        rc = int(end.group(1))
        if check and rc != 0:
            raise GuestCommandFailed(
                f"guest command exited with status {rc}: {output[-500:]!r}", rc, output
            )
        return output

    # -- readiness

    def wait_ready(
        self,
        marker: str | None = None,
        port: int | None = None,
        timeout: float = 120.0,
        probe: bytes = b"HEAD / HTTP/1.0\r\n\r\n",
    ) -> float:
        """Wait until `marker` shows on the console and/or host `port` answers; return seconds.

        A forwarded port accepts connections even when nothing listens in the guest (QEMU does
        the accept), so "answering" means the guest replied to `probe` with at least one byte.
        """
        if marker is None and port is None:
            raise ValueError("wait_ready needs a marker, a port, or both")
        started = time.monotonic()
        deadline = started + timeout
        while marker is not None and marker not in self.console_output():
            self._check_alive()
            if time.monotonic() > deadline:
                tail = self.console_output()[-500:]
                raise GuestTimeout(
                    f"guest did not print {marker!r} within {timeout:.0f} s; console ends: {tail!r}"
                )
            time.sleep(0.05)
        while port is not None and not _port_answers(port, probe, min(2.0, timeout)):
            self._check_alive()
            if time.monotonic() > deadline:
                tail = self.console_output()[-500:]
                raise GuestTimeout(
                    f"nothing in the guest answered on host port {port} within {timeout:.0f} s; "
                    f"console ends: {tail!r}"
                )
            time.sleep(0.05)
        return time.monotonic() - started


    def wait_alive(
        self, settle: float = 5.0, timeout: float = 30.0, console_answers: bool = True
    ) -> float:
        """After a resume: the guest must still run `settle` seconds on, show no kernel crash on
        its console, and (`console_answers`: it has a serial console) answer Enter there, with
        an echo or a prompt, within `timeout`. Returns seconds taken; HypervisorError saying
        what went wrong (with the console's end)."""
        started = time.monotonic()

        def refuse(why: str) -> HypervisorError:
            tail = bytes(self._con_buf[-500:]).decode(errors="replace")
            return HypervisorError(f"{why}; console ends: {tail!r}")

        deadline = started + settle
        with self._con_cond:
            while True:
                crash = _KERNEL_CRASH.search(self._con_buf)
                if crash is not None:
                    raise refuse(f"the guest kernel crashed after the resume ({crash[0].decode()})")
                if not self.alive():
                    raise refuse(f"QEMU exited with status {self.proc.poll()} after the resume")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._con_cond.wait(min(remaining, 0.2))
        state = self.status()
        if state != "running":
            raise refuse(f"the guest is {state!r}, not running, after the resume")
        if not console_answers:
            return time.monotonic() - started
        mark = self._console_end()
        self._console_send(b"\r")
        try:
            self._wait_console(re.compile(rb"[\s\S]"), mark, time.monotonic() + timeout)
        except GuestTimeout:
            why = f"the guest's console did not answer Enter within {timeout:.0f} s"
            raise refuse(why) from None
        with self._con_cond:
            crash = _KERNEL_CRASH.search(self._con_buf)
        if crash is not None:
            raise refuse(f"the guest kernel crashed after the resume ({crash[0].decode()})")
        return time.monotonic() - started


def _port_answers(port: int, probe: bytes, timeout: float, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if probe:
                s.sendall(probe)
            return bool(s.recv(1))
    except TimeoutError:
        return not probe  # no probe: a connection held open counts as answering
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, None):
            LOG.debug("probe of port %d: %s", port, exc)
        return False


def http_get(port: int, path: str = "/", timeout: float = 10.0, host: str = "127.0.0.1") -> str:
    """GET http://host:port/path and return the body (raises HypervisorError unless 200)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        raise HypervisorError(f"HTTP GET {host}:{port}{path} failed: {exc}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise HypervisorError(f"HTTP GET {host}:{port}{path}: status {resp.status}: {body[:200]}")
    return body
