"""Stage timelines: start and end of each stage, counted from the Stats' creation."""

import threading

import pytest

from cloudlet.stats import Stats


def test_stages_record_their_first_start_and_last_end() -> None:
    stats = Stats()
    with stats.stage("open"):
        pass
    release = threading.Event()
    inner_started = threading.Event()

    def overlapping() -> None:  # early start: the pipeline's stage under the running guest
        with stats.stage("apply"):
            inner_started.set()
            release.wait(10)

    worker = threading.Thread(target=overlapping)
    worker.start()
    inner_started.wait(10)
    with stats.stage("restore"):
        pass
    release.set()
    worker.join(10)
    with stats.stage("open"):  # a stage run twice spans both runs
        pass
    stages = stats.as_dict()["stages"]
    for stage in stages.values():
        assert 0 <= stage["start"] <= stage["end"]
    assert stages["open"]["end"] >= stages["apply"]["end"] >= stages["restore"]["end"]
    assert stages["apply"]["start"] <= stages["restore"]["start"]  # they overlap
    assert stages["open"]["start"] <= stages["apply"]["start"]


def test_a_running_stage_has_a_start_and_no_end_yet() -> None:
    stats = Stats()
    with stats.stage("apply"):
        live = stats.as_dict()["stages"]["apply"]
    assert live["start"] is not None and live["end"] is None
    assert stats.as_dict()["stages"]["apply"]["end"] is not None


def test_a_failed_stage_ends_too() -> None:
    stats = Stats()
    with pytest.raises(ValueError), stats.stage("verify"):
        raise ValueError("digest")
    stage = stats.as_dict()["stages"]["verify"]
    assert stage["failed"] and stage["end"] >= stage["start"]
