"""Early start and network synthesis on real QEMU guests (TCG), real FUSE mounts and a real HTTP
server on 127.0.0.1 (tests/rangeserver.py, which can also slow, cut or corrupt what it serves).
"""

import json
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cloudlet.errors import CloudletError, CorruptOverlay
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.qemu import Forward, free_port
from cloudlet.overlay.reader import OverlayReader
from cloudlet.sources import AllowList
from cloudlet.stats import Stats
from cloudlet.synthesis import (
    MountedImages,
    PlainImages,
    QemuRunner,
    SynthesisSpec,
    prepare_synthesis,
    synthesize,
)
from cloudlet.vm import HostOptions
from tests.functional.conftest import cloudlet, http_get, leftovers
from tests.rangeserver import RangeServer

pytestmark = pytest.mark.qemu

FAILS_WITHIN = 120  # generous: a bound on failing, not a speed claim


@pytest.fixture
def ranges(overlay: Path):
    with RangeServer(overlay.parent) as srv:
        yield srv


def spec_for(
    srv: RangeServer,
    overlay: Path,
    *ports: tuple[int, int],
    early_start: bool = True,
    trace_out: Path | None = None,
    **kw,
) -> SynthesisSpec:
    return SynthesisSpec(
        source=srv.url(overlay.name),
        sink=MountedImages(trace_out) if early_start else PlainImages(),
        runner=QemuRunner(HostOptions([Forward("tcp", host, guest) for host, guest in ports])),
        allow=AllowList.parse([srv.url("")]),
        timeout=120,
        **kw,
    )


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def qemus_under(path: Path) -> str:
    done = subprocess.run(["pgrep", "-f", f"qemu-system.*{path}"], capture_output=True, text=True)
    return done.stdout.strip()


def assert_clean(home: Path) -> None:
    assert qemus_under(home) == ""
    assert mounts_under(home) == []
    assert leftovers(home) == []


def test_early_start_over_http_answers_before_the_overlay_is_in(
    home_b: Path, overlay: Path, ranges: RangeServer, tmp_path: Path
):
    # A slow link: the whole overlay takes several seconds, the guest needs only part of it.
    size = overlay.stat().st_size
    ranges.faults.rate = size / 8
    disk_port, ram_port = free_port(), free_port()
    trace = tmp_path / "trace.jsonl"
    spec = spec_for(ranges, overlay, (disk_port, 80), (ram_port, 8080), trace_out=trace)
    with synthesize(CloudletHome(home_b), spec, Stats()) as synth:
        assert synth.status()["state"] in ("running", "complete")
        assert "hello from the cloudlet overlay" in http_get(disk_port)
        assert "ram-only state" in http_get(ram_port)
        synth.wait_complete(FAILS_WITHIN)
        status = synth.status()
        assert status["state"] == "complete"
        assert status["progress"]["frames_applied"] == status["progress"]["frames_total"]
        assert status["cloudletfs"]["demand_misses"] > 0
        # the guest still runs on its images once everything is in
        assert "hello from the cloudlet overlay" in http_get(disk_port)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    waited = [r for r in rows if r["state"] == "pending"]
    assert waited, "no chunk was served on demand"
    assert {r["image"] for r in rows} <= {"disk.raw", "memory.img"}
    assert_clean(home_b)


def test_server_lost_mid_transfer_fails_in_bounded_time_and_cleans_up(
    home_b: Path, overlay: Path, ranges: RangeServer
):
    ranges.faults.rate = overlay.stat().st_size / 20  # still arriving when the server goes
    synth = prepare_synthesis(
        CloudletHome(home_b),
        spec_for(ranges, overlay, (free_port(), 80), fetch_deadline=10),
        Stats(),
    )
    lose = threading.Timer(2.0, ranges.stop)  # while the guest resumes or soon after
    lose.start()
    try:
        # The loss shows either while the guest resumes (a read it waits for never comes) or
        # later, in the stream behind the running guest; both fail the synthesis, bounded.
        with pytest.raises(CloudletError) as failure:
            synth.start()
            synth.wait_complete(FAILS_WITHIN)
        assert "not complete after" not in str(failure.value)
        assert synth.status()["state"] == "failed"
    finally:
        lose.cancel()
        synth.close()
    assert_clean(home_b)


def test_a_silent_source_fails_the_synthesis_within_the_fetch_deadline(
    home_b: Path, overlay: Path, ranges: RangeServer
):
    """The server keeps its connections open and sends nothing past a point, and no guest read
    is waiting (here no guest runs yet: the whole overlay is applied first). Only the source's
    own bound can notice; it was 6 tries x 30 s, whatever --fetch-deadline said."""
    ranges.faults.stall_at = overlay.stat().st_size * 4 // 5  # every request goes silent there
    spec = spec_for(ranges, overlay, (free_port(), 80), fetch_deadline=10, early_start=False)
    synth = prepare_synthesis(CloudletHome(home_b), spec, Stats())
    started = time.monotonic()
    try:
        with pytest.raises(CloudletError, match="no byte arrived for .* fetch deadline is 10 s"):
            synth.start()
        assert synth.status()["state"] == "failed"
    finally:
        synth.close()
    assert time.monotonic() - started < FAILS_WITHIN
    assert_clean(home_b)


def test_corrupt_frame_mid_stream_is_caught_by_its_digest(
    home_b: Path, overlay: Path, ranges: RangeServer
):
    with OverlayReader.open(overlay) as reader:
        middle = reader.frames[len(reader.frames) // 2]
    ranges.faults.corrupt_at = middle.offset + middle.length // 2
    synth = prepare_synthesis(
        CloudletHome(home_b), spec_for(ranges, overlay, (free_port(), 80)), Stats()
    )
    try:
        with pytest.raises(CorruptOverlay, match=f"frame {middle.index}"):
            synth.start()
            synth.wait_complete(FAILS_WITHIN)
        assert synth.status()["state"] == "failed"
    finally:
        synth.close()
    assert_clean(home_b)


def test_check_and_exit_fails_when_the_last_frame_is_corrupt(
    home_b: Path, overlay: Path, ranges: RangeServer
):
    """The guest may answer before the last frame arrives: a check run still fails, naming the
    overlay by its URL, and prints no success."""
    with OverlayReader.open(overlay) as reader:
        last = reader.frames[-1]
    ranges.faults.corrupt_at = last.offset + last.length // 2
    port = free_port()
    url = ranges.url(overlay.name)
    done = cloudlet(home_b, "synthesize", url, "--check-and-exit", "-f", f"tcp:{port}:80",
                    "--check-url", f"http://127.0.0.1:{port}/", check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"overlay {url}: frame {last.index}" in done.stderr
    assert "fails its sha256" in done.stderr
    assert "VM synthesized" not in done.stdout
    assert_clean(home_b)


def test_stopping_while_the_overlay_streams_reports_no_failure(
    home_b: Path, overlay: Path, ranges: RangeServer, caplog: pytest.LogCaptureFixture
):
    ranges.faults.rate = overlay.stat().st_size / 30  # still streaming when the user stops
    port = free_port()
    with synthesize(CloudletHome(home_b), spec_for(ranges, overlay, (port, 80)), Stats()) as synth:
        assert "hello from the cloudlet overlay" in http_get(port)
        assert synth.status()["state"] == "running"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert_clean(home_b)


def test_without_early_start_from_a_url(home_b: Path, overlay: Path, ranges: RangeServer):
    port = free_port()
    started = time.monotonic()
    done = cloudlet(
        home_b,
        "synthesize",
        ranges.url(overlay.name),
        "--no-early-start",
        "--check-and-exit",
        "--json",
        "-f",
        f"tcp:{port}:80",
        "--check-url",
        f"http://127.0.0.1:{port}/",
        timeout=300,
    )
    stats = json.loads(done.stdout)  # stdout is the JSON document and nothing else
    assert "apply overlay" in stats["stages"] and "mount cloudletfs" not in stats["stages"]
    assert stats["counters"]["frames fetched on demand"] == 0
    assert isinstance(stats["counters"]["first response after s"], float)
    assert all(isinstance(v, int | float) and k == k.strip() for k, v in stats["counters"].items())
    assert "hello from the cloudlet overlay" in stats["responses"][f"http://127.0.0.1:{port}/"]
    assert time.monotonic() - started < 300
    assert_clean(home_b)


def test_early_start_cli_records_a_trace_that_reorders_the_overlay(
    home_b: Path, overlay: Path, tmp_path: Path
):
    """Relative paths as the README writes them: the overlay is reopened by every demand
    connection and the trace is written at the end, both after the mount came up."""
    port = free_port()
    trace = tmp_path / "trace.jsonl"
    done = cloudlet(
        home_b,
        "synthesize",
        str(Path(os.path.relpath(overlay, tmp_path))),
        "--check-and-exit",
        "--wait-complete",
        "--trace-out",
        trace.name,
        "-f",
        f"tcp:{port}:80",
        "--check-url",
        f"http://127.0.0.1:{port}/",
        cwd=tmp_path,
    )
    assert trace.exists()
    assert "ERROR" not in done.stderr and "Ignoring invalid" not in done.stderr
    ordered = tmp_path / "ordered.overlay"
    cloudlet(home_b, "overlay", "reorder", str(overlay), "--trace", str(trace), "-o", str(ordered))
    with OverlayReader.open(overlay) as a, OverlayReader.open(ordered) as b:
        assert a.images == b.images
        assert b.meta["access_order"]["accessed_slots"] > 0
    port = free_port()
    done = cloudlet(
        home_b,
        "synthesize",
        str(ordered),
        "--check-and-exit",
        "--wait-complete",
        "-f",
        f"tcp:{port}:80",
        "--check-url",
        f"http://127.0.0.1:{port}/",
    )
    assert "hello from the cloudlet overlay" in done.stdout
    assert_clean(home_b)


def test_close_while_it_starts_stops_it_in_bounded_time(
    home_b: Path, overlay: Path, ranges: RangeServer
):
    """A server deleting a synthesis that is still starting (here: still fetching the whole
    overlay, without early start): start() ends with the reason, nothing is left."""
    spec = spec_for(ranges, overlay, (free_port(), 80), early_start=False)
    synth = prepare_synthesis(CloudletHome(home_b), spec, Stats())
    ranges.faults.rate = overlay.stat().st_size / 60  # the frames crawl in
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            synth.start()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - checked below
            outcome.append(e)

    starter = threading.Thread(target=run)
    starter.start()
    deadline = time.monotonic() + FAILS_WITHIN
    while time.monotonic() < deadline and not (
        synth.pipeline is not None and synth.status()["progress"].get("bytes_fetched")
    ):
        time.sleep(0.05)
    assert starter.is_alive(), "the synthesis did not wait for the slow overlay"
    synth.close()
    starter.join(FAILS_WITHIN)
    assert not starter.is_alive()
    assert isinstance(outcome[0], CloudletError), outcome
    assert "stopped while it started" in str(outcome[0])
    assert synth.status()["state"] == "failed"
    assert_clean(home_b)


def test_a_host_port_in_use_fails_at_once_with_qemus_words(home_b: Path, overlay: Path):
    """QEMU exits at once when it cannot forward a port; saying so must not wait for a QMP
    socket it left behind, nor point at a log its removed run directory held."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = cloudlet(home_b, "synthesize", str(overlay), "--check-and-exit",
                        "-f", f"tcp:{port}:80", check=False)
        took = time.monotonic() - started
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"Could not set up host forwarding rule 'tcp:127.0.0.1:{port}-:80'" in done.stderr
    assert "qemu.log" not in done.stderr
    assert took < 25, f"took {took:.0f} s: waited for QEMU's 30 s QMP connect bound"
    assert_clean(home_b)
