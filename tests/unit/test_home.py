"""Scratch directories of processes that died are swept; those of live processes are kept."""

import os
import subprocess
import sys

from cloudlet.home import CloudletHome, remove_orphans


def test_dirs_of_dead_owners_are_swept_live_ones_kept(tmp_path):
    home = CloudletHome(tmp_path / "home")
    # a real process creates a run dir and dies without cleaning up (as after SIGKILL)
    code = (
        "import sys; from cloudlet.home import CloudletHome; "
        "d = CloudletHome(sys.argv[1]).new_run_dir('synthesis'); "
        "(d / 'disk.raw.tmp').write_bytes(b'x'); print(d)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(home.path)], capture_output=True, text=True, check=True
    )
    orphan = type(home.path)(out.stdout.strip())
    assert orphan.exists()
    mine = home.new_run_dir("overlay")  # sweeps on the way
    assert not orphan.exists()
    assert mine.exists()
    assert remove_orphans(home.runs) == []  # our own directory is never taken for an orphan
    assert mine.exists()


def test_unowned_entries_are_left_alone(tmp_path):
    home = CloudletHome(tmp_path / "home")
    foreign = home.runs / "something-else"
    foreign.mkdir()
    assert remove_orphans(home.runs) == []
    assert foreign.exists()


def test_reused_pid_is_not_taken_for_the_owner(tmp_path):
    home = CloudletHome(tmp_path / "home")
    # same pid as ours but another start time: the owner is gone, the pid was reused
    stale = home.runs / f"synthesis-pid{os.getpid()}.1.abc"
    stale.mkdir()
    assert remove_orphans(home.runs) == [stale]
