"""Cloudlet objects of a project, put straight into the stand-ins (as if made earlier)."""

from __future__ import annotations

import io
import secrets
import tempfile
from pathlib import Path

from cloudlet.basevm.store import BaseStore
from cloudlet.home import CloudletHome
from cloudlet_nova import glance as cloudlet_glance
from tests.api.conftest import API

OVERLAY_DATA = b"overlay bytes " * 1000


def base(api: API, project: str, visibility: str = "private") -> tuple[str, str, str]:
    """(disk image id, memory image id, base id) of a base VM owned by `project`."""
    cloud = api.env.cloud
    base_id = secrets.token_hex(32)
    memory = cloud.add_image(project, "web-memory", {}, b"bundle", visibility)
    disk = cloud.add_image(
        project, "web", cloudlet_glance.base_disk_properties(base_id, memory), b"disk", visibility
    )
    cloud.images[memory].update(cloudlet_glance.base_memory_properties(base_id, disk))
    return disk, memory, base_id


def overlay(api: API, project: str, visibility: str = "private") -> str:
    disk, _, base_id = base(api, project, visibility)
    return api.env.cloud.add_image(
        project, "app", cloudlet_glance.overlay_properties(base_id, disk), OVERLAY_DATA, visibility
    )


def server(api: API, project: str) -> str:
    return api.env.cloud.add_server(project, "vm", host=api.host.host)


def synthesis(api: API, persona: str = "member") -> str:
    """A synthesis started through the API by `persona` of project A; returns its id."""
    from tests.api.conftest import PROJECT_A, PROJECT_B

    project = PROJECT_B if persona.endswith("_b") else PROJECT_A
    resp = api.call(
        persona,
        "POST",
        "/syntheses",
        json={"overlay_id": overlay(api, project), "name": "app1", "flavor_id": "m1.small"},
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["synthesis"]["id"]


def task(api: API, persona: str = "member") -> str:
    """A task (a capture) started through the API by `persona`; returns its id."""
    from tests.api.conftest import PROJECT_A, PROJECT_B

    project = PROJECT_B if persona.endswith("_b") else PROJECT_A
    resp = api.call(
        persona, "POST", "/overlays", json={"server_id": server(api, project), "name": "cap"}
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["task"]["id"]


def real_base(api: API, project: str, seed: int = 5) -> tuple[str, str]:
    """(disk image id, base id) of a real base (a crafted one, tests/unit) in Glance, its memory
    image holding the bundle the driver reads."""
    from tests.unit.test_basevm_store import make_base_dir

    with tempfile.TemporaryDirectory() as tmp:
        store = BaseStore(CloudletHome(Path(tmp) / "home"))
        base = store.add_from_directory(make_base_dir(Path(tmp) / "staging", seed=seed), "web")
        bundle = io.BytesIO()
        cloudlet_glance.write_memory_bundle(base, bundle)
        cloud = api.env.cloud
        memory = cloud.add_image(project, "web-memory", {}, bundle.getvalue())
        disk = cloud.add_image(
            project,
            "web",
            cloudlet_glance.base_disk_properties(base.id, memory),
            base.disk_path.read_bytes(),
        )
        cloud.images[memory].update(cloudlet_glance.base_memory_properties(base.id, disk))
        return disk, base.id


def synthesis_record(server_id: str, project_id: str) -> dict:
    """A spawn record as a compute host keeps it (cloudlet_nova.records): stages by name, in the
    order they were entered (here not the order they started: "apply overlay" overlaps)."""
    stage = {"seconds": 1.0, "bytes": 0, "failed": False}
    return {
        "instance_uuid": server_id, "project_id": project_id, "image_id": "overlay",
        "kind": "overlay", "state": "running", "error": None,
        "started_at": "2026-12-08T00:00:00+00:00",
        "stats": {
            "stages": {
                "fetch base": {**stage, "start": 0.0, "end": 0.1},
                "restore memory": {**stage, "start": 0.9, "end": 1.9},
                "apply overlay": {**stage, "start": 0.3, "end": 2.5, "bytes": 4096},
                "open + verify manifest": {**stage, "start": 0.1, "end": 0.3},
            },
            "counters": {"frames fetched on demand": 3},
        },
    }  # fmt: skip
