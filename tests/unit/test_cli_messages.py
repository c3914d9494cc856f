"""What a new user sees when a command is given a wrong file: one line naming it, exit code 2,
nothing registered or written; never a traceback (main() would raise instead of returning)."""

from pathlib import Path

import pytest

from cloudlet.basevm.package import export_base
from cloudlet.basevm.store import BaseStore
from cloudlet.cli.main import main
from cloudlet.home import CloudletHome
from cloudlet.stats import StageLine, Stats
from tests.rangeserver import RangeServer
from tests.unit.test_basevm_store import make_base_dir
from tests.unit.test_overlay_apply import Scene


@pytest.fixture
def home(tmp_path: Path) -> list[str]:
    return ["--home", str(tmp_path / "home")]


def error_of(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["overlay", "show", "nosuch.overlay"], "cannot open overlay"),
        (["overlay", "reorder", "nosuch.overlay", "--trace", "{trace}", "-o", "o"],
         "cannot open overlay"),
        (["base", "import", "nosuch.cbase"], "cannot open base package"),
        (["overlay", "create", "anybase", "--script", "nosuch.sh", "-o", "o"],
         "cannot read customisation script"),
    ],
)
def test_missing_files_are_named(
    argv: list[str], words: str, home: list[str], tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trace.jsonl").write_text('{"t": 0, "image": "disk.raw", "chunk": 1}\n')
    argv = [a.format(trace=tmp_path / "trace.jsonl") for a in argv]
    err = error_of([*home, *argv], capsys)
    assert words in err and "nosuch" in err and "No such file or directory" in err


def test_overlay_show_reads_a_url(home: list[str], tmp_path: Path, capsys) -> None:
    scene = Scene(tmp_path)
    scene.build()
    with RangeServer(scene.overlay.parent) as srv:
        assert main([*home, "overlay", "show", srv.url(scene.overlay.name)]) == 0
        assert f"overlay      {srv.url(scene.overlay.name)}" in capsys.readouterr().out
        err = error_of([*home, "overlay", "show", srv.url("nosuch.overlay")], capsys)
    assert "nosuch.overlay" in err and "404" in err


def test_export_into_a_missing_directory(tmp_path: Path, home: list[str], capsys) -> None:
    BaseStore(CloudletHome(tmp_path / "home")).add_from_directory(
        make_base_dir(tmp_path / "staging"), "web"
    )
    err = error_of([*home, "base", "export", "web", "/nonexistent/dir/w.cbase"], capsys)
    assert "/nonexistent/dir is not a directory" in err


def test_importing_what_is_not_a_package(tmp_path: Path, home: list[str], capsys) -> None:
    scene = Scene(tmp_path)
    scene.build()
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a disk")
    err = error_of([*home, "base", "import", str(scene.overlay)], capsys)
    assert "is not a base package (a cloudlet overlay)" in err
    err = error_of([*home, "base", "import", str(text)], capsys)
    assert "notes.txt is not a base package" in err
    assert BaseStore(CloudletHome(tmp_path / "home")).list() == []


def test_a_text_file_is_not_a_base_disk(tmp_path: Path, home: list[str], capsys) -> None:
    text = tmp_path / "disk.raw"
    text.write_text("hello, I am not a disk")  # 22 bytes
    err = error_of([*home, "base", "create", str(text), "--ready-marker", "x"], capsys)
    assert "is not a disk image: 22 bytes" in err
    assert BaseStore(CloudletHome(tmp_path / "home")).list() == []
    assert not list((tmp_path / "home" / "tmp").iterdir())


def test_a_failed_stage_is_never_shown_as_ok(capsys) -> None:
    stats = Stats(listener=StageLine())
    with stats.stage("copy disk"):
        pass
    with pytest.raises(OSError), stats.stage("first response"):
        raise OSError("the guest never answered")
    err = capsys.readouterr().err
    assert "ok  copy disk" in err
    assert "FAILED first response" in err and "ok  first response" not in err
    assert "FAILED" in stats.render().splitlines()[1]


def test_export_package_still_imports(tmp_path: Path) -> None:
    """The magic check accepts what export writes."""
    store = BaseStore(CloudletHome(tmp_path / "a"))
    store.add_from_directory(make_base_dir(tmp_path / "staging"), "web")
    package = export_base(store, "web", tmp_path / "web.cbase")
    assert main(["--home", str(tmp_path / "b"), "base", "import", str(package)]) == 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["synthesize", "app.overlay", "--check-url", "http://127.0.0.1:{port}/"],
         "--check-url http://127.0.0.1:{port}/ waits on host port {port}"),
        (["synthesize", "app.overlay", "-f", "tcp:{other}:80", "--check-url",
          "http://localhost:{port}/x"], "--forward tcp:{port}:GUEST_PORT"),
        (["base", "create", "{disk}", "--ready-port", "{port}"],
         "--ready-port {port} waits on host port {port}"),
    ],
)
def test_waits_on_unforwarded_ports_are_refused_up_front(
    argv: list[str], words: str, home: list[str], tmp_path: Path, capsys
) -> None:
    """Such a wait could only end at its --timeout (10 minutes by default)."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4096))
    fill = {"port": 18080, "other": 18081, "disk": disk}
    err = error_of([*home, *(a.format(**fill) for a in argv)], capsys)
    assert words.format(**fill) in err
    assert BaseStore(CloudletHome(tmp_path / "home")).list() == []


def test_forwards_given_to_qemu_directly_count(home: list[str], tmp_path: Path, capsys) -> None:
    """A hostfwd passed after `--` reaches the guest too: the check lets it through (and the
    command then fails only for the missing overlay)."""
    argv = ["synthesize", "nosuch.overlay", "--check-url", "http://127.0.0.1:18080/", "--",
            "-netdev", "user,id=n1,hostfwd=tcp:127.0.0.1:18080-:80"]
    err = error_of([*home, *argv], capsys)
    assert "cannot open overlay" in err
