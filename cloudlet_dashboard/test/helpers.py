"""Horizon's test case with the cloudlet service in the user's catalog and cloudlet objects as
the SDK returns them.

The only fake is at the API wrapper's boundary: tests patch functions of
cloudlet_dashboard.api.cloudlet (and Horizon's own api.nova / api.neutron / api.glance for the
forms' choices), returning real openstacksdk resource objects. Horizon's TestCase fails any
test that opens a real HTTP connection."""

from __future__ import annotations

import uuid
from typing import Any
from unittest import mock

from openstack_dashboard.test import helpers

from cloudletclient.sdk.resources import Base, Overlay, Synthesis, Task

CLOUDLET_CATALOG_ENTRY = {
    "type": "cloudlet",
    "name": "cloudlet",
    "endpoints_links": [],
    "endpoints": [
        {"region": "RegionOne", "interface": interface, "url": "http://cloudlet.example.com:8790"}
        for interface in ("admin", "internal", "public")
    ],
}
API = "cloudlet_dashboard.api.cloudlet."
BASE_ID = "ab" * 32


def base(**fields: Any) -> Base:
    values = {
        "id": str(uuid.uuid4()),
        "name": "web",
        "base_id": BASE_ID,
        "memory_image_id": str(uuid.uuid4()),
        "status": "active",
        "visibility": "private",
        "project_id": "1",
        "size": 2 << 30,
        "min_ram": 512,
        "created_at": "2026-12-07T10:00:00Z",
    }
    values.update(fields)
    return Base.existing(**values)


def overlay(**fields: Any) -> Overlay:
    values = {
        "id": str(uuid.uuid4()),
        "name": "app",
        "base_id": BASE_ID,
        "base_disk_image_id": str(uuid.uuid4()),
        "status": "active",
        "visibility": "private",
        "project_id": "1",
        "size": 48 << 20,
        "created_at": "2026-12-07T11:00:00Z",
    }
    values.update(fields)
    return Overlay.existing(**values)


def task(**fields: Any) -> Task:
    values = {
        "id": str(uuid.uuid4()),
        "kind": "import-base",
        "name": "web",
        "state": "running",
        "stage": "verify",
        "progress": 0.42,
        "images": {},
        "error": None,
        "project_id": "1",
        "created_at": "2026-12-08T00:00:00Z",
    }
    values.update(fields)
    return Task.existing(**values)


def synthesis(**fields: Any) -> Synthesis:
    values = {
        "id": str(uuid.uuid4()),
        "name": "app-1",
        "overlay_id": str(uuid.uuid4()),
        "task_id": str(uuid.uuid4()),
        "state": "running",
        "stage": "spawning",
        "progress": 0.5,
        "error": None,
        "server": {"status": "BUILD", "task_state": "spawning", "addresses": {}},
        "created_at": "2026-12-08T00:00:00Z",
    }
    values.update(fields)
    return Synthesis.existing(**values)


class TestCase(helpers.TestCase):
    def _setup_test_data(self) -> None:
        super()._setup_test_data()
        self.service_catalog.append(CLOUDLET_CATALOG_ENTRY)

    def patch_api(self, name: str, **kwargs: Any) -> mock.MagicMock:
        """Patch cloudlet_dashboard.api.cloudlet.<name> for this test."""
        patcher = mock.patch(API + name, **kwargs)
        self.addCleanup(patcher.stop)
        return patcher.start()
