"""Elijah's server actions on Nova's endpoint (cloudlet_api/nova_actions.py) through the real
nova-api: Nova's own api-paste.ini made by etc/nova-api-paste.sed (as the all-in-one and the
DevStack plugin make it), loaded by Nova's OSAPIFixture with its real keystonemiddleware
auth_token and NovaKeystoneContext (not the framework's stubs), Nova's real policy, a real
compute service running the cloudlet driver, and cloudlet-api itself (its WSGI app from
cloudlet_api.deploy, in-process over real HTTP on 127.0.0.1) which the filter calls with the
caller's token.

Stood in: Keystone (tests/api/standins.Keystone: issues the tokens Nova's and cloudlet-api's
auth_token validate, with a catalog naming this nova-api and this cloudlet-api), Glance (Nova's
GlanceFixture, made to enforce ownership), libvirtd + QEMU (fakelibvirt with real save files),
the message bus (oslo.messaging's fake transport, shared by Nova and cloudlet-api).
"""

from __future__ import annotations

import selectors
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import fixtures
import requests
from keystonemiddleware import auth_token
from nova import conf as nova_conf
from nova.tests.functional.api import client as api_client
from oslo_config import cfg

from cloudlet_api import conf as api_conf
from cloudlet_api import deploy
from cloudlet_nova import glance
from cloudlet_nova.tests import fixtures as cf
from cloudlet_nova.tests.capture_base import CaptureTestBase
from tests.api import standins
from tests.api.conftest import Env, write_config

CONF = nova_conf.CONF
REPO = Path(__file__).resolve().parents[2]
PASTE_SED = REPO / "etc" / "nova-api-paste.sed"
MEMBER = ["reader", "member"]
TASK_TIMEOUT = 120.0  # seconds a capture of the test's small VM may take under load


class NovaActionsTest(CaptureTestBase):
    STUB_KEYSTONE = False  # Nova authenticates every request with auth_token, as deployed
    ADMIN_API = False  # self.api: a member of project A

    def _setup_services(self) -> None:
        # socketserver was imported before Nova's eventlet monkey patching: its serve loop
        # would block every green thread in an unpatched poll()
        self.useFixture(fixtures.MonkeyPatch("socketserver._ServerSelector",
                                             selectors.DefaultSelector))
        self.cloud = standins.Cloud()
        self.keystone = standins.Keystone(self.cloud)
        self.addCleanup(self.keystone.server.stop)
        self.tokens: dict[tuple[str, str, tuple[str, ...]], str] = {}
        self._nova_authenticates_with(self.keystone)
        self._test_clients_log_in()
        super()._setup_services()
        # the catalog in every token: this nova-api, and cloudlet-api (started below)
        self.cloud.nova_url = self.api_fixture.base_url
        self.cloudlet = self._start_cloudlet_api(Path(self.useFixture(fixtures.TempDir()).path))
        self.cloud.cloudlet_url = self.cloudlet.url
        self.api_b = api_client.TestOpenStackClient(
            "user-b", self.api_fixture.base_url, project_id=cf.PROJECT_B, roles=MEMBER)
        for client in (self.api, self.api_b, self.api_fixture.reader_api):
            client.microversion = self.microversion

    def _nova_authenticates_with(self, keystone: standins.Keystone) -> None:
        """nova-api's pipeline from the shipped api-paste.ini + etc/nova-api-paste.sed, its
        auth_token configured as a deployment's ([keystone_authtoken], Nova's service user)."""
        shipped = CONF.wsgi.api_paste_config  # Nova's, as its Loader finds it
        shipped = shipped if Path(shipped).is_absolute() else CONF.find_file(shipped)
        paste = Path(self.useFixture(fixtures.TempDir()).path) / "api-paste.ini"
        paste.write_bytes(subprocess.run(["sed", "-f", str(PASTE_SED), shipped], check=True,
                                         capture_output=True, timeout=30).stdout)
        self.flags(api_paste_config=str(paste), group="wsgi")
        # nova.conf's [keystone_authtoken] as deployed, in a configuration of its own: the
        # password plugin's options would stay registered (required) on Nova's global CONF
        nova_conf_file = paste.parent / "nova.conf"
        nova_conf_file.write_text(
            f"[keystone_authtoken]\nwww_authenticate_uri = {keystone.url}\n"
            f"auth_type = password\nauth_url = {keystone.url}/v3\n"
            f"username = {standins.SERVICE_USER[0]}\npassword = {standins.SERVICE_USER[1]}\n"
            f"project_name = {standins.SERVICE_PROJECT}\n"
            "user_domain_id = default\nproject_domain_id = default\n")
        authtoken_conf = cfg.ConfigOpts()
        authtoken_conf([], project="nova", default_config_files=[str(nova_conf_file)])
        factory = auth_token.filter_factory

        def configured(global_conf, **local_conf):  # noqa: ANN001, ANN202
            return factory(global_conf, oslo_config_config=authtoken_conf, **local_conf)

        self.useFixture(fixtures.MonkeyPatch(
            "keystonemiddleware.auth_token.filter_factory", configured))

    def _test_clients_log_in(self) -> None:
        """Nova's test clients send a Keystone token for the identity they claim."""
        request = api_client.TestOpenStackClient.request
        test = self

        def with_token(client, url, method="GET", body=None, headers=None):  # noqa: ANN001, ANN202
            headers = {"X-Auth-Token": test.token(client.auth_user, client.project_id,
                                                  client.roles), **(headers or {})}
            return request(client, url, method=method, body=body, headers=headers)

        self.useFixture(fixtures.MonkeyPatch(
            f"{api_client.__name__}.TestOpenStackClient.request", with_token))

    def token(self, user: str, project_id: str, roles: list[str]) -> str:
        key = (user, project_id, tuple(roles))
        if key not in self.tokens:
            ident = standins.Identity(f"tok-{uuid.uuid4().hex}", user, project_id, list(roles))
            self.cloud.tokens[ident.token] = ident
            self.tokens[key] = ident.token
        return self.tokens[key]

    def _start_cloudlet_api(self, tmp: Path, **options: Any) -> standins.HTTPServer:
        env = Env(self.cloud, self.keystone, {})
        conf = cfg.ConfigOpts()
        api_conf.register_opts(conf)
        conf([], project="cloudlet", default_config_files=[str(write_config(
            env, tmp / "state", **options))])
        server = standins.HTTPServer(deploy.loadapp(conf))
        self.addCleanup(server.stop)
        return server

    # -- helpers ---------------------------------------------------------------------------

    def action(self, client: api_client.TestOpenStackClient, server_id: str,
               body: dict) -> requests.Response:
        return client.api_request(f"/servers/{server_id}/action", method="POST",
                                  body=_json(body))

    def task(self, client: api_client.TestOpenStackClient, task_id: str) -> dict:
        """Poll the task on cloudlet-api, as the caller, until it ends (bounded)."""
        token = self.token(client.auth_user, client.project_id, client.roles)
        deadline = time.monotonic() + TASK_TIMEOUT
        while True:
            resp = requests.get(f"{self.cloudlet.url}/tasks/{task_id}",
                                headers={"X-Auth-Token": token}, timeout=60)
            self.assertEqual(200, resp.status_code, resp.text)
            task = resp.json()["task"]
            if task["state"] != "running" or time.monotonic() > deadline:
                return task
            time.sleep(0.1)

    def started(self, resp: requests.Response) -> dict:
        self.assertEqual(202, resp.status_code, resp.text)
        task = resp.json()["task"]
        self.assertEqual(f"{self.cloudlet.url}/tasks/{task['id']}", resp.headers["Location"])
        return task

    def assert_refused(self, resp: requests.Response, status: int, fault: str,
                       *words: str) -> None:
        self.assertEqual(status, resp.status_code, resp.text)
        message = resp.json()[fault]["message"]
        for w in words:
            self.assertIn(w, message)

    def cloudlet_tasks(self, client: api_client.TestOpenStackClient) -> list[dict]:
        token = self.token(client.auth_user, client.project_id, client.roles)
        resp = requests.get(f"{self.cloudlet.url}/tasks", headers={"X-Auth-Token": token},
                            timeout=60)
        self.assertEqual(200, resp.status_code, resp.text)
        return resp.json()["tasks"]

    # -- tests -----------------------------------------------------------------------------

    def test_overlay_finish_captures_then_deletes_the_server_as_elijah_did(self) -> None:
        server = self.boot(self.images.disk_image)
        self.customise(server)
        resp = self.action(self.api, server["id"],
                           {"cloudlet-overlay-finish": {"overlay-name": "web-overlay"}})
        task = self.task(self.api, self.started(resp)["id"])
        self.assertEqual(("capture-overlay", "succeeded"), (task["kind"], task["state"]),
                         task["error"])
        overlay = self.glance.show(None, task["images"]["overlay"])
        self.assertEqual(("web-overlay", cf.PROJECT_A), (overlay["name"], overlay["owner"]))
        self.assertEqual(glance.Kind.OVERLAY, glance.describe(overlay).kind)
        self._wait_until_deleted(server)
        self.assert_no_leftovers()

    def test_overlay_finish_after_resume_and_base_keep_the_server_running(self) -> None:
        server = self.boot(self.images.disk_image)
        resp = self.action(self.api, server["id"], {"cloudlet-overlay-finish": {
            "overlay-name": "kept", "after": "resume"}})
        task = self.task(self.api, self.started(resp)["id"])
        self.assertEqual("succeeded", task["state"], task["error"])
        resp = self.action(self.api, server["id"], {"cloudlet-base": {"name": "warm"}})
        task = self.task(self.api, self.started(resp)["id"])
        self.assertEqual(("create-base", "succeeded"), (task["kind"], task["state"]),
                         task["error"])
        disk = glance.describe(self.glance.show(None, task["images"]["disk"]))
        self.assertEqual((glance.Kind.BASE_DISK, task["base_id"]), (disk.kind, disk.base_id))
        self.assertEqual(cf.PROJECT_A, self.glance.show(None, task["images"]["disk"])["owner"])
        server = self.api.get_server(server["id"])
        self.assertEqual(("ACTIVE", None), (server["status"], server["OS-EXT-STS:task_state"]))
        self.assertTrue(self.domain_running(server))

    def test_another_project_and_a_reader_are_refused_nothing_started(self) -> None:
        server = self.boot(self.images.disk_image)
        images = set(self.glance.images)
        for body in ({"cloudlet-overlay-finish": {"overlay-name": "stolen"}},
                     {"cloudlet-base": {"name": "stolen"}}):
            # B's member: Nova does not show B the server (cloudlet-api asked it with B's token)
            self.assert_refused(self.action(self.api_b, server["id"], body), 404,
                                "itemNotFound", server["id"])
            # A's reader: cloudlet-api's policy (capture and base creation are a member's)
            rule = ("cloudlet:overlay:create" if "cloudlet-overlay-finish" in body
                    else "cloudlet:base:create")
            self.assert_refused(self.action(self.api_fixture.reader_api, server["id"], body),
                                403, "forbidden", f"policy does not allow {rule}")
        # no token: Nova's auth_token answers before the filter
        resp = requests.post(f"{self.api_fixture.base_url}/servers/{server['id']}/action",
                             json={"cloudlet-base": {"name": "anonymous"}}, timeout=60)
        self.assertEqual(401, resp.status_code, resp.text)
        self.assertEqual([], self.cloudlet_tasks(self.api_b))
        self.assertEqual([], self.cloudlet_tasks(self.api))
        self.assertEqual(images, set(self.glance.images))
        server = self.api.get_server(server["id"])
        self.assertEqual(("ACTIVE", None), (server["status"], server["OS-EXT-STS:task_state"]))

    def test_cloudlet_api_policy_file_applies_to_the_nova_action(self) -> None:
        tmp = Path(self.useFixture(fixtures.TempDir()).path)
        (tmp / "policy.yaml").write_text('"cloudlet:overlay:create": "role:admin"\n')
        self.cloudlet = self._start_cloudlet_api(tmp, policy_file=tmp / "policy.yaml")
        self.cloud.cloudlet_url = self.cloudlet.url
        server = self.boot(self.images.disk_image)
        resp = self.action(self.api, server["id"],
                           {"cloudlet-overlay-finish": {"overlay-name": "x", "after": "resume"}})
        self.assert_refused(resp, 403, "forbidden", "cloudlet:overlay:create")

    def test_bad_arguments_are_refused_with_the_field_named(self) -> None:
        server = self.boot(self.images.disk_image)
        for args, words in ((None, "'cloudlet-base' argument"),
                            ({}, "'name' is a required property"),
                            ({"name": "a/b"}, "field 'name'"),
                            ({"name": "x", "public": True}, "'public' was unexpected")):
            self.assert_refused(self.action(self.api, server["id"], {"cloudlet-base": args}),
                                400, "badRequest", words)
        resp = self.action(self.api, server["id"], {"cloudlet-overlay-finish": {
            "overlay-name": "x", "after": "shutdown"}})
        self.assert_refused(resp, 400, "badRequest", "field 'after'", "'shutdown'")
        self.assertEqual([], self.cloudlet_tasks(self.api))

    def test_other_requests_reach_nova_untouched(self) -> None:
        server = self.boot(self.images.disk_image)
        self.api.post_server_action(server["id"], {"pause": None})
        self._wait_for_state_change(server, "PAUSED")
        # not a cloudlet action (handoff is not provided): Nova's own answer
        resp = self.action(self.api, server["id"], {"cloudlet-handoff": {
            "handoff_url": "https://elsewhere.example/", "dest_token": "t"}})
        self.assert_refused(resp, 400, "badRequest", "cloudlet-handoff")
        resp = self.api.api_request(f"/servers/{server['id']}/action", method="POST",
                                    body="{not json")
        self.assert_refused(resp, 400, "badRequest")
        self.assertEqual([], self.cloudlet_tasks(self.api))


def _json(body: Any) -> str:
    import json

    return json.dumps(body)
