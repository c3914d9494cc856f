"""$CLOUDLET_HOME: where one machine keeps its base VMs, overlays, VM run directories and registry.

Everything lives under one private directory (0700) so that staging directories in `tmp/` share
a filesystem with `bases/`: a finished base is published with one atomic rename.
"""

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from cloudlet.fsutil import detach_mounts_under

log = logging.getLogger(__name__)

ENV_VAR = "CLOUDLET_HOME"
DEFAULT_HOME = "~/.cloudlet"
_MODE = 0o700


class CloudletHome:
    """The directory layout under $CLOUDLET_HOME (default ~/.cloudlet), created on first use.

    path/
      registry.sqlite   the base-VM registry (cloudlet.basevm.store)
      bases/<id>/       one directory per registered base VM
      overlays/         overlays made or fetched on this machine
      runs/             one directory per running VM (sockets, COW disks, logs)
      tmp/              staging for imports and captures; same filesystem as bases/
    """

    def __init__(self, path: Path | str | None = None) -> None:
        if path is None:
            path = os.environ.get(ENV_VAR) or DEFAULT_HOME
        self.path = Path(path).expanduser().absolute()
        for d in (self.path, self.bases, self.overlays, self.runs, self.tmp):
            _make_private_dir(d)

    def __repr__(self) -> str:
        return f"CloudletHome({str(self.path)!r})"

    @property
    def root(self) -> Path:
        return self.path

    @property
    def bases(self) -> Path:
        return self.path / "bases"

    @property
    def overlays(self) -> Path:
        return self.path / "overlays"

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def registry(self) -> Path:
        return self.path / "registry.sqlite"

    def base_dir(self, base_id: str) -> Path:
        return self.bases / base_id

    def sweep(self) -> list[Path]:
        """Remove what dead processes left in runs/ and tmp/ (their stale FUSE mounts too);
        a server does this at start, not only when its first synthesis needs a run dir."""
        return remove_orphans(self.runs) + remove_orphans(self.tmp)

    def make_staging_dir(self, prefix: str = "staging-") -> Path:
        """A fresh private directory under tmp/, renameable into bases/ atomically."""
        return self._owned_dir(self.tmp, prefix)

    def new_run_dir(self, prefix: str) -> Path:
        """A fresh private directory under runs/ for one VM (sockets, COW disk, logs)."""
        return self._owned_dir(self.runs, f"{prefix}-")

    def _owned_dir(self, parent: Path, prefix: str) -> Path:
        """mkdtemp whose name records its owner process, after sweeping dead owners' dirs.

        A `cloudlet` killed mid-way (SIGKILL, power loss) cannot clean up after itself; the next
        one that needs scratch space removes what dead processes left behind.
        """
        remove_orphans(parent)
        pid = os.getpid()
        return Path(
            tempfile.mkdtemp(prefix=f"{prefix}{_OWNER_TAG}{pid}.{_start_time(pid)}.", dir=parent)
        )


_OWNER_TAG = "pid"
_OWNER_RE = re.compile(_OWNER_TAG + r"(\d+)\.(\d+)\.")


def _start_time(pid: int) -> int:
    """The process start time (clock ticks since boot), so a reused pid is not taken for its
    predecessor; 0 if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def remove_orphans(parent: Path) -> list[Path]:
    """Remove entries of `parent` whose owner process (named in the entry) no longer runs."""
    removed = []
    for entry in parent.iterdir():
        m = _OWNER_RE.search(entry.name)
        if not m or _start_time(int(m.group(1))) == int(m.group(2)):
            continue
        log.info("removing %s, left behind by process %s", entry, m.group(1))
        if entry.is_dir() and not entry.is_symlink():
            detach_mounts_under(entry)  # a dead owner's cloudletfs mount blocks the removal
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _make_private_dir(path: Path) -> None:
    """Create `path` with mode 0700; tighten an existing directory we own that is more open."""
    try:
        path.mkdir(mode=_MODE, parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a directory should be
        raise NotADirectoryError(f"{path} exists and is not a directory") from e
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        log.info("tightening permissions of %s to 0700", path)
        path.chmod(_MODE)
