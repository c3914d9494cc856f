"""Base-VM packages: export -> import round trip, and every way a package can be bad."""

import io
import json
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard

from cloudlet.basevm.package import (
    PackageManifest,
    export_base,
    import_base,
    read_manifest,
)
from cloudlet.basevm.store import BaseStore
from cloudlet.errors import BasePackageError, BaseVMError
from cloudlet.home import CloudletHome
from tests.unit.test_basevm_store import make_base_dir

MiB = 1 << 20
PRIMARY = ("disk.raw", "memory.img", "memory.layout", "vm-config.json", "kernel")

Members = list[tuple[tarfile.TarInfo, bytes]]


@pytest.fixture
def source(tmp_path: Path) -> BaseStore:
    store = BaseStore(CloudletHome(tmp_path / "src"))
    store.add_from_directory(make_base_dir(tmp_path / "staging"), "web server")
    return store


@pytest.fixture
def dest(tmp_path: Path) -> BaseStore:
    return BaseStore(CloudletHome(tmp_path / "dst"))


@pytest.fixture
def package(source: BaseStore, tmp_path: Path) -> Path:
    return export_base(source, "web server", tmp_path / "web.cbase")


def read_members(package: Path) -> Members:
    """All members of a (small, test) package in memory."""
    with open(package, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_members(path: Path, members: Members) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


def rewrite(package: Path, change: Callable[[Members], Members]) -> Path:
    return write_members(package.with_name("bad.cbase"), change(read_members(package)))


def edit_manifest(members: Members, edit: Callable[[dict], None]) -> Members:
    info, data = members[0]
    doc = json.loads(data)
    edit(doc)
    return [(info, json.dumps(doc).encode())] + members[1:]


def assert_nothing_left(store: BaseStore) -> None:
    assert store.list() == []
    assert list(store.home.bases.iterdir()) == []
    assert list(store.home.tmp.iterdir()) == []


def test_export_import_round_trip(source, dest, package):
    original = source.get("web server")
    manifest = read_manifest(package)
    assert manifest.base_id == original.id and manifest.name == "web server"
    members = read_members(package)
    assert [m.name for m, _ in members] == [
        "manifest.json",
        "vm-config.json",
        "memory.layout",
        "kernel",
        "memory.img",
        "disk.raw",
    ]
    assert package.stat().st_size < 3 * MiB  # zero regions compress away
    assert [p.name for p in package.parent.iterdir() if p.name.startswith(".")] == []

    result = import_base(dest, package)

    base = result.base
    assert not result.already_present
    assert base.id == original.id and base.name == "web server"
    assert base.config == original.config and base.files == original.files
    for name in original.files:  # primary files and the rebuilt indexes, byte for byte
        assert (base.path / name).read_bytes() == (original.path / name).read_bytes(), name
    assert base.memory_path.stat().st_blocks * 512 <= 3 * MiB  # 8 MiB, written sparsely
    assert dest.verify(base.id) == base
    assert list(dest.home.tmp.iterdir()) == []


def test_import_of_registered_base_reports_it(source, dest, package):
    first = import_base(dest, package).base
    again = import_base(dest, package, name="other name")
    assert again.already_present and again.base == first
    assert [b.id for b in dest.list()] == [first.id]
    assert import_base(source, package).already_present


def test_import_under_another_name_with_progress(dest, package):
    seen: list[int] = []
    result = import_base(dest.home, package, name="edge-web", progress=seen.append)
    assert result.base.name == "edge-web" and dest.get("edge-web") == result.base
    assert seen == sorted(seen) and seen[-1] == package.stat().st_size


def test_export_progress_counts_file_bytes(source, tmp_path):
    seen: list[int] = []
    base = source.get("web server")
    export_base(source.home, base.id, tmp_path / "p.cbase", progress=seen.append)
    primary = sum(f.size for n, f in base.files.items() if not n.endswith(".npy"))
    assert seen[-1] == primary


def test_flipped_byte_in_disk_member_is_rejected(dest, package):
    def flip(members: Members) -> Members:
        info, data = members[-1]
        assert info.name == "disk.raw"
        data = bytearray(data)
        data[123_457] ^= 0x10
        return members[:-1] + [(info, bytes(data))]

    with pytest.raises(BasePackageError, match=r"member disk.raw has sha256 [0-9a-f]{64}"):
        import_base(dest, rewrite(package, flip))
    assert_nothing_left(dest)


def test_flipped_byte_in_compressed_stream_is_rejected(dest, package, tmp_path):
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "bad.cbase"
    bad.write_bytes(data)
    with pytest.raises(BasePackageError):
        import_base(dest, bad)
    assert_nothing_left(dest)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.999])
def test_truncated_package_is_rejected(dest, package, tmp_path, keep):
    data = package.read_bytes()
    bad = tmp_path / "cut.cbase"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BasePackageError, match="truncated"):
        import_base(dest, bad)
    assert_nothing_left(dest)


def test_member_missing_at_end_is_rejected(dest, package):
    with pytest.raises(BasePackageError, match="without member.*disk.raw"):
        import_base(dest, rewrite(package, lambda m: m[:-1]))
    assert_nothing_left(dest)


def test_manifest_with_wrong_file_sha256(dest, package):
    def edit(doc: dict) -> None:
        for f in doc["files"]:
            if f["name"] == "memory.layout":
                f["sha256"] = "0" * 64

    bad = rewrite(package, lambda m: edit_manifest(m, edit))
    with pytest.raises(BasePackageError, match="memory.layout has sha256"):
        import_base(dest, bad)
    assert_nothing_left(dest)


def test_manifest_with_wrong_image_digest(dest, package):
    bad = rewrite(package, lambda m: edit_manifest(m, lambda d: d.update(memory_digest="1" * 64)))
    with pytest.raises(BasePackageError, match=r"memory.img: image digest [0-9a-f]{64} differs"):
        import_base(dest, bad)
    assert_nothing_left(dest)


def test_manifest_with_wrong_base_id(dest, package):
    bad = rewrite(package, lambda m: edit_manifest(m, lambda d: d.update(base_id="2" * 64)))
    with pytest.raises(BasePackageError, match="says 2222"):
        import_base(dest, bad)
    assert_nothing_left(dest)


def test_member_with_parent_path_is_rejected(dest, package):
    def traverse(members: Members) -> Members:
        info, data = members[1]
        info.name = "../vm-config.json"
        return [members[0], (info, data)] + members[2:]

    with pytest.raises(BasePackageError, match="path traversal"):
        import_base(dest, rewrite(package, traverse))
    assert_nothing_left(dest)
    assert not (dest.home.path / "vm-config.json").exists()


def test_unexpected_member_is_rejected(dest, package):
    def extra(members: Members) -> Members:
        return members[:2] + [(tarfile.TarInfo("evil.sh"), b"#!/bin/sh\n")] + members[2:]

    with pytest.raises(BasePackageError, match="unexpected member 'evil.sh'"):
        import_base(dest, rewrite(package, extra))
    assert_nothing_left(dest)


def test_wrong_version_and_absurd_size_are_rejected(dest, package):
    bad = rewrite(package, lambda m: edit_manifest(m, lambda d: d.update(version=2)))
    with pytest.raises(BasePackageError, match="version 2 is not supported"):
        import_base(dest, bad)

    def huge(doc: dict) -> None:
        doc["files"][-1]["size"] = 1 << 60

    with pytest.raises(BasePackageError, match="disk.raw claims"):
        import_base(dest, rewrite(package, lambda m: edit_manifest(m, huge)))
    assert_nothing_left(dest)


def test_manifest_must_come_first(dest, package):
    with pytest.raises(BasePackageError, match="first member is vm-config.json"):
        import_base(dest, rewrite(package, lambda m: m[1:]))
    assert_nothing_left(dest)


def test_export_refuses_a_damaged_base_and_leaves_no_file(source, tmp_path):
    base = source.get("web server")
    base.disk_path.chmod(0o644)
    with open(base.disk_path, "r+b") as f:
        f.seek(10)
        f.write(b"\xff")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BaseVMError, match="disk.raw no longer matches"):
        export_base(source, base.id, out / "x.cbase")
    assert list(out.iterdir()) == []


def test_export_and_import_stream_with_bounded_memory(tmp_path):
    """A 96 MiB disk must not be held in memory (Python allocations stay far below it)."""
    staging = make_base_dir(tmp_path / "s", disk_mib=96, memory_mib=64)
    with open(staging / "disk.raw", "r+b") as f:
        f.seek(32 * MiB)
        f.write(np.random.default_rng(5).bytes(32 * MiB))
    source = BaseStore(CloudletHome(tmp_path / "a"))
    source.add_from_directory(staging, "big")
    tracemalloc.start()
    try:
        package = export_base(source, "big", tmp_path / "big.cbase")
        _, export_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = import_base(BaseStore(CloudletHome(tmp_path / "b")), package)
        _, import_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.base.id == source.get("big").id
    assert export_peak < 24 * MiB, export_peak
    assert import_peak < 24 * MiB, import_peak


def test_manifest_round_trips(source):
    base = source.get("web server")
    manifest = PackageManifest.for_base(base)
    assert PackageManifest.from_bytes(manifest.to_bytes()) == manifest


def test_data_after_the_tar_end_is_rejected(dest, package, tmp_path):
    with open(package, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    bad = tmp_path / "trailing.cbase"
    junk = np.random.default_rng(3).bytes(8 * MiB)  # more than tarfile's read-ahead buffer
    bad.write_bytes(zstandard.ZstdCompressor().compress(raw + junk))
    with pytest.raises(BasePackageError, match="unexpected data after the last member"):
        import_base(dest, bad)
    assert_nothing_left(dest)
