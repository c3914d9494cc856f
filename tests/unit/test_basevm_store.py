"""Base-VM store: registry on real sqlite, ids, lookup, delete, verify, CLOUDLET_HOME layout."""

import hashlib
import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest

from cloudlet.basevm.identity import FORMAT_TAG, compute_base_id
from cloudlet.basevm.store import BaseStore
from cloudlet.errors import AmbiguousBase, BaseExists, BaseNotFound, BaseVMError
from cloudlet.hashing import file_sha256, image_chunk_digests, tree_digest
from cloudlet.home import CloudletHome
from cloudlet.hypervisor.config import VMConfig
from cloudlet.memory.stream import MemoryLayout, RamBlock

MiB = 1 << 20
CONFIG = VMConfig(machine="pc-i440fx-7.2", memory_mib=8, append="tëst").to_dict()


def base_config(seed: int) -> dict:
    """A real VM config (package import checks the host can resume it), one per seed."""
    return dict(CONFIG, append=f"tëst seed={seed}")


def make_base_dir(
    directory: Path, seed: int = 0, kernel: bool = True, disk_mib: int = 3, memory_mib: int = 8
) -> Path:
    """A small crafted base: random + zero regions, not a real VM."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    disk = bytearray(disk_mib * MiB)
    disk[:MiB] = rng.bytes(MiB)  # random, then a zero MiB, then a half random MiB
    disk[2 * MiB : 2 * MiB + MiB // 2] = rng.bytes(MiB // 2)
    disk[5 * 4096 : 6 * 4096] = disk[9 * 4096 : 10 * 4096]  # a repeated chunk
    (directory / "disk.raw").write_bytes(disk)
    with open(directory / "memory.img", "wb") as f:  # sparse, a few pages of data
        f.truncate(memory_mib * MiB)
        for page in (0, 1, 300, 301, 700):
            f.seek(page * 4096)
            f.write(rng.bytes(4096))
    layout = MemoryLayout([RamBlock("pc.ram", memory_mib * MiB, 0)], head=b"QEVM" + rng.bytes(1000))
    (directory / "memory.layout").write_bytes(layout.to_bytes())
    (directory / "vm-config.json").write_text(json.dumps(base_config(seed), indent=2))
    if kernel:
        (directory / "kernel").write_bytes(rng.bytes(70_000))
    return directory


def expected_id(directory: Path) -> str:
    """The id computed independently of the store, from the files."""
    kernel = directory / "kernel"
    return compute_base_id(
        tree_digest(image_chunk_digests(directory / "disk.raw")),
        tree_digest(image_chunk_digests(directory / "memory.img")),
        file_sha256(directory / "memory.layout"),
        json.loads((directory / "vm-config.json").read_text()),
        file_sha256(kernel) if kernel.exists() else None,
        None,
    )


@pytest.fixture
def home(tmp_path: Path) -> CloudletHome:
    return CloudletHome(tmp_path / "home")


@pytest.fixture
def store(home: CloudletHome) -> BaseStore:
    return BaseStore(home)


def test_home_layout_is_private_and_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDLET_HOME", str(tmp_path / "elsewhere"))
    home = CloudletHome()
    assert home.path == tmp_path / "elsewhere"
    for d in (home.path, home.bases, home.overlays, home.runs, home.tmp):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    run = home.new_run_dir("synthesis")
    assert run.parent == home.runs and run.name.startswith("synthesis-")
    assert home.make_staging_dir().parent == home.tmp


def test_add_registers_moves_and_survives_reopen(tmp_path, home, store):
    staging = make_base_dir(home.tmp / "stage")
    want = expected_id(staging)
    disk_bytes = (staging / "disk.raw").read_bytes()

    base = store.add_from_directory(staging, "debian-12")

    assert base.id == want
    assert not staging.exists()
    assert base.path == home.bases / want and base.disk_path.read_bytes() == disk_bytes
    assert base.disk_size == 3 * MiB and base.memory_size == 8 * MiB
    assert base.kernel_path == base.path / "kernel" and base.initrd_path is None
    assert base.config == base_config(0)
    for name in ("disk.digests.npy", "disk.lookup.npy", "memory.digests.npy", "memory.lookup.npy"):
        assert (base.path / name).is_file(), name
        assert base.files[name].sha256 == file_sha256(base.path / name)
    assert not os.access(base.disk_path, os.W_OK) or os.geteuid() == 0
    assert stat.S_IMODE(base.disk_path.stat().st_mode) == 0o444

    again = BaseStore(CloudletHome(home.path)).get(want)
    assert again == base
    assert [b.id for b in BaseStore(home).list()] == [want]


def test_id_depends_on_contents_only(tmp_path):
    a = BaseStore(CloudletHome(tmp_path / "a")).add_from_directory(
        make_base_dir(tmp_path / "s1", seed=1), "one"
    )
    b = BaseStore(CloudletHome(tmp_path / "b")).add_from_directory(
        make_base_dir(tmp_path / "s2", seed=1), "another name"
    )
    c = BaseStore(CloudletHome(tmp_path / "c")).add_from_directory(
        make_base_dir(tmp_path / "s3", seed=1, kernel=False), "one"
    )
    assert a.id == b.id  # also across filesystems-of-origin (staging outside the home)
    assert c.id != a.id
    assert not (tmp_path / "s1").exists()


def test_add_from_another_filesystem_copies_sparsely(tmp_path, home, store):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == home.tmp.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    staging = make_base_dir(shm / f"cloudlet-test-{os.getpid()}-{tmp_path.name}", memory_mib=16)
    try:
        want = expected_id(staging)
        base = store.add_from_directory(staging, "from tmpfs")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    assert base.id == want and store.verify(base.id) == base
    assert not staging.exists()
    assert base.memory_path.stat().st_blocks * 512 < 4 * MiB  # 16 MiB image, a few pages data
    assert list(home.tmp.iterdir()) == []


def test_adding_registered_contents_is_refused_and_leaves_directory(home, store):
    first = store.add_from_directory(make_base_dir(home.tmp / "s1"), "base")
    second = make_base_dir(home.tmp / "s2")
    with pytest.raises(BaseExists, match=first.id):
        store.add_from_directory(second, "base again")
    assert (second / "disk.raw").is_file()
    assert [b.id for b in store.list()] == [first.id]


def test_add_rejects_incomplete_or_unknown_files(home, store):
    staging = make_base_dir(home.tmp / "s")
    (staging / "memory.layout").unlink()
    with pytest.raises(BaseVMError, match="no memory.layout"):
        store.add_from_directory(staging, "x")
    staging = make_base_dir(home.tmp / "t")
    (staging / "memory.stream").write_bytes(b"x")
    with pytest.raises(BaseVMError, match="unexpected file memory.stream"):
        store.add_from_directory(staging, "x")
    with pytest.raises(BaseVMError, match="name"):
        store.add_from_directory(staging, " ")
    assert store.list() == []
    assert list(home.bases.iterdir()) == []


def test_get_by_name_prefix_and_errors(home, store):
    a = store.add_from_directory(make_base_dir(home.tmp / "a", seed=1), "web")
    b = store.add_from_directory(make_base_dir(home.tmp / "b", seed=2), "db")
    assert store.get("web") == a
    assert store.get(b.id[:4]) == b
    assert store.get(b.id[:10].upper()) == b
    assert store.get(a.id) == a
    with pytest.raises(BaseNotFound):
        store.get(a.id[:3])  # too short to be a prefix
    with pytest.raises(BaseNotFound, match="nope"):
        store.get("nope")
    with pytest.raises(BaseNotFound):
        store.get("f" * 64 if not a.id.startswith("f") else "0" * 64)


def test_ambiguous_prefix_and_name_name_the_candidates(home, store):
    a = store.add_from_directory(make_base_dir(home.tmp / "a", seed=1), "same")
    # A second row whose id shares 6 digits with the first: crafting such contents would take
    # thousands of bases, so write the row straight into the real registry.
    twin = a.id[:6] + ("0" if a.id[6] != "0" else "1") + a.id[7:]
    with sqlite3.connect(home.registry) as db:
        db.execute(
            "INSERT INTO bases SELECT ?, name, created, disk_size, memory_size, disk_digest, "
            "memory_digest, config, files FROM bases WHERE id = ?",
            (twin, a.id),
        )
    with pytest.raises(AmbiguousBase, match=f"{a.id[:12]}.*{twin[:12]}|{twin[:12]}.*{a.id[:12]}"):
        store.get(a.id[:6])
    with pytest.raises(AmbiguousBase, match="2 base VMs are named 'same'"):
        store.get("same")
    assert store.get(a.id[:7]) == a
    with sqlite3.connect(home.registry) as db:
        with pytest.raises(sqlite3.IntegrityError):  # the unique index on id
            db.execute("INSERT INTO bases SELECT * FROM bases WHERE id = ?", (a.id,))


def test_delete_removes_files_and_row(home, store):
    a = store.add_from_directory(make_base_dir(home.tmp / "a", seed=1), "a")
    b = store.add_from_directory(make_base_dir(home.tmp / "b", seed=2), "b")
    assert store.delete("a") == a
    assert not a.path.exists()
    with pytest.raises(BaseNotFound):
        store.get(a.id)
    assert [x.id for x in store.list()] == [b.id]
    assert store.verify(b.id) == b
    assert list(home.tmp.iterdir()) == []
    # the same contents can be added again after a delete
    assert store.add_from_directory(make_base_dir(home.tmp / "c", seed=1), "a").id == a.id


def test_verify_names_the_damaged_file(home, store):
    base = store.add_from_directory(make_base_dir(home.tmp / "a"), "a")
    assert store.verify(base.id) == base

    mem = base.memory_path
    mem.chmod(0o644)
    with open(mem, "r+b") as f:
        f.seek(300 * 4096 + 17)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BaseVMError, match="memory.img"):
        store.verify(base.id)
    with open(mem, "r+b") as f:
        f.seek(300 * 4096 + 17)
        f.write(byte)
    store.verify(base.id)

    (base.path / "memory.lookup.npy").unlink()
    with pytest.raises(BaseVMError, match="memory.lookup.npy is missing"):
        store.verify(base.id)


def test_registry_schema_is_versioned_wal(home, store):
    with sqlite3.connect(home.registry) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[1]: r[2] for r in db.execute("PRAGMA index_list(bases)")}
        assert indexes["bases_id"] == 1  # unique
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(BaseVMError, match="newer"):
        BaseStore(home)


def test_base_id_encoding_is_the_documented_one():
    d, m, lay, k = (hashlib.sha256(bytes([i])).hexdigest() for i in range(4))
    config = {"b": [1, "ü"], "a": None}
    config_sha = hashlib.sha256('{"a":null,"b":[1,"ü"]}'.encode()).hexdigest()
    text = (
        f'{{"config":"{config_sha}","disk":"{d}","format":"{FORMAT_TAG}",'
        f'"initrd":null,"kernel":"{k}","layout":"{lay}","memory":"{m}"}}'
    )
    assert compute_base_id(d, m, lay, config, k, None) == hashlib.sha256(text.encode()).hexdigest()
    assert compute_base_id(d, m, lay, {"a": None, "b": [1, "ü"]}, k, None) == compute_base_id(
        d, m, lay, config, k, None
    )
    assert compute_base_id(d, m, lay, config, None, k) != compute_base_id(
        d, m, lay, config, k, None
    )
    with pytest.raises(BaseVMError, match="disk digest"):
        compute_base_id(d.upper(), m, lay, config, k, None)
    with pytest.raises(BaseVMError, match="JSON"):
        compute_base_id(d, m, lay, {"x": float("nan")}, k, None)
