"""The client against the in-suite cloudlet-api: the openstacksdk proxy (`conn.cloudlet`) and the
`openstack cloudlet ...` commands exactly as a user types them (a real `openstack` process per
command). Keystone, Glance and Nova behind the API are the stand-ins of standins.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import openstack
import pytest

from cloudlet.basevm.package import export_base, import_base
from cloudlet.basevm.store import BaseStore
from cloudlet.chunks import CHUNK_SIZE, Kind, Target
from cloudlet.errors import UnsupportedFormat
from cloudlet.home import CloudletHome
from cloudlet.overlay.writer import OverlayWriter
from cloudlet_nova import glance as cloudlet_glance
from cloudletclient.sdk import register
from tests.api import objects, standins
from tests.api.conftest import API, PROJECT_A
from tests.unit.test_basevm_package import rewrite
from tests.unit.test_basevm_store import make_base_dir

OPENSTACK = Path(sys.executable).parent / "openstack"
FLAVOR = {"id": "f1", "name": "m1.cloudlet", "ram": 512, "vcpus": 1, "disk": 1}
NETWORK = {"id": "0c7f0d8e-3b5a-4d57-9c43-2b1f5d6e7a80", "name": "cloudlet-net"}


@pytest.fixture(scope="module")
def cloud(api: API) -> Iterator[standins.Cloud]:
    cloud = api.env.cloud
    cloud.cloudlet_url = api.url
    cloud.flavors[FLAVOR["id"]] = FLAVOR
    cloud.networks[NETWORK["id"]] = NETWORK
    yield cloud
    cloud.cloudlet_url = ""


def credentials(api: API, persona: str) -> dict[str, str]:
    project = "project-b" if persona.endswith("_b") else PROJECT_A
    return {
        "OS_AUTH_URL": f"{api.env.keystone.url}/v3",
        "OS_USERNAME": f"{persona}-user",
        "OS_PASSWORD": standins.USER_PASSWORD,
        "OS_PROJECT_NAME": project,
        "OS_USER_DOMAIN_ID": "default",
        "OS_PROJECT_DOMAIN_ID": "default",
        "OS_IDENTITY_API_VERSION": "3",
        "OS_INTERFACE": "public",
        "OS_REGION_NAME": "RegionOne",
    }


def cli(api: API, persona: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env.update(credentials(api, persona))
    return subprocess.run(
        [str(OPENSTACK), "cloudlet", *args], env=env, capture_output=True, text=True, timeout=120
    )


def named_overlay(api: API, project: str = PROJECT_A) -> tuple[str, str]:
    overlay = objects.overlay(api, project)
    name = f"app-{uuid.uuid4().hex[:8]}"
    api.env.cloud.images[overlay]["name"] = name
    return overlay, name


def member_connection(api: API) -> openstack.connection.Connection:
    creds = credentials(api, "member")
    return register(
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


def test_sdk_proxy(api: API, cloud: standins.Cloud) -> None:
    overlay, name = named_overlay(api)
    conn = member_connection(api)
    assert overlay in [o.id for o in conn.cloudlet.overlays()]
    found = conn.cloudlet.find_overlay(name)
    assert (found.id, found.base_id) == (overlay, cloud.images[overlay]["cloudlet_base_id"])
    server = objects.server(api, PROJECT_A)
    task = conn.cloudlet.create_overlay(server, "captured")
    assert (task.kind, task.state, task.host) == ("capture-overlay", "running", "host1")

    def finish() -> None:
        host_task = api.host.tasks[task.id]
        host_task.state, host_task.images = "succeeded", {"overlay": "img-9"}

    threading.Timer(0.5, finish).start()
    done = conn.cloudlet.wait_for_task(task, timeout=60, interval=0.1)
    assert done.images == {"overlay": "img-9"}
    with pytest.raises(openstack.exceptions.NotFoundException, match="not found"):
        conn.cloudlet.get_overlay(str(uuid.uuid4()))


def test_sdk_overlay_summary_and_streams(api: API, cloud: standins.Cloud, tmp_path: Path) -> None:
    """What the dashboard shows of an overlay: the summary of a real overlay file read from the
    head of its download, and the file relayed as a stream."""
    disk, _, base_id = objects.base(api, PROJECT_A)
    path = tmp_path / "app.overlay"
    with OverlayWriter(path, base_id) as w:
        w.set_image(Target.DISK, 8 * CHUNK_SIZE, "00" * 32)
        w.set_image(Target.MEMORY, 4 * CHUNK_SIZE, "11" * 32)
        w.add_new(Target.DISK, 0, b"d" * CHUNK_SIZE)
        w.add_new(Target.MEMORY, 1, b"m" * CHUNK_SIZE)
        w.add_ref(Target.DISK, 3, Kind.ZERO)
        w.add_ref(Target.MEMORY, 2, Kind.BASE_DISK, 5)
    data = path.read_bytes()
    overlay = cloud.add_image(
        PROJECT_A, "app", cloudlet_glance.overlay_properties(base_id, disk), data
    )
    conn = member_connection(api)
    assert register(conn) is conn and conn.cloudlet is register(conn).cloudlet  # idempotent
    summary = conn.cloudlet.overlay_summary(overlay)
    assert summary["base_id"] == base_id
    assert summary["images"]["disk"]["size"] == 8 * CHUNK_SIZE
    assert summary["images"]["memory"]["size"] == 4 * CHUNK_SIZE
    assert summary["chunks"] == {"ZERO": 1, "BASE_MEMORY": 0, "BASE_DISK": 1, "SELF": 0, "NEW": 2}
    download = conn.cloudlet.open_overlay_file(overlay)
    assert (download.size, b"".join(download.chunks)) == (len(data), data)
    not_an_overlay = objects.overlay(api, PROJECT_A)
    with pytest.raises(UnsupportedFormat, match="not a cloudlet overlay"):
        conn.cloudlet.overlay_summary(not_an_overlay)


def test_cli_list_show_download(api: API, cloud: standins.Cloud, tmp_path: Path) -> None:
    overlay, name = named_overlay(api)
    listed = cli(api, "reader", "overlay", "list", "-f", "json")
    assert listed.returncode == 0, listed.stderr
    assert name in [o["name"] for o in json.loads(listed.stdout)]
    shown = cli(api, "reader", "overlay", "show", name, "-f", "value", "-c", "id")
    assert shown.stdout.strip() == overlay
    out = tmp_path / "app.overlay"
    got = cli(api, "reader", "overlay", "download", name, "--file", str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == objects.OVERLAY_DATA
    yaml = cli(api, "reader", "overlay", "show", overlay, "-f", "yaml")
    assert f"name: {name}" in yaml.stdout


def test_cli_import_wait_and_refusal(api: API, cloud: standins.Cloud, tmp_path: Path) -> None:
    store = BaseStore(CloudletHome(tmp_path / "home"))
    base = store.add_from_directory(make_base_dir(tmp_path / "staging", seed=99), "web")
    package = export_base(store, base.id, tmp_path / "web.cbase")
    done = cli(
        api, "member", "base", "import", str(package), "--name", "web-cli", "--wait", "-f", "json"
    )
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert (task["state"], task["base_id"]) == ("succeeded", base.id)
    assert "%]" in done.stderr  # the progress line
    shown = cli(api, "reader", "base", "show", task["images"]["disk"], "-f", "json")
    assert json.loads(shown.stdout)["base_id"] == base.id

    exported = tmp_path / "exported.cbase"
    got = cli(api, "reader", "base", "export", "web-cli", "--file", str(exported))
    assert got.returncode == 0, got.stderr
    assert import_base(BaseStore(CloudletHome(tmp_path / "other")), exported).base.id == base.id

    def flip(members: list) -> list:
        return [
            (i, d[:10] + bytes([d[10] ^ 1]) + d[11:]) if i.name == "memory.layout" else (i, d)
            for i, d in members
        ]

    images = dict(cloud.images)
    bad = cli(api, "member", "base", "import", str(rewrite(package, flip)), "--wait")
    assert bad.returncode == 1
    assert "memory.layout has sha256" in bad.stderr
    assert cloud.images == images


def test_cli_capture_and_synthesize_by_name(api: API, cloud: standins.Cloud) -> None:
    server = objects.server(api, PROJECT_A)
    server_name = f"vm-{uuid.uuid4().hex[:8]}"
    cloud.servers[server]["name"] = server_name
    made = cli(
        api,
        "member",
        "overlay",
        "create",
        server_name,
        "--name",
        "cap",
        "--after",
        "delete",
        "-f",
        "json",
    )
    assert made.returncode == 0, made.stderr
    _, _, request = api.host.requests[-1]
    assert (request.instance_uuid, request.after) == (server, "delete")

    overlay, name = named_overlay(api)
    synth = cli(
        api,
        "member",
        "synthesize",
        name,
        "--flavor",
        FLAVOR["name"],
        "--network",
        NETWORK["name"],
        "--name",
        "app1",
        "-f",
        "json",
    )
    assert synth.returncode == 0, synth.stderr
    created = cloud.servers[json.loads(synth.stdout)["id"]]
    assert created["request"] == {
        "name": "app1",
        "imageRef": overlay,
        "flavorRef": FLAVOR["id"],
        "networks": [{"uuid": NETWORK["id"]}],
    }
    listed = cli(api, "reader", "synthesis", "list", "-f", "value", "-c", "id")
    assert json.loads(synth.stdout)["id"] in listed.stdout.split()
    tasks = cli(api, "reader", "task", "list", "--kind", "synthesize", "-f", "json")
    assert tasks.returncode == 0 and json.loads(tasks.stdout)


def test_sdk_and_cli_show_the_hosts_synthesis_statistics(api: API, cloud: standins.Cloud) -> None:
    _, name = named_overlay(api)
    synth = cli(
        api, "member", "synthesize", name, "--flavor", FLAVOR["name"], "--no-network",
        "--name", "app3", "-f", "json",
    )  # fmt: skip
    assert synth.returncode == 0, synth.stderr
    server_id = json.loads(synth.stdout)["id"]
    assert json.loads(synth.stdout)["statistics"] is None  # the host has no record yet
    api.host.syntheses[server_id] = objects.synthesis_record(server_id, PROJECT_A)
    creds = credentials(api, "reader")
    conn = register(
        openstack.connect(
            auth_url=creds["OS_AUTH_URL"], username=creds["OS_USERNAME"],
            password=creds["OS_PASSWORD"], project_name=PROJECT_A, user_domain_id="default",
            project_domain_id="default", region_name="RegionOne",
        )
    )  # fmt: skip
    stats = conn.cloudlet.get_synthesis(server_id).statistics
    assert [s["name"] for s in stats["stages"]][:2] == ["fetch base", "open + verify manifest"]
    shown = cli(api, "reader", "synthesis", "show", server_id, "-f", "json")
    assert json.loads(shown.stdout)["statistics"] == stats
    table = cli(api, "reader", "synthesis", "show", server_id, "-c", "statistics")
    assert table.returncode == 0, table.stderr
    # the value column of the table, one stage a line, in the order the stages started
    lines = [row.split("|")[2].strip() for row in table.stdout.splitlines() if "|" in row][1:]
    assert lines[0] == "running since 2026-12-08T00:00:00+00:00"
    assert [line.split("  ")[0] for line in lines[1:5]] == [
        "fetch base", "open + verify manifest", "apply overlay", "restore memory"
    ]  # fmt: skip
    assert lines[3].split() == ["apply", "overlay", "0.30", "-", "2.50", "s", "1.00", "s",
                                "4096", "B"]  # fmt: skip
    assert lines[-1] == "frames fetched on demand: 3"


def test_cli_synthesize_without_a_network(api: API, cloud: standins.Cloud) -> None:
    overlay, name = named_overlay(api)
    synth = cli(
        api, "member", "synthesize", name, "--flavor", FLAVOR["name"], "--no-network",
        "--name", "app2", "-f", "json",
    )  # fmt: skip
    assert synth.returncode == 0, synth.stderr
    assert cloud.servers[json.loads(synth.stdout)["id"]]["request"]["networks"] == "none"


def test_cli_another_project_is_refused_with_the_services_message(
    api: API, cloud: standins.Cloud
) -> None:
    overlay, _ = named_overlay(api)
    for args in (
        ("overlay", "show", overlay),
        ("overlay", "delete", overlay),
        ("overlay", "download", overlay, "--file", "/dev/null"),
    ):
        got = cli(api, "member_b", *args)
        assert got.returncode == 1, args
        assert "no overlay with id or name" in got.stderr, got.stderr
    assert overlay in cloud.images
    denied = cli(api, "reader", "overlay", "delete", overlay)
    assert denied.returncode == 1
    assert "cloudlet:overlay:delete" in denied.stderr
