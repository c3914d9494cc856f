"""Access-ordered overlays: slots ranked by a synthesis trace, same results byte for byte."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloudlet.chunks import CHUNK_SIZE, Kind, Target
from cloudlet.cli.main import main
from cloudlet.errors import AccessTraceError
from cloudlet.overlay.order import load_trace, rank_slots, reorder_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet.overlay.writer import OverlayWriter
from tests.unit.test_overlay_apply import BASE_ID, Scene
from tests.unit.test_overlay_format import write_sample

C = CHUNK_SIZE

# Scene's capture (memory first, then disk) numbers its slots:
#   0 memory 8 (disk 5 is SELF of it) | 1..5 memory 9..13 (memory 15 is SELF of 10 = slot 2)
#   6 memory 20 (partial) | 7 disk 4 (disk 6 is SELF) | 8 disk 45 | 9 disk 60 (partial)
TRACE = [
    {"t": 0.01, "image": "disk.raw", "chunk": 0, "op": "read"},  # ZERO: needs no slot
    {"t": 0.05, "image": "disk.raw", "chunk": 30, "op": "read"},  # untouched chunk
    {"t": 0.1, "image": "disk.raw", "chunk": 5, "op": "read"},  # SELF -> slot 0
    {"t": 0.2, "image": "memory.img", "chunk": 15, "op": "write"},  # SELF -> slot 2
    {"t": 0.2, "image": "disk.raw", "chunk": 60, "op": "read"},  # slot 9, ties with slot 2
    {"t": 3.0, "image": "memory.img", "chunk": 15, "op": "read"},  # later access: ignored
    {"t": 5.0, "image": "memory.img", "chunk": 8, "op": "read"},  # slot 0 again, later
]
EXPECTED_ORDER = [0, 2, 9, 1, 3, 4, 5, 6, 7, 8]


def write_trace(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def contents(reader: OverlayReader) -> dict[tuple[int, int], tuple[int, object]]:
    """(target, chunk) -> (kind, what it holds): payload bytes for NEW/SELF, else the ref."""
    payload = b"".join(raw for _, raw in reader.iter_frames())
    out: dict[tuple[int, int], tuple[int, object]] = {}
    for target, kind, chunk, ref in reader.chunk_map.tolist():
        if kind in (Kind.NEW, Kind.SELF):
            out[(target, chunk)] = (kind, payload[ref * C : (ref + 1) * C])
        else:
            out[(target, chunk)] = (kind, ref)
    return out


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    s = Scene(tmp_path)
    s.build()
    return s


def test_reorder_puts_accessed_slots_first_and_applies_identically(
    scene: Scene, tmp_path: Path
) -> None:
    trace_path = write_trace(tmp_path / "trace.jsonl", TRACE)
    out = tmp_path / "ordered.overlay"
    with OverlayReader.open(scene.overlay) as reader:
        assert rank_slots(reader, load_trace(trace_path))[0].tolist() == EXPECTED_ORDER
        info = reorder_overlay(reader, load_trace(trace_path), out)
        before = contents(reader)
        images, blobs = reader.images, {n: reader.blob(n) for n in reader.blob_names}
    with OverlayReader.open(out) as ordered:
        assert ordered.base_id == BASE_ID and ordered.images == images
        assert {n: ordered.blob(n) for n in ordered.blob_names} == blobs
        assert contents(ordered) == before  # every chunk holds what it held
        slot_of = {(t, c): ref for t, k, c, ref in ordered.chunk_map.tolist() if k == Kind.NEW}
        assert [slot_of[(Target.MEMORY, 8)], slot_of[(Target.MEMORY, 10)]] == [0, 1]
        assert slot_of[(Target.DISK, 60)] == 2
        assert [slot_of[(Target.MEMORY, c)] for c in (9, 11, 12, 13, 20)] == [3, 4, 5, 6, 7]
        # the accessed prefix ends on a frame boundary, the rest keeps the frame size
        assert [fr.slot_count for fr in ordered.frames] == [3, 4, 3]
        order = ordered.meta["access_order"]
        assert order == {
            "accessed_slots": 3,
            "prefix_frames": 1,
            "prefix_bytes": ordered.frames[0].length,
            "trace_sha256": hashlib.sha256(trace_path.read_bytes()).hexdigest(),
        }
        assert info.access_order == order
    assert sorted(os.listdir(tmp_path)) == sorted(["base", "vm.overlay", "trace.jsonl", out.name])

    results = {}
    for name, path in (("capture", scene.overlay), ("ordered", out)):
        scene.out = tmp_path / name
        scene.apply(OverlayReader.open(path))  # verifies both result digests
        results[name] = [(scene.out / f).read_bytes() for f in ("disk.raw", "memory.img")]
    assert results["ordered"] == results["capture"] == [scene.disk, scene.mem]


def test_trace_touching_no_slot_keeps_capture_order(scene: Scene, tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", TRACE[:2])
    out = tmp_path / "same.overlay"
    with OverlayReader.open(scene.overlay) as reader:
        reorder_overlay(reader, load_trace(trace), out)
        with OverlayReader.open(out) as ordered:
            assert np.array_equal(ordered.chunk_map, reader.chunk_map)
            assert contents(ordered) == contents(reader)
            assert ordered.meta["access_order"]["accessed_slots"] == 0
            assert ordered.meta["access_order"]["prefix_frames"] == 0


def test_reordering_an_ordered_overlay_replaces_its_order(scene: Scene, tmp_path: Path) -> None:
    first, second = tmp_path / "first.overlay", tmp_path / "second.overlay"
    with OverlayReader.open(scene.overlay) as reader:
        reorder_overlay(reader, load_trace(write_trace(tmp_path / "a", TRACE)), first)
    late = [{"t": 1, "image": "disk.raw", "chunk": 45}]
    with OverlayReader.open(first) as reader:
        reorder_overlay(reader, load_trace(write_trace(tmp_path / "b", late)), second)
        with OverlayReader.open(second) as again:
            assert contents(again) == contents(reader)
            assert again.meta["access_order"]["accessed_slots"] == 1
            assert [fr.slot_count for fr in again.frames] == [1, 4, 4, 1]


def test_trace_past_the_image_end_is_refused(scene: Scene, tmp_path: Path) -> None:
    """Memory is 20 chunks + 700 bytes: chunk 21 cannot exist (another overlay's trace)."""
    trace = write_trace(
        tmp_path / "t.jsonl", [*TRACE, {"t": 1, "image": "memory.img", "chunk": 21}]
    )
    out = tmp_path / "ordered.overlay"
    with OverlayReader.open(scene.overlay) as reader:
        with pytest.raises(AccessTraceError, match=r"memory\.img chunk 21.*has 21 chunks"):
            reorder_overlay(reader, load_trace(trace), out)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "ordered" in p]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"t": 1, "image": "disk.qcow2", "chunk": 3}', r"line 2 names image 'disk.qcow2'.*disk"),
        ('{"t": 1, "chunk": 3}', r"line 2 names image None"),
        ("not json", r"line 2 is not JSON"),
        ("[1, 2]", r"line 2 is not a JSON object"),
        ('{"t": 1, "image": "disk.raw", "chunk": -1}', r"line 2: chunk -1"),
        ('{"t": 1, "image": "disk.raw", "chunk": 1.5}', r"line 2: chunk 1.5"),
        ('{"t": "soon", "image": "disk.raw", "chunk": 1}', r"line 2: time 'soon'"),
    ],
)
def test_malformed_traces_are_refused(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(TRACE[0]) + "\n" + line + "\n")
    with pytest.raises(AccessTraceError, match=message):
        load_trace(path)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(AccessTraceError, match="cannot read access trace"):
        load_trace(tmp_path / "nope.jsonl")


def test_reorder_keeps_codec_and_level(tmp_path: Path) -> None:
    src = tmp_path / "xz.overlay"
    write_sample(src, codec="xz", level=1)
    trace = load_trace(write_trace(tmp_path / "t", [{"t": 0, "image": "disk.raw", "chunk": 40}]))
    with OverlayReader.open(src) as reader:
        assert reader.stats["codec"] == {"name": "xz", "level": 1}
        reorder_overlay(reader, trace, tmp_path / "out.overlay")
        reorder_overlay(reader, trace, tmp_path / "zstd.overlay", codec="zstd", level=9)
        with OverlayReader.open(tmp_path / "out.overlay") as ordered:
            assert ordered.stats["codec"] == {"name": "xz", "level": 1}
            assert {fr.codec for fr in ordered.frames} <= {"xz", "none"}
            assert contents(ordered) == contents(reader)
            assert ordered.chunk_map[ordered.chunk_map["chunk"] == 40]["ref"].tolist() == [0]
        with OverlayReader.open(tmp_path / "zstd.overlay") as other:  # create --access-order
            assert other.stats["codec"] == {"name": "zstd", "level": 9}


def test_cli_reorder_and_show(scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trace = write_trace(tmp_path / "trace.jsonl", TRACE)
    out = tmp_path / "ordered.overlay"
    home = ["--home", str(tmp_path / "home")]
    argv = [*home, "overlay", "reorder", str(scene.overlay), "--trace", str(trace), "-o", str(out)]
    assert main(argv) == 0
    assert "3 of 10 slots accessed, in the first 1 of 3 frames" in capsys.readouterr().out
    assert main([*home, "overlay", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "access order 3 accessed slots in the first 1 frames" in shown
    assert hashlib.sha256(trace.read_bytes()).hexdigest()[:16] in shown
    assert main([*home, "overlay", "show", str(scene.overlay)]) == 0
    assert "access order" not in capsys.readouterr().out  # capture order: nothing to say

    bad = write_trace(tmp_path / "bad.jsonl", [{"t": 0, "image": "vda", "chunk": 1}])
    argv[-3] = str(bad)
    assert main(argv) == 2
    assert "names image 'vda'" in capsys.readouterr().err


_REORDER_CHILD = """
import sys
def status(key):  # kB; VmHWM is this process's own peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
from pathlib import Path
from cloudlet.overlay.order import load_trace, reorder_overlay
from cloudlet.overlay.reader import OverlayReader
root = Path(sys.argv[1])
trace = load_trace(root / "trace.jsonl")
start = status("VmRSS:")
with OverlayReader.open(root / "big.overlay") as reader:
    reorder_overlay(reader, trace, root / "ordered.overlay")
print((status("VmHWM:") - start) // 1024)
"""


def test_reorder_streams_in_bounded_memory(tmp_path: Path) -> None:
    """64 MiB of incompressible payload, every slot accessed in reverse: RSS stays small."""
    slots = 16384
    rng = np.random.default_rng(7)
    with OverlayWriter(tmp_path / "big.overlay", "ab" * 32) as w:
        w.set_image(Target.DISK, slots * C, "00" * 32)
        w.set_image(Target.MEMORY, 0, hashlib.sha256(b"").hexdigest())
        for chunk in range(slots):
            w.add_new(Target.DISK, chunk, rng.bytes(C))
        w.close()
    entries = [{"t": slots - c, "image": "disk.raw", "chunk": c} for c in range(slots)]
    write_trace(tmp_path / "trace.jsonl", entries)
    result = subprocess.run(
        [sys.executable, "-c", _REORDER_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 48, f"peak RSS grew by {result.stdout.strip()} MiB"
    with OverlayReader.open(tmp_path / "ordered.overlay") as ordered:
        assert ordered.slot_count == slots
        last = ordered.read_frame(0)[:C]
        with OverlayReader.open(tmp_path / "big.overlay") as big:
            assert last == big.read_frame(len(big.frames) - 1)[-C:]
