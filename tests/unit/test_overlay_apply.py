"""Applying an overlay onto real base image files, and refusing every bad input cleanly."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloudlet.chunks import CHUNK_SIZE, Kind, Target, chunk_count
from cloudlet.errors import CorruptOverlay, TruncatedOverlay, VerificationFailed, WrongBase
from cloudlet.hashing import image_chunk_digests, tree_digest
from cloudlet.index import ChunkIndex
from cloudlet.overlay.apply import apply_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet.overlay.writer import OverlayWriter

BASE_ID = "b0" * 32
C = CHUNK_SIZE


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + C] for i in range(0, len(data), C)]


def _noise(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def build_overlay(
    path: Path, base_disk: bytes, base_mem: bytes, disk: bytes, mem: bytes, **kw: object
) -> dict[Target, dict[Kind, int]]:
    """A reference capture: classify every chunk of the results against the bases."""
    base_index: dict[bytes, tuple[Kind, int]] = {}
    for kind, image in ((Kind.BASE_DISK, base_disk), (Kind.BASE_MEMORY, base_mem)):
        for i, c in enumerate(_chunks(image)):
            base_index.setdefault(c, (kind, i))
    seen: dict[bytes, int] = {}
    with OverlayWriter(path, BASE_ID, frame_size=4 * C, **kw) as w:
        for target, result, base in (
            (Target.MEMORY, mem, base_mem),
            (Target.DISK, disk, base_disk),
        ):
            w.set_image(target, len(result), tree_digest(_digests(result)))
            old = _chunks(base)
            for i, c in enumerate(_chunks(result)):
                if i < len(old) and old[i] == c:
                    continue
                if c == bytes(len(c)) and len(c) == C:
                    w.add_ref(target, i, Kind.ZERO)
                elif c in base_index:
                    w.add_ref(target, i, *base_index[c])
                elif c in seen:
                    w.add_ref(target, i, Kind.SELF, seen[c])
                else:
                    seen[c] = w.add_new(target, i, c)
        w.add_blob("vm-config", b"{}")
        info = w.close()
    return info.chunks


def _digests(data: bytes) -> np.ndarray:
    rows = [np.frombuffer(hashlib.sha256(c).digest(), np.uint8) for c in _chunks(data)]
    return np.array(rows, dtype=np.uint8).reshape(len(rows), 32)


class Scene:
    """Base images on disk plus wanted results; every kind on both targets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base_disk = _noise(1, 48 * C + 300)  # partial last chunk
        self.base_mem = _noise(2, 32 * C)
        disk = bytearray(self.base_disk[: 40 * C]) + bytearray(20 * C + 123)  # grows, partial
        disk[0:C] = bytes(C)  # ZERO
        disk[2 * C : 3 * C] = self.base_mem[5 * C : 6 * C]  # BASE_MEMORY
        disk[3 * C : 4 * C] = self.base_disk[30 * C : 31 * C]  # BASE_DISK
        disk[4 * C : 6 * C] = _noise(3, 2 * C)  # NEW
        disk[6 * C : 7 * C] = disk[4 * C : 5 * C]  # SELF within the disk
        disk[45 * C : 46 * C] = _noise(4, C)  # NEW past the base end
        disk[-123:] = b"e" * 123  # NEW partial last chunk
        mem = bytearray(self.base_mem[: 20 * C] + b"m" * 700)  # shrinks, partial
        mem[C : 2 * C] = bytes(C)  # ZERO
        mem[3 * C : 4 * C] = self.base_disk[7 * C : 8 * C]  # BASE_DISK
        mem[4 * C : 5 * C] = self.base_mem[31 * C : 32 * C]  # BASE_MEMORY
        mem[8 * C : 9 * C] = disk[5 * C : 6 * C]  # SELF across targets
        mem[9 * C : 14 * C] = _noise(5, 5 * C)  # NEW, spans frames
        mem[15 * C : 16 * C] = mem[10 * C : 11 * C]  # SELF within the memory
        self.disk, self.mem = bytes(disk), bytes(mem)
        self.paths = {
            "base_disk": root / "base" / "disk.raw",
            "base_memory": root / "base" / "memory.img",
        }
        self.paths["base_disk"].parent.mkdir()
        self.paths["base_disk"].write_bytes(self.base_disk)
        self.paths["base_memory"].write_bytes(self.base_mem)
        self.out = root / "out"
        self.overlay = root / "vm.overlay"

    def build(self, **kw: object) -> dict[Target, dict[Kind, int]]:
        return build_overlay(self.overlay, self.base_disk, self.base_mem, self.disk, self.mem, **kw)

    def apply(self, reader: OverlayReader | None = None, base_id: str = BASE_ID, **kw: object):  # noqa: ANN201
        return apply_overlay(
            reader or OverlayReader.open(self.overlay),
            base_disk=self.paths["base_disk"],
            base_disk_digests=image_chunk_digests(self.paths["base_disk"]),
            base_memory=self.paths["base_memory"],
            base_memory_digests=image_chunk_digests(self.paths["base_memory"]),
            out_disk=self.out / "disk.raw",
            out_memory=self.out / "memory.img",
            expected_base_id=base_id,
            **kw,
        )

    def assert_no_output(self) -> None:
        assert not self.out.exists() or os.listdir(self.out) == []


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    return Scene(tmp_path)


def test_apply_rebuilds_both_images(scene: Scene) -> None:
    counts = scene.build()
    for target in Target:
        assert all(counts[target][k] > 0 for k in Kind), counts  # every kind, both targets
    events: list[tuple[str, int, int]] = []
    stats = scene.apply(progress=lambda *e: events.append(e))
    assert (scene.out / "disk.raw").read_bytes() == scene.disk
    assert (scene.out / "memory.img").read_bytes() == scene.mem
    assert sorted(os.listdir(scene.out)) == ["disk.raw", "memory.img"]
    assert stats.chunks == counts
    assert stats.raw_bytes == OverlayReader.open(scene.overlay).slot_count * C
    assert {"copy", "apply base", "apply frames", "decompress", "verify"} <= set(
        stats.stage_seconds()
    )
    assert events[-1][0] == "frames" and events[-1][1] == events[-1][2]


def test_apply_from_a_pipe(scene: Scene) -> None:
    scene.build(codec="xz")
    with subprocess.Popen(["cat", str(scene.overlay)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        scene.apply(OverlayReader.open(proc.stdout))
        proc.wait(timeout=30)
    assert (scene.out / "disk.raw").read_bytes() == scene.disk
    assert (scene.out / "memory.img").read_bytes() == scene.mem


def test_identical_result_needs_no_chunks(scene: Scene) -> None:
    scene.disk, scene.mem = scene.base_disk, scene.base_mem
    scene.build()
    assert len(OverlayReader.open(scene.overlay).chunk_map) == 0
    scene.apply()
    assert (scene.out / "disk.raw").read_bytes() == scene.base_disk


def test_output_stays_sparse(tmp_path: Path) -> None:
    """A mostly empty 64 MiB base disk does not become 64 MiB of allocated blocks."""
    scene = Scene(tmp_path)
    big = scene.paths["base_disk"]
    with open(big, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(scene.base_disk[: 8 * C])
    scene.base_disk = big.read_bytes()
    scene.disk = scene.base_disk[:C] + _noise(9, C) + scene.base_disk[2 * C :]
    scene.build()
    scene.apply()
    out = scene.out / "disk.raw"
    assert out.stat().st_size == 64 << 20
    assert out.stat().st_blocks * 512 < 8 << 20
    assert out.read_bytes() == scene.disk


# -- failures: the specific error, and never an output file ----------------------------------


def test_wrong_base(scene: Scene) -> None:
    scene.build()
    with pytest.raises(WrongBase, match=BASE_ID):
        scene.apply(base_id="c1" * 32)
    assert not scene.out.exists()


def test_bad_result_digest(scene: Scene) -> None:
    scene.build()
    scene.disk = scene.disk[:-1] + b"?"  # the overlay promises a digest it cannot give
    data = scene.disk
    with OverlayWriter(scene.root / "liar.overlay", BASE_ID) as w:
        r = OverlayReader.open(scene.overlay)
        w.set_image(Target.DISK, len(data), tree_digest(_digests(data)))
        w.set_image(Target.MEMORY, *r.images[Target.MEMORY])
    with pytest.raises(VerificationFailed, match="disk"):
        scene.apply(OverlayReader.open(scene.root / "liar.overlay"))
    scene.assert_no_output()


def test_base_differs_from_its_index(scene: Scene) -> None:
    scene.build()
    reader = OverlayReader.open(scene.overlay)
    digests = image_chunk_digests(scene.paths["base_disk"])
    with open(scene.paths["base_disk"], "r+b") as f:  # damage a chunk the overlay copies
        f.seek(30 * C)
        f.write(b"rot")
    with pytest.raises(VerificationFailed):
        apply_overlay(
            reader,
            scene.paths["base_disk"],
            digests,
            scene.paths["base_memory"],
            image_chunk_digests(scene.paths["base_memory"]),
            scene.out / "disk.raw",
            scene.out / "memory.img",
            BASE_ID,
        )
    scene.assert_no_output()


def test_flipped_bit_in_frame(scene: Scene) -> None:
    scene.build()
    fr = OverlayReader.open(scene.overlay).frames[-1]
    data = bytearray(scene.overlay.read_bytes())
    data[fr.offset + 5] ^= 1
    scene.overlay.write_bytes(data)
    with pytest.raises(CorruptOverlay, match=f"frame {fr.index}"):
        scene.apply()
    scene.assert_no_output()


def test_truncated_stream(scene: Scene) -> None:
    scene.build()
    data = scene.overlay.read_bytes()
    with subprocess.Popen(
        ["head", "-c", str(len(data) - 7), str(scene.overlay)], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        reader = OverlayReader.open(proc.stdout)  # a pipe cannot tell its length up front
        with pytest.raises(TruncatedOverlay):
            scene.apply(reader)
        proc.wait(timeout=30)
    scene.assert_no_output()


def test_ref_past_the_base_end_is_corrupt(scene: Scene) -> None:
    with OverlayWriter(scene.overlay, BASE_ID) as w:
        w.set_image(Target.DISK, len(scene.base_disk), "00" * 32)
        w.set_image(Target.MEMORY, len(scene.base_mem), "00" * 32)
        w.add_ref(Target.DISK, 0, Kind.BASE_MEMORY, chunk_count(len(scene.base_mem)))
    with pytest.raises(CorruptOverlay, match="memory chunk 32"):
        scene.apply()
    assert not scene.out.exists()


def test_existing_outputs_survive_a_failed_apply(scene: Scene) -> None:
    scene.build()
    scene.out.mkdir()
    (scene.out / "disk.raw").write_bytes(b"previous")
    with pytest.raises(WrongBase):
        scene.apply(base_id="c1" * 32)
    assert os.listdir(scene.out) == ["disk.raw"]
    assert (scene.out / "disk.raw").read_bytes() == b"previous"


_APPLY_CHILD = """
import sys
def status(key):  # kB; VmHWM is this process's own peak (ru_maxrss inherits the parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
from pathlib import Path
from cloudlet.index import ChunkIndex
from cloudlet.overlay.apply import apply_overlay
from cloudlet.overlay.reader import OverlayReader
root = Path(sys.argv[1])
start = status("VmRSS:")
apply_overlay(
    OverlayReader.open(root / "vm.overlay"),
    root / "disk.raw",
    ChunkIndex.load(root / "idx", "disk").digests,
    root / "memory.img",
    ChunkIndex.load(root / "idx", "memory").digests,
    root / "out" / "disk.raw",
    root / "out" / "memory.img",
    sys.argv[2],
)
peak = status("VmHWM:")
print((peak - start) // 1024)
"""


def test_applying_onto_a_big_base_needs_bounded_memory(tmp_path: Path) -> None:
    """A grown 8 GiB disk (64 MiB of digests) is synthesized and verified in bounded RSS."""
    base = {Target.DISK: tmp_path / "disk.raw", Target.MEMORY: tmp_path / "memory.img"}
    sizes = {Target.DISK: (8 << 30) + 100, Target.MEMORY: (1 << 30) - C}
    noise = _noise(11, 40 * C)
    for target, size in ((Target.DISK, 8 << 30), (Target.MEMORY, 1 << 30)):
        with open(base[target], "wb") as f:
            f.truncate(size)
            f.seek(size // 3 // C * C)
            f.write(noise)
        ChunkIndex.build(base[target], tmp_path / "idx", target.name.lower())
    writes = {  # chunk -> content, per target: NEW, SELF, BASE_* and ZERO chunks
        Target.DISK: {7: noise[:C], 9: noise[:C], 1 << 20: noise[5 * C : 6 * C]},
        Target.MEMORY: {3: noise[C : 2 * C], (1 << 18) // 3 + 1: bytes(C)},
    }
    with OverlayWriter(tmp_path / "vm.overlay", BASE_ID) as w:
        for target, chunks in writes.items():
            digests = np.load(tmp_path / "idx" / f"{target.name.lower()}.digests.npy")
            n = chunk_count(sizes[target])
            full = np.empty((n, 32), np.uint8)  # the base's digests, cut or extended with zeros
            m = min(n, len(digests))
            full[:m] = digests[:m]
            full[m:] = np.frombuffer(hashlib.sha256(bytes(C)).digest(), np.uint8)
            for chunk, content in chunks.items():
                full[chunk] = np.frombuffer(hashlib.sha256(content).digest(), np.uint8)
            if target is Target.DISK:  # the grown image ends in a partial zero chunk
                full[-1] = np.frombuffer(hashlib.sha256(bytes(100)).digest(), np.uint8)
            w.set_image(target, sizes[target], tree_digest(full))
        w.add_new(Target.DISK, 7, noise[:C])
        w.add_ref(Target.DISK, 9, Kind.SELF, 0)
        w.add_ref(Target.DISK, 1 << 20, Kind.BASE_MEMORY, (1 << 18) // 3 + 5)  # noise chunk 5
        w.add_ref(Target.MEMORY, 3, Kind.BASE_DISK, (2 << 20) // 3 + 1)  # noise chunk 1
        w.add_ref(Target.MEMORY, (1 << 18) // 3 + 1, Kind.ZERO)
        w.add_blob("vm-config", b"{}")
        w.close()
    result = subprocess.run(
        [sys.executable, "-c", _APPLY_CHILD, str(tmp_path), BASE_ID],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 24, f"peak RSS grew by {result.stdout.strip()} MiB"
    with open(tmp_path / "out" / "disk.raw", "rb") as f:
        assert os.fstat(f.fileno()).st_size == sizes[Target.DISK]
        assert os.pread(f.fileno(), 3 * C, 7 * C) == noise[:C] + bytes(C) + noise[:C]
        assert os.pread(f.fileno(), C, (1 << 20) * C) == noise[5 * C : 6 * C]
