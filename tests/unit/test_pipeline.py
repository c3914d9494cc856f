"""The synthesis pipeline on real overlays, real files and a real HTTP server on 127.0.0.1."""

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from cloudlet import pipeline as pipeline_module
from cloudlet.chunks import CHUNK_SIZE, Target
from cloudlet.errors import CorruptOverlay, SourceError, SynthesisTimeout, VerificationFailed
from cloudlet.hashing import image_chunk_digests, tree_digest
from cloudlet.overlay.reader import OverlayReader
from cloudlet.overlay.writer import OverlayWriter
from cloudlet.pipeline import BaseImages, FileSink, FramePlan, Pipeline
from cloudlet.sources import AllowList, OverlaySource, StreamSource, open_source
from tests.rangeserver import RangeServer
from tests.unit.test_overlay_apply import BASE_ID, Scene, _digests, _noise

C = CHUNK_SIZE
WAIT = 120.0  # generous: CI is a loaded 2-core machine


class RecordingSink(FileSink):
    """A real FileSink that also records what the pipeline told it."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.applied: list[int] = []
        self.aborts: list[BaseException] = []
        self.commits = 0
        self.release = threading.Event()
        self.release.set()
        self.frame_writes = 0

    def write(self, target: Target, chunks: np.ndarray, data: np.ndarray) -> None:
        if threading.current_thread().name == "pipeline-apply":
            self.frame_writes += 1
            self.release.wait(WAIT)
        super().write(target, chunks, data)

    def frame_applied(self, index: int) -> None:
        self.applied.append(index)

    def abort(self, error: BaseException) -> None:
        self.aborts.append(error)
        super().abort(error)

    def commit(self) -> None:
        self.commits += 1
        super().commit()


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("pipeline-")]
    assert not left, f"threads left behind: {left}"


def _scene(root: Path, new_chunks: int = 40) -> Scene:
    """The apply tests' scene (every kind, partial chunks, grown and shrunk images) plus
    `new_chunks` chunks of noise in the disk, so there are many frames (4 slots each)."""
    scene = Scene(root)
    noise = _noise(7, new_chunks * C)
    size = max(len(scene.disk), (10 + new_chunks) * C + 123)
    disk = bytearray(scene.disk) + bytearray(size - len(scene.disk))
    disk[10 * C : (10 + new_chunks) * C] = noise
    scene.disk = bytes(disk)
    scene.build()
    return scene


def _base(scene: Scene) -> BaseImages:
    return BaseImages(
        scene.paths["base_disk"],
        image_chunk_digests(scene.paths["base_disk"]),
        scene.paths["base_memory"],
        image_chunk_digests(scene.paths["base_memory"]),
        BASE_ID,
    )


def _sink(scene: Scene, reader: OverlayReader, base: BaseImages) -> RecordingSink:
    sizes = {t: reader.images[t].size for t in Target}
    return RecordingSink(base, scene.out / "disk.raw", scene.out / "memory.img", sizes)


def _assert_result(scene: Scene) -> None:
    assert (scene.out / "disk.raw").read_bytes() == scene.disk
    assert (scene.out / "memory.img").read_bytes() == scene.mem


class Run:
    """A pipeline over `scene` through a source (or the reader alone), closed on exit."""

    def __init__(self, scene: Scene, source: OverlaySource | None = None, **kw: object) -> None:
        self.stream: BinaryIO | None = None
        if source is None:
            self.reader = OverlayReader.open(scene.overlay)
        else:
            self.stream = source.stream(0)
            self.reader = OverlayReader.open(self.stream, name=source.url)
        self.base = _base(scene)
        self.sink = _sink(scene, self.reader, self.base)
        self.pipeline = Pipeline(
            self.reader, source, self.base, self.sink, frames_stream=self.stream, **kw
        )

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipeline.close()
        self.reader.close()
        if self.stream is not None:
            self.stream.close()


# -- results ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["reader", "source"])
def test_pipeline_result_equals_apply_overlay(tmp_path: Path, how: str) -> None:
    scene = _scene(tmp_path)
    scene.apply()
    expected = {n: (scene.out / n).read_bytes() for n in ("disk.raw", "memory.img")}
    _assert_result(scene)
    scene.out = tmp_path / "out2"
    with open_source(scene.overlay) as source:
        with Run(scene, source if how == "source" else None) as run:
            run.pipeline.start()
            run.pipeline.wait(WAIT)
            status = run.pipeline.status()
    assert {n: (scene.out / n).read_bytes() for n in expected} == expected
    assert sorted(run.sink.applied) == list(range(len(run.reader.frames)))
    assert run.sink.commits == 1 and run.sink.aborts == []
    assert status["done"] and status["error"] is None
    assert status["frames_applied"] == status["frames_total"] == len(run.reader.frames) > 8
    assert status["bytes_fetched"] == status["bytes_total"]
    assert status["bytes_fetched_twice"] == 0 and status["demand_fetches"] == 0
    assert {"fetch", "verify", "decompress", "apply"} <= set(status["seconds"])


def test_frames_demanded_in_any_order_give_identical_images(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    with open_source(scene.overlay) as source, Run(scene, source, workers=1) as run:
        n = len(run.reader.frames)
        order = np.random.default_rng(3).permutation(n).tolist()
        for index in order:  # all claimed before the stream starts: it fetches nothing
            run.pipeline.demand(index)
        run.pipeline.start()
        run.pipeline.wait(WAIT)
        status = run.pipeline.status()
    _assert_result(scene)
    assert run.sink.applied == order  # one fetcher, one worker: as asked
    assert status["demand_fetches"] == n
    assert status["bytes_fetched"] == status["bytes_total"]


def test_demand_while_streaming_and_after_apply(tmp_path: Path) -> None:
    scene = _scene(tmp_path, new_chunks=80)
    with open_source(scene.overlay) as source, Run(scene, source) as run:
        n = len(run.reader.frames)
        run.sink.release.clear()  # hold the applier so demands meet frames in every state
        run.pipeline.start()
        for index in (n - 1, 0, n // 2, n - 1, 1):
            run.pipeline.demand(index)
        run.sink.release.set()
        run.pipeline.wait(WAIT)
        before = run.pipeline.status()
        for index in range(n):
            run.pipeline.demand(index)  # already applied: nothing happens
        after = run.pipeline.status()
    _assert_result(scene)
    assert sorted(run.sink.applied) == list(range(n))  # each frame exactly once
    assert after == before
    assert 1 <= before["demand_fetches"] <= 3
    with pytest.raises(ValueError, match=f"no frame {n}"):
        run.pipeline.demand(n)


@pytest.mark.parametrize("run_frames, twice", [(40, False), (2, True)])
def test_stream_skips_frames_taken_on_demand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_frames: int, twice: bool
) -> None:
    """A long run taken on demand is skipped with a new ranged stream; a short one is read
    through (and reported as fetched twice)."""
    scene = _scene(tmp_path, new_chunks=240)
    frames = OverlayReader.open(scene.overlay).frames
    monkeypatch.setattr(pipeline_module, "_RESEEK", 10 * max(fr.length for fr in frames))
    with open_source(scene.overlay) as inner:
        source = _Recording(inner)
        with Run(scene, source) as run:
            for index in range(5, 5 + run_frames):
                run.pipeline.demand(index)
            run.pipeline.start()
            run.pipeline.wait(WAIT)
            status = run.pipeline.status()
    _assert_result(scene)
    taken = sum(fr.length for fr in frames[5 : 5 + run_frames])
    if twice:
        assert source.streams == [0]
        assert status["bytes_fetched_twice"] == taken
    else:
        assert source.streams == [0, frames[5 + run_frames].offset]
        assert status["bytes_fetched_twice"] == 0
    assert status["bytes_fetched"] == status["bytes_total"] + status["bytes_fetched_twice"]


def test_frame_plan_supplied_matches_frame_rows(tmp_path: Path) -> None:
    reader = OverlayReader.open(_scene(tmp_path).overlay)
    plan = FramePlan.of(reader)
    for target in Target:
        chunks, frames = plan.supplied(target)
        got: dict[int, int] = {}
        for index in range(len(reader.frames)):
            for t, rows, _ in plan.frame_rows(index):
                if t == target:
                    got.update(dict.fromkeys(rows.tolist(), index))
        assert dict(zip(chunks.tolist(), frames.tolist(), strict=True)) == got
        assert len(chunks) > 0 and np.all(np.diff(chunks) > 0)


# -- failures --------------------------------------------------------------------------------


def test_corrupt_frame_mid_stream(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    bad = OverlayReader.open(scene.overlay).frames[5]
    data = bytearray(scene.overlay.read_bytes())
    data[bad.offset + 3] ^= 1
    scene.overlay.write_bytes(data)
    with open_source(scene.overlay) as source, Run(scene, source) as run:
        run.pipeline.start()
        with pytest.raises(CorruptOverlay, match="frame 5"):
            run.pipeline.wait(WAIT)
        assert len(run.sink.aborts) == 1 and run.sink.commits == 0
        assert "frame 5" in run.pipeline.status()["error"]
    scene.assert_no_output()


@pytest.mark.parametrize("extra", [b"", b"trailing bytes"])
def test_an_upload_must_end_with_its_overlay(tmp_path: Path, extra: bytes) -> None:
    """An upload longer than its overlay was never answered: nobody read the rest of it."""
    scene = _scene(tmp_path)
    read_fd, write_fd = os.pipe()
    data = scene.overlay.read_bytes() + extra
    writer = threading.Thread(target=_write_all, args=(write_fd, data))
    writer.start()
    with StreamSource(os.fdopen(read_fd, "rb")) as source, Run(scene, source) as run:
        run.pipeline.start()
        if extra:
            with pytest.raises(CorruptOverlay, match="upload goes on past the end of its overlay"):
                run.pipeline.wait(WAIT)
            assert run.sink.commits == 0
        else:
            run.pipeline.wait(WAIT)
            assert run.sink.commits == 1
    writer.join(WAIT)
    assert not writer.is_alive()


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError), os.fdopen(fd, "wb") as f:
        f.write(data)


def test_source_error_mid_stream_over_http(tmp_path: Path) -> None:
    """The server keeps cutting the connection at frame 6: resuming gives up, wait() raises."""
    scene = _scene(tmp_path)
    frames = OverlayReader.open(scene.overlay).frames
    with RangeServer(tmp_path) as srv:
        srv.faults.drop_at = frames[6].offset + 10
        url = srv.url(scene.overlay.name)
        with open_source(url, allow=AllowList.parse([srv.url()]), timeout=10) as source:
            with Run(scene, source) as run:
                run.pipeline.start()
                with pytest.raises(SourceError):
                    run.pipeline.wait(WAIT)
                assert not [t for t in threading.enumerate() if t.name.startswith("pipeline-")]
                assert len(run.sink.aborts) == 1
                assert run.pipeline.status()["frames_applied"] <= 6
    scene.assert_no_output()


def test_http_with_demand_fetches(tmp_path: Path) -> None:
    scene = _scene(tmp_path, new_chunks=80)
    with RangeServer(tmp_path) as srv:
        url = srv.url(scene.overlay.name)
        with open_source(url, allow=AllowList.parse([srv.url()]), timeout=10) as source:
            with Run(scene, source) as run:
                n = len(run.reader.frames)
                for index in (n - 1, n - 2, n // 2):
                    run.pipeline.demand(index)
                run.pipeline.start()
                run.pipeline.wait(WAIT)
                status = run.pipeline.status()
        ranges = [r for _, _, r in srv.requests if r]
    _assert_result(scene)
    assert sorted(run.sink.applied) == list(range(n))
    assert status["demand_fetches"] == 3
    assert len(ranges) >= 4  # the stream plus one range per demanded frame


def test_wait_timeout_raises_and_close_stops(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    with open_source(scene.overlay) as inner:
        source = _Recording(inner, stall_at=OverlayReader.open(scene.overlay).frames[3].offset)
        with Run(scene, source) as run:
            run.pipeline.start()
            with pytest.raises(SynthesisTimeout, match="frames applied"):
                run.pipeline.wait(0.5)
            assert not run.pipeline.status()["done"]
            source.unstall.set()
            run.pipeline.close()
            assert len(run.sink.aborts) == 1
    scene.assert_no_output()


def test_result_digest_mismatch(tmp_path: Path) -> None:
    scene = _scene(tmp_path)
    reader = OverlayReader.open(scene.overlay)
    liar = tmp_path / "liar.overlay"
    wrong = scene.disk[:-1] + b"?"
    with OverlayWriter(liar, BASE_ID) as w:
        w.set_image(Target.DISK, len(wrong), tree_digest(_digests(wrong)))
        w.set_image(Target.MEMORY, *reader.images[Target.MEMORY])
    scene.overlay = liar
    with Run(scene) as run:
        run.pipeline.start()
        with pytest.raises(VerificationFailed, match="disk"):
            run.pipeline.wait(WAIT)
        assert len(run.sink.aborts) == 1 and run.sink.commits == 0
    scene.assert_no_output()


# -- bounded memory --------------------------------------------------------------------------


def test_frames_in_flight_are_bounded(tmp_path: Path) -> None:
    """With the sink stuck, the stages fill their queues and stop fetching: the frames held
    between fetch and apply reach exactly the structural bound of a stalled pipeline."""
    scene = _scene(tmp_path, new_chunks=240)
    with open_source(scene.overlay) as source, Run(scene, source, workers=2) as run:
        p = run.pipeline
        n = len(run.reader.frames)
        depth = p._fetched.capacity
        assert depth == p._decoded.capacity == 4
        stalled = depth + p.workers + depth + 2  # queues, workers, applier, fetcher's next
        assert stalled < p.max_in_flight < n
        run.sink.release.clear()
        p.start()
        deadline = time.monotonic() + WAIT
        while p.status()["in_flight"] < stalled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.status()["in_flight"] == stalled
        fetched = p.status()["bytes_fetched"]
        assert fetched == sum(fr.length for fr in run.reader.frames[:stalled])
        run.sink.release.set()
        p.wait(WAIT)
        status = p.status()
        assert status["in_flight_max"] <= p.max_in_flight
        assert max(p._fetched.high_water, p._decoded.high_water) <= 2 * depth
    _assert_result(scene)


class _Recording(OverlaySource):
    """A real source that records the streams opened and can stall one at an offset (a network
    that stops sending, without waiting out a real timeout)."""

    def __init__(self, inner: OverlaySource, stall_at: int | None = None) -> None:
        self.inner = inner
        self.url = inner.url
        self.random_access = inner.random_access
        self.streams: list[int] = []
        self.stall_at = stall_at
        self.unstall = threading.Event()

    def size(self) -> int | None:
        return self.inner.size()

    def stream(self, offset: int = 0) -> BinaryIO:
        self.streams.append(offset)
        return _Stalling(self.inner.stream(offset), offset, self)  # type: ignore[return-value]

    def read_range(self, offset: int, length: int) -> bytes:
        return self.inner.read_range(offset, length)

    def clone(self) -> OverlaySource:
        return self.inner.clone()

    def close(self) -> None:
        self.inner.close()


class _Stalling:
    def __init__(self, f: BinaryIO, pos: int, owner: _Recording) -> None:
        self._f, self._pos, self._owner = f, pos, owner

    def read(self, n: int = -1) -> bytes:
        stall = self._owner.stall_at
        if stall is not None and self._pos + n > stall:
            assert self._owner.unstall.wait(WAIT)
            raise SourceError("connection reset (test)")
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._f.close()
