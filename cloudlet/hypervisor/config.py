"""What a memory snapshot depends on: the guest-visible hardware and the boot payload.

A QEMU migration stream only restores into a VM with the same machine type, RAM size, CPU model
and devices. VMConfig records exactly that, is stored next to every base VM, and is compared
before a restore so a mismatch fails with a clear message instead of a QEMU load error.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

from cloudlet.errors import ConfigMismatch, HypervisorError

LOG = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
QEMU_ENV = "CLOUDLET_QEMU"


def qemu_binary() -> str:
    """The qemu-system-x86_64 cloudlet runs: $CLOUDLET_QEMU, else the one on PATH.

    The one place that decides it, so a host (or a test run) can use a QEMU installed beside
    the distribution's (tools/qemu-backports/install.sh writes such a wrapper). Firmware and
    libraries are that binary's business: a wrapper passes -L / LD_LIBRARY_PATH itself.
    """
    return os.environ.get(QEMU_ENV) or QEMU_BINARY


def qemu_img_binary() -> str:
    """qemu-img of the same QEMU: the one beside $CLOUDLET_QEMU if there is one, else PATH's."""
    chosen = os.environ.get(QEMU_ENV)
    if chosen:
        beside = os.path.join(os.path.dirname(chosen), "qemu-img")
        if os.access(beside, os.X_OK):
            return beside
    return "qemu-img"


_VERSION_LINE = re.compile(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)")


@functools.cache
def qemu_version(binary: str) -> str:
    """The QEMU version, e.g. "10.0.2", from `binary --version` (recorded in bases)."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise HypervisorError(f"cannot run {binary} --version: {exc}") from exc
    m = _VERSION_LINE.search(out)
    if not m:
        raise HypervisorError(f"{binary} --version does not name a QEMU version: {out[:200]!r}")
    return ".".join(m.groups())


DISPLAYS = frozenset({"none", "std"})


@dataclass(frozen=True)
class VMConfig:
    """Guest-visible configuration of a VM; two VMs with equal configs can share memory images."""

    machine: str  # concrete machine type, e.g. "pc-i440fx-7.2" (never an alias like "pc")
    memory_mib: int
    vcpus: int = 1
    cpu: str = "qemu64"
    disk_bus: str = "virtio"
    nic_model: str = "e1000"
    balloon: bool = True  # virtio-balloon-pci with free-page-hint=on
    display: str = "none"  # "std": a VGA card, for humans on --vnc; "none": serial console only
    kernel_sha256: str | None = None  # direct kernel boot; None when the disk boots itself
    initrd_sha256: str | None = None
    append: str | None = None

    def __post_init__(self) -> None:
        if self.memory_mib <= 0 or self.vcpus <= 0:
            raise ValueError(f"memory_mib and vcpus must be positive: {self}")
        if self.display not in DISPLAYS:
            raise ValueError(f"display must be one of {sorted(DISPLAYS)}, not {self.display!r}")
        if self.initrd_sha256 is not None and self.kernel_sha256 is None:
            raise ValueError(
                "initrd_sha256 is set but kernel_sha256 is not (initrd needs a kernel)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMConfig:
        """Build from a dict as written by to_dict(); unknown or missing keys are an error."""
        if not isinstance(data, dict):
            raise ConfigMismatch(f"VM config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown keys {unknown}")
            if missing:
                parts.append(f"missing keys {missing}")
            raise ConfigMismatch(
                "VM config is not one this cloudlet version understands: " + "; ".join(parts)
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigMismatch(f"invalid VM config: {exc}") from exc

    def differences(self, other: VMConfig) -> list[str]:
        """One 'field: ours != theirs' line per differing field."""
        out = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: {a!r} != {b!r}")
        return out

    def check_compatible(self, other: VMConfig) -> None:
        """Raise ConfigMismatch naming every field where `other` differs from this config.

        `self` is the config the snapshot was saved with, `other` the VM it would restore into.
        """
        diffs = self.differences(other)
        if diffs:
            raise ConfigMismatch(
                "VM configuration differs from the one the memory snapshot was saved with "
                "(saved != requested): " + "; ".join(diffs)
            )


_MACHINE_LINE = re.compile(r"^(\S+)\s+.*?\(alias of (\S+)\)\s*$")


@functools.cache
def _machine_table(binary: str) -> tuple[dict[str, str], frozenset[str]]:
    """(alias -> concrete machine type, all machine names) from `qemu -machine help`."""
    try:
        out = subprocess.run(
            [binary, "-machine", "help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise HypervisorError(f"cannot list QEMU machine types with {binary}: {exc}") from exc
    aliases: dict[str, str] = {}
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        if not line.strip():
            continue
        names.add(line.split()[0])
        m = _MACHINE_LINE.match(line)
        if m:
            aliases[m.group(1)] = m.group(2)
    return aliases, frozenset(names)


def machine_types(binary: str) -> frozenset[str]:
    """Every machine type (and alias) `binary` offers."""
    return _machine_table(binary)[1]


@functools.cache
def qemu_has_device(binary: str, device: str) -> bool:
    """Whether `binary` offers device type `device` (`-device NAME,help`).

    Asked one device at a time: `-device help` loads every module of the build, and a QEMU
    unpacked beside the system's then finds the system's modules and aborts.
    """
    try:
        done = subprocess.run(
            [binary, "-device", f"{device},help"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise HypervisorError(f"cannot ask {binary} about device {device}: {exc}") from exc
    return done.returncode == 0 and "not found" not in done.stderr


def resolve_machine(alias: str, binary: str | None = None) -> str:
    """The concrete machine type behind an alias ("pc" -> "pc-i440fx-7.2").

    Aliases move with QEMU upgrades; a snapshot must name the versioned type it was saved on.
    """
    binary = binary or qemu_binary()
    aliases, names = _machine_table(binary)
    if alias in aliases:
        return aliases[alias]
    if alias in names:
        return alias
    raise HypervisorError(
        f"QEMU ({binary}) has no machine type {alias!r}; see `{binary} -machine help`"
    )
