"""cloudlet-api over real HTTP (wsgiref on 127.0.0.1) with keystonemiddleware's auth_token and
policy enforced, in front of the stand-ins of standins.py (Keystone, Glance, Nova, Placement and
a compute host's RPC endpoint cannot run inside the suite; the all-in-one proves the real
ones)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.api import standins

PROJECT_A = "project-a"
PROJECT_B = "project-b"
MAX_PACKAGE_MIB = 16
MAX_JSON = 4096


@dataclass
class Env:
    cloud: standins.Cloud
    keystone: standins.Keystone
    tokens: dict[str, str]  # persona -> token


@pytest.fixture(scope="session")
def env() -> Iterator[Env]:
    cloud = standins.Cloud()
    keystone = standins.Keystone(cloud)
    glance = standins.Glance(cloud)
    nova = standins.Nova(cloud)
    neutron = standins.Neutron(cloud)
    placement = standins.Placement(cloud)
    tokens = {}
    for project, suffix in ((PROJECT_A, ""), (PROJECT_B, "_b")):
        for role in ("reader", "member", "manager", "admin"):
            tokens[role + suffix] = cloud.identity(f"{role}{suffix}-user", project, role).token
        # a user on the project with a role no rule accepts
        tokens["outsider" + suffix] = cloud.identity(f"out{suffix}", project, "observer").token
    yield Env(cloud, keystone, tokens)
    for server in (keystone.server, glance.server, nova.server, neutron.server, placement.server):
        server.stop()


def write_config(env: Env, state: Path, **api: Any) -> Path:
    k = env.keystone.url
    auth = (
        f"auth_type = password\nauth_url = {k}/v3\nusername = {standins.SERVICE_USER[0]}\n"
        f"password = {standins.SERVICE_USER[1]}\nproject_name = {standins.SERVICE_PROJECT}\n"
        "user_domain_id = default\nproject_domain_id = default\n"
    )
    options = {
        "state_path": state,
        "max_package_size": MAX_PACKAGE_MIB,
        "max_json_body_size": MAX_JSON,
        **api,
    }
    policy_file = options.pop("policy_file", None)
    text = "[DEFAULT]\ntransport_url = fake:/\n[api]\n"
    text += "".join(f"{key} = {value}\n" for key, value in options.items())
    text += f"[keystone_authtoken]\nwww_authenticate_uri = {k}\n{auth}"
    text += f"[service_user]\n{auth}"
    if policy_file:
        text += f"[oslo_policy]\npolicy_file = {policy_file}\n"
    path = state.parent / f"cloudlet-api-{uuid.uuid4().hex[:6]}.conf"
    path.write_text(text)
    return path


class API:
    """A running cloudlet-api and a client that speaks as a persona."""

    def __init__(self, env: Env, state: Path, **api: Any) -> None:
        from cloudlet_api import deploy

        state.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.conf = deploy.configure([str(write_config(env, state, **api))])
        app = deploy.loadapp(self.conf)
        self.host = standins.ComputeHost(standins.nova_compute_transport())
        self.server = standins.HTTPServer(app)
        self.url = self.server.url
        self.session = requests.Session()

    def call(self, persona: str | None, method: str, path: str, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        if persona is not None:
            headers["X-Auth-Token"] = self.env.tokens[persona]
        return self.session.request(method, self.url + path, headers=headers, timeout=60, **kw)

    def stop(self) -> None:
        self.server.stop()
        self.host.stop()


@pytest.fixture(scope="module")
def api(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[API]:
    server = API(env, tmp_path_factory.mktemp("api") / "state")
    yield server
    server.stop()


@pytest.fixture
def api_factory(env: Env, tmp_path: Path) -> Iterator[Callable[..., API]]:
    started: list[API] = []

    def start(**options: Any) -> API:
        server = API(env, tmp_path / f"state{len(started)}", **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
