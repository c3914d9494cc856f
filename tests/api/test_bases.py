"""What `GET /bases` and `/bases/{id}` tell about a base: its disk and memory image sizes, the
configuration its memory snapshot was saved with, and which compute hosts cache it (behind
policy cloudlet:base:cache_hosts), through the API, the SDK and the CLI. Glance and Placement
are the stand-ins of standins.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openstack

from cloudlet_nova.cache import base_trait
from cloudletclient.sdk import register
from tests.api import objects, standins
from tests.api.conftest import API, PROJECT_A
from tests.api.test_client import cli, credentials


def _base(api: API, persona: str, disk: str) -> dict:
    resp = api.call(persona, "GET", f"/bases/{disk}")
    assert resp.status_code == 200, resp.text
    return resp.json()["base"]


def _listed(api: API, persona: str, disk: str) -> dict:
    resp = api.call(persona, "GET", "/bases")
    assert resp.status_code == 200, resp.text
    (base,) = [b for b in resp.json()["bases"] if b["id"] == disk]
    return base


def test_sizes_and_configuration_of_a_published_base(api: API) -> None:
    disk, base_id = objects.real_base(api, PROJECT_A, seed=11)
    images = api.env.cloud.images
    memory = images[disk]["cloudlet_memory_image"]
    recorded = json.loads(images[disk]["cloudlet_config"])
    for base in (_base(api, "reader", disk), _listed(api, "reader", disk)):
        assert base["base_id"] == base_id
        assert base["disk_size"] == Path(api.env.cloud.image_data[disk]).stat().st_size
        assert base["memory_size"] == Path(api.env.cloud.image_data[memory]).stat().st_size
        assert base["memory_size"] != base["disk_size"]
        assert base["configuration"] == recorded
    config = base["configuration"]
    assert set(config) == {"machine", "memory_mib", "vcpus", "cpu", "devices", "qemu_version"}
    assert set(config["devices"]) == {"disk_bus", "nic_model", "balloon", "display"}
    assert config["memory_mib"] > 0 and config["vcpus"] > 0


def test_a_base_published_before_configuration_was_recorded(api: API) -> None:
    disk, _, _ = objects.base(api, PROJECT_A)
    base = _base(api, "reader", disk)
    assert base["configuration"] is None
    assert base["memory_size"] == len(b"bundle")


def test_memory_size_is_unknown_when_the_memory_image_is_gone(api: API) -> None:
    disk, memory, _ = objects.base(api, PROJECT_A)
    del api.env.cloud.images[memory]
    assert _base(api, "reader", disk)["memory_size"] is None
    assert _listed(api, "reader", disk)["memory_size"] is None


def test_cached_on_names_the_hosts_whose_provider_has_the_base_trait(api: API) -> None:
    disk, _, base_id = objects.base(api, PROJECT_A)
    other_disk, _, other_id = objects.base(api, PROJECT_A)
    cloud = api.env.cloud
    cloud.add_provider("edge-2", {base_trait(base_id), "COMPUTE_NET_VIF_MODEL_E1000"})
    cloud.add_provider("edge-1", {base_trait(base_id), base_trait(other_id)})
    cloud.add_provider("edge-3", {"CUSTOM_CLOUDLET_BASE_" + "0" * 32})
    assert _base(api, "reader", disk)["cached_on"] == ["edge-1", "edge-2"]
    assert _listed(api, "reader", disk)["cached_on"] == ["edge-1", "edge-2"]
    assert _base(api, "reader", other_disk)["cached_on"] == ["edge-1"]
    assert _listed(api, "reader", other_disk)["cached_on"] == ["edge-1"]
    lonely, _, _ = objects.base(api, PROJECT_A)
    assert _base(api, "reader", lonely)["cached_on"] == []
    assert _listed(api, "reader", lonely)["cached_on"] == []


def test_a_list_asks_placement_as_often_however_many_bases(api: API) -> None:
    cloud = api.env.cloud
    objects.base(api, PROJECT_A)
    objects.base(api, PROJECT_A)

    def placement_requests_of_a_list() -> int:
        before = cloud.placement_requests
        assert api.call("reader", "GET", "/bases").status_code == 200
        return cloud.placement_requests - before

    few = placement_requests_of_a_list()
    for _ in range(5):
        objects.base(api, PROJECT_A)
    assert placement_requests_of_a_list() == few == 1 + len(cloud.providers)


def test_an_operator_can_hide_cache_hosts(api_factory: Callable[..., API], tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text('"cloudlet:base:cache_hosts": "role:admin"\n')
    api = api_factory(policy_file=policy_file)
    disk, _, base_id = objects.base(api, PROJECT_A)
    api.env.cloud.add_provider("edge-9", {base_trait(base_id)})
    before = api.env.cloud.placement_requests
    assert "cached_on" not in _base(api, "member", disk)
    assert "cached_on" not in _listed(api, "member", disk)
    assert api.env.cloud.placement_requests == before  # host names were not even read
    assert _base(api, "admin", disk)["cached_on"] == ["edge-9"]
    assert "edge-9" in _listed(api, "admin", disk)["cached_on"]


def test_another_projects_private_base_stays_hidden(api: API) -> None:
    disk, _, base_id = objects.base(api, PROJECT_A)
    api.env.cloud.add_provider("edge-5", {base_trait(base_id)})
    resp = api.call("reader_b", "GET", f"/bases/{disk}")
    assert resp.status_code == 404, resp.text
    listed = api.call("reader_b", "GET", "/bases").json()["bases"]
    assert disk not in [b["id"] for b in listed]
    assert base_id not in [b["base_id"] for b in listed]


def test_sdk_and_cli_show_them(api: API) -> None:
    """What the dashboard's Base VMs table shows, through the SDK and `openstack cloudlet`."""
    cloud = api.env.cloud
    cloud.cloudlet_url = api.url  # the catalog's cloudlet endpoint, for the client
    try:
        _sdk_and_cli_show_them(api, cloud)
    finally:
        cloud.cloudlet_url = ""


def _sdk_and_cli_show_them(api: API, cloud: standins.Cloud) -> None:
    disk, base_id = objects.real_base(api, PROJECT_A, seed=12)
    cloud.add_provider("edge-7", {base_trait(base_id)})
    memory = cloud.images[disk]["cloudlet_memory_image"]
    recorded = json.loads(cloud.images[disk]["cloudlet_config"])
    creds = credentials(api, "reader")
    conn = register(
        openstack.connect(
            auth_url=creds["OS_AUTH_URL"],
            username=creds["OS_USERNAME"],
            password=creds["OS_PASSWORD"],
            project_name=PROJECT_A,
            user_domain_id="default",
            project_domain_id="default",
            region_name="RegionOne",
        )
    )
    for base in (conn.cloudlet.get_base(disk), *[b for b in conn.cloudlet.bases() if b.id == disk]):
        assert base.disk_size == Path(cloud.image_data[disk]).stat().st_size
        assert base.memory_size == Path(cloud.image_data[memory]).stat().st_size
        assert (base.configuration, base.cached_on) == (recorded, ["edge-7"])

    shown = json.loads(cli(api, "reader", "base", "show", disk, "-f", "json").stdout)
    assert (shown["configuration"], shown["cached_on"]) == (recorded, ["edge-7"])
    assert shown["memory_size"] == Path(cloud.image_data[memory]).stat().st_size
    listed = json.loads(cli(api, "reader", "base", "list", "-f", "json").stdout)
    (row,) = [b for b in listed if b["id"] == disk]
    assert (row["cached_on"], row["disk_size"]) == (["edge-7"], shown["disk_size"])
    table = cli(api, "reader", "base", "show", disk, "-c", "configuration", "-c", "cached_on")
    assert f"machine='{recorded['machine']}'" in table.stdout
    assert "edge-7" in table.stdout
