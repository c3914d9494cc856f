"""Per-instance cloudlet state: one JSON file in the instance directory.

The driver keeps nothing only in memory: whether an instance came from a cloudlet image, which
base and memory image it restores from, and whether that restore already happened all survive
a nova-compute restart, and vanish with the instance directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cloudlet.fsutil import fsync_dir

FILE_NAME = "cloudlet.json"
WORK_DIR = "cloudlet"  # synthesized images and the restore's save file, inside the instance dir
VERSION = 1


@dataclass
class InstanceState:
    kind: str  # glance.Kind value of the image booted: base-disk or overlay
    image_id: str
    base_id: str
    disk: str  # raw image the root disk's qcow2 is layered over
    memory: str  # flat memory image to restore from
    layout: str  # its memory.layout
    restore_pending: bool = True  # False once the guest has been restored: reboots cold-boot
    cpu: str | None = None  # the base's VMConfig.cpu: a named model pins the domain's CPU
    version: int = VERSION


def path(instance_dir: Path) -> Path:
    return Path(instance_dir) / FILE_NAME


def work_dir(instance_dir: Path) -> Path:
    return Path(instance_dir) / WORK_DIR


def load(instance_dir: Path) -> InstanceState | None:
    """The state of the instance, or None when it was not booted from a cloudlet image."""
    try:
        data = json.loads(path(instance_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    names = {f.name for f in dataclasses.fields(InstanceState)}
    return InstanceState(**{k: v for k, v in data.items() if k in names})


def save(instance_dir: Path, state: InstanceState) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves the old or the new state."""
    target = path(instance_dir)
    tmp = target.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(state), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
