"""The distribution guest (tools/distroguest/build.sh) for tests and benchmarks: building it,
making a base of it, and its customisation, which installs the notes application from .deb
files over ssh, as a user customises a cloud VM, and writes state through the application.
"""

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cloudlet.basevm.create import BaseSpec, Readiness, create_base
from cloudlet.basevm.store import BaseVM
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.qemu import Forward, QemuVM, free_port
from cloudlet.stats import Stats
from cloudlet.vm import HostOptions

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "tools" / "distroguest" / "build.sh"
BOOT_TIMEOUT = 600.0  # TCG boot of systemd on a loaded 2-core machine: ~25 s idle
APP_TIMEOUT = 300.0  # dpkg -i of nginx and the application, then its first answer
NOTES = ("written during customisation", "kept in sqlite on the guest's disk")


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "cloudlet" / "distroguest"
    return Path(os.environ.get("CLOUDLET_DISTRO_GUEST_DIR", default))


def build(timeout: float = 1800) -> Path:
    """Build the guest if its recipe changed (a few seconds when cached); its directory."""
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(cache_dir())],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{BUILD_SCRIPT} took more than {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class DistroGuest:
    """One built guest: its directory and guest.json."""

    path: Path
    info: dict

    @classmethod
    def load(cls, path: Path) -> "DistroGuest":
        return cls(path, json.loads((path / "guest.json").read_text()))

    def file(self, key: str) -> Path:
        return self.path / self.info[key]

    def create_args(self) -> list[str]:
        """`cloudlet base create` arguments after the disk, except readiness and forwards."""
        return [
            "--kernel", str(self.file("kernel")), "--initrd", str(self.file("initrd")),
            "--append", self.info["append"], "--memory", str(self.info["memory_mib"]),
            "--nic", self.info["nic"],
        ]  # fmt: skip

    def create_base(self, home: CloudletHome, name: str = "distro") -> BaseVM:
        """A base VM of this guest in `home`, snapshotted once its sshd answers."""
        port = free_port()
        spec = BaseSpec(
            disk=self.file("disk"),
            name=name,
            memory_mib=self.info["memory_mib"],
            nic_model=self.info["nic"],
            kernel=self.file("kernel"),
            initrd=self.file("initrd"),
            append=self.info["append"],
            host=HostOptions([Forward("tcp", port, self.info["ready_port"])]),
        )
        return create_base(home, spec, Readiness(port=port, timeout=BOOT_TIMEOUT), Stats())

    def ssh(self, port: int, command: str, timeout: float = APP_TIMEOUT) -> str:
        """Run `command` as root in the guest through host port `port` (forwarded to its 22)."""
        return _run(["ssh", *self._ssh_options(), "-p", str(port),
                     f"{self.info['ssh_user']}@127.0.0.1", command], timeout)  # fmt: skip

    def copy_debs(self, port: int, dest: str = "/root/debs") -> None:
        _run(["scp", *self._ssh_options(), "-P", str(port), "-r", str(self.file("debs")),
              f"{self.info['ssh_user']}@127.0.0.1:{dest}"], APP_TIMEOUT)  # fmt: skip

    def _ssh_options(self) -> list[str]:
        # the host key is the image's own and the port a fresh one: nothing to remember
        return [
            "-i", str(self.file("ssh_key")), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR",
        ]  # fmt: skip


@dataclass
class NotesCustomisation:
    """Installs the notes application from the guest's .deb files over ssh and adds NOTES
    through it; `answer` is what it answered then (its `instance` lives only in RAM)."""

    guest: DistroGuest
    ssh_port: int
    app_port: int
    answer: dict | None = None

    def host(self) -> HostOptions:
        return HostOptions([
            Forward("tcp", self.ssh_port, self.guest.info["ready_port"]),
            Forward("tcp", self.app_port, self.guest.info["app_port"]),
        ])  # fmt: skip

    def __call__(self, vm: QemuVM) -> None:
        try:
            self.guest.copy_debs(self.ssh_port)
            self.guest.ssh(self.ssh_port, "dpkg -i /root/debs/*.deb && rm -r /root/debs")
            get_notes(self.app_port)  # nginx and the application have started
            for note in NOTES:
                post_note(self.app_port, note)
            self.answer = get_notes(self.app_port)
        except (RuntimeError, OSError) as exc:
            tail = vm.console_output()[-2000:]
            raise RuntimeError(f"customising the guest failed: {exc}\nconsole: {tail}") from exc


def post_note(port: int, text: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=text.encode())
    with urllib.request.urlopen(request, timeout=APP_TIMEOUT) as r:
        if r.status != 201:
            raise RuntimeError(f"POST a note: HTTP {r.status}")


def get_notes(port: int, timeout: float = APP_TIMEOUT) -> dict:
    """The application's answer on host `port`, waiting (bounded) until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                return json.loads(r.read())
        except OSError:  # refused, reset, or nginx's 502 until the application listens
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{argv[0]} took more than {timeout:.0f} s: {argv[-1]}") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} {argv[-1]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout
