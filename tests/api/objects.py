"""Cloudlet objects of a project, put straight into the stand-ins (as if made earlier)."""

from __future__ import annotations

import secrets

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
