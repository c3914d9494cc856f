"""Base-package imports through cloudlet-api: verified before anything is published, nothing in
Glance from a rejected package, URL imports only from the allow-list. Real packages (the
engine's exporter), real verification; Glance is the stand-in of standins.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloudlet.basevm.package import export_base, import_base
from cloudlet.basevm.store import BaseStore
from cloudlet.home import CloudletHome
from cloudlet.memory.stream import MemoryLayout
from cloudlet_nova import glance as cloudlet_glance
from tests.api.conftest import API, PROJECT_A
from tests.rangeserver import RangeServer
from tests.unit.test_basevm_package import edit_manifest, rewrite
from tests.unit.test_basevm_store import make_base_dir

PACKAGE = {"Content-Type": "application/octet-stream"}


@pytest.fixture
def source(tmp_path: Path) -> tuple[BaseStore, Path]:
    """A package of a base of its own (the stand-in Glance lives for the whole session)."""
    root = tmp_path / "source"
    store = BaseStore(CloudletHome(root / "home"))
    seed = int.from_bytes(os.urandom(4))
    base = store.add_from_directory(make_base_dir(root / "staging", seed=seed), "web")
    return store, export_base(store, base.id, root / "web.cbase")


def wait_task(api: API, persona: str, task_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task = api.call(persona, "GET", f"/tasks/{task_id}").json()["task"]
        if task["state"] != "running":
            return task
        assert time.monotonic() < deadline, f"task still {task['stage']} after {timeout} s"
        time.sleep(0.1)


def upload(api: API, package: Path, query: str = "") -> dict[str, Any]:
    with open(package, "rb") as f:
        resp = api.call("member", "POST", f"/bases/import{query}", data=f, headers=PACKAGE)
    assert resp.status_code == 202, resp.text
    return wait_task(api, "member", resp.json()["task"]["id"])


def cloudlet_images(api: API) -> set[str]:
    return {i for i, image in api.env.cloud.images.items() if cloudlet_glance.TYPE in image}


def assert_nothing_spooled(api: API) -> None:
    imports = Path(api.conf.api.state_path) / "imports"
    assert list(imports.iterdir()) == []


def test_upload_is_verified_then_published_as_linked_images(
    api_factory: Callable[..., API], source: tuple[BaseStore, Path], tmp_path: Path
) -> None:
    api = api_factory()
    store, package = source
    base = store.list()[0]
    task = upload(api, package, "?name=web-1")
    assert task["state"] == "succeeded", task["error"]
    assert task["stats"]["glance"] == "uploaded"
    assert task["base_id"] == base.id
    disk, memory = task["images"]["disk"], task["images"]["memory"]
    cloud = api.env.cloud
    assert cloud.images[disk]["owner"] == PROJECT_A and cloud.images[disk]["name"] == "web-1"
    assert cloud.images[disk]["visibility"] == "private"
    info = cloudlet_glance.describe({"id": disk, "properties": cloud.images[disk]})
    assert (info.kind, info.base_id, info.memory_image) == (
        cloudlet_glance.Kind.BASE_DISK,
        base.id,
        memory,
    )
    assert cloud.image_data[disk].read_bytes() == base.disk_path.read_bytes()
    # the memory image is the bundle the driver reads
    out = tmp_path / "bundle"
    out.mkdir()
    with open(cloud.image_data[memory], "rb") as f:
        names = cloudlet_glance.read_memory_bundle(f, out, memory)
    assert (out / "memory.img").read_bytes() == base.memory_path.read_bytes()
    assert "kernel" in names
    listed = api.call("reader", "GET", f"/bases?base_id={base.id}").json()["bases"]
    assert [b["id"] for b in listed] == [disk]
    # what the base was saved with, recorded at publication (the memory image stays unread)
    configuration = listed[0]["configuration"]
    assert {k: configuration[k] for k in ("machine", "memory_mib", "vcpus", "cpu")} == {
        k: base.config[k] for k in ("machine", "memory_mib", "vcpus", "cpu")
    }
    assert (
        configuration["qemu_version"]
        == MemoryLayout.from_bytes(base.memory_layout_path.read_bytes()).saved_by
    )
    assert listed[0]["memory_size"] == cloud.image_data[memory].stat().st_size
    assert_nothing_spooled(api)

    # the same package again: Glance already has the base, nothing is uploaded twice
    before = cloudlet_images(api)
    again = upload(api, package)
    assert again["state"] == "succeeded" and again["stats"]["glance"] == "already present"
    assert again["images"] == task["images"]
    assert cloudlet_images(api) == before


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (
            lambda ms: [
                (i, d[:100] + bytes([d[100] ^ 1]) + d[101:]) if i.name == "disk.raw" else (i, d)
                for i, d in ms
            ],
            "member disk.raw has sha256",
        ),
        (lambda ms: edit_manifest(ms, lambda doc: doc.update(base_id="0" * 64)), "base id"),
        (lambda ms: ms[:-1], "ends without member"),
    ],
)
def test_rejected_package_leaves_nothing_in_glance(
    api_factory: Callable[..., API], source: tuple[BaseStore, Path], damage: Any, named: str
) -> None:
    api = api_factory()
    _, package = source
    bad = rewrite(package, damage)
    before = dict(api.env.cloud.images)
    task = upload(api, bad)
    assert task["state"] == "failed"
    assert named in task["error"]
    assert "imports/" not in task["error"]  # the spool file's path is not the caller's business
    assert api.env.cloud.images == before
    assert_nothing_spooled(api)


def test_failed_publish_deletes_what_it_created(
    api_factory: Callable[..., API], source: tuple[BaseStore, Path]
) -> None:
    api = api_factory()
    before = dict(api.env.cloud.images)
    api.env.cloud.failing_uploads.add("web-broken")
    try:
        task = upload(api, source[1], "?name=web-broken")
    finally:
        api.env.cloud.failing_uploads.clear()
    assert task["state"] == "failed"
    assert "store is full" in task["error"]
    assert api.env.cloud.images == before
    assert_nothing_spooled(api)


def test_url_import_only_from_the_allow_list(
    api_factory: Callable[..., API], source: tuple[BaseStore, Path]
) -> None:
    _, package = source
    with RangeServer(package.parent) as srv:
        allowed = srv.url(package.name).rsplit("/", 1)[0] + "/"
        api = api_factory(import_url_allow=allowed)
        resp = api.call(
            "member",
            "POST",
            "/bases/import",
            json={"url": srv.url(package.name), "name": "from-url"},
        )
        assert resp.status_code == 202, resp.text
        task = wait_task(api, "member", resp.json()["task"]["id"])
        assert task["state"] == "succeeded", task["error"]
        assert api.env.cloud.images[task["images"]["disk"]]["name"] == "from-url"

        elsewhere = srv.url(package.name).replace("127.0.0.1", "localhost")
        resp = api.call("member", "POST", "/bases/import", json={"url": elsewhere})
        assert resp.status_code == 400
        assert "not under any allowed prefix" in resp.json()["errors"][0]["detail"]

    closed = api_factory()  # no allow-list: uploads only
    resp = closed.call("member", "POST", "/bases/import", json={"url": allowed + "x.cbase"})
    assert resp.status_code == 400
    assert "no remote sources are allowed" in resp.json()["errors"][0]["detail"]


def test_export_streams_a_package_that_imports_as_the_same_base(
    api_factory: Callable[..., API], tmp_path: Path
) -> None:
    from tests.api import objects

    api = api_factory()
    disk, base_id = objects.real_base(api, PROJECT_A, seed=11)
    resp = api.call("reader", "GET", f"/bases/{disk}/package", stream=True)
    assert resp.status_code == 200
    package = tmp_path / "exported.cbase"
    with open(package, "wb") as out:
        for chunk in resp.iter_content(1 << 20):
            out.write(chunk)
    assert package.stat().st_size == int(resp.headers["Content-Length"])
    result = import_base(BaseStore(CloudletHome(tmp_path / "other")), package)
    assert result.base.id == base_id
    assert_nothing_spooled(api)


def test_export_of_images_changed_since_is_refused(
    api_factory: Callable[..., API], tmp_path: Path
) -> None:
    from tests.api import objects

    api = api_factory()
    disk, _ = objects.real_base(api, PROJECT_A, seed=12)
    path = api.env.cloud.image_data[disk]
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    resp = api.call("reader", "GET", f"/bases/{disk}/package")
    assert resp.status_code == 409
    assert "the images were changed" in resp.json()["errors"][0]["detail"]
    assert_nothing_spooled(api)
