"""cloudlet-manage finds the server an operator names, by id or by unique name.

Nova's API is answered by requests_mock here (the command talks HTTP to nova-api; the
all-in-one's e2e.sh runs it against a real one). And a missing nova.conf is a clear error.
"""

import os
import subprocess
import sys

import testtools
from keystoneauth1 import session
from keystoneauth1.token_endpoint import Token
from requests_mock.contrib import fixture as rm_fixture

from cloudlet_nova.cmd.manage import resolve_server

NOVA = "http://nova.test/v2.1"
SERVER = {"id": "0b7e3d0e-1111-4c4c-9a9a-000000000001", "OS-EXT-SRV-ATTR:host": "compute1"}


class ResolveServerTest(testtools.TestCase):
    def setUp(self):
        super().setUp()
        self.http = self.useFixture(rm_fixture.Fixture())
        self.sess = session.Session(auth=Token(NOVA, "token"))

    def test_by_id(self):
        self.http.get(f"{NOVA}/servers/{SERVER['id']}", json={"server": SERVER})
        self.assertEqual((SERVER["id"], "compute1"), resolve_server(self.sess, SERVER["id"]))

    def test_by_unique_name(self):
        self.http.get(f"{NOVA}/servers/vm1", status_code=404, json={})
        self.http.get(f"{NOVA}/servers?name=%5Evm1%24", json={"servers": [{"id": SERVER["id"]}]})
        self.http.get(f"{NOVA}/servers/{SERVER['id']}", json={"server": SERVER})
        self.assertEqual((SERVER["id"], "compute1"), resolve_server(self.sess, "vm1"))

    def test_unknown_or_ambiguous_name_is_a_clear_error(self):
        self.http.get(f"{NOVA}/servers/vm1", status_code=404, json={})
        self.http.get(f"{NOVA}/servers?name=%5Evm1%24", json={"servers": []})
        err = self.assertRaises(SystemExit, resolve_server, self.sess, "vm1")
        self.assertIn("no server with id or name 'vm1'", str(err))
        two = {"servers": [{"id": "a"}, {"id": "b"}]}
        self.http.get(f"{NOVA}/servers?name=%5Evm1%24", json=two)
        err = self.assertRaises(SystemExit, resolve_server, self.sess, "vm1")
        self.assertIn("2 servers are named 'vm1'", str(err))


class MissingConfigTest(testtools.TestCase):
    """An operator who names a nova.conf that is not there gets one clear line, no traceback
    (run as its own process: the command parses Nova's global configuration)."""

    def test_missing_config_file_is_a_clear_error(self):
        missing = "/nonexistent/etc/nova/nova.conf"
        code = (
            "import sys; from cloudlet_nova.cmd.manage import main; "
            f"sys.exit(main(['cloudlet-manage', '--config-file', {missing!r}, "
            "'base', 'create', 'vm1', '--name', 'warm']))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
            env={**os.environ, "OS_AUTH_URL": ""},
        )  # fmt: skip
        self.assertEqual(1, proc.returncode)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertIn(f"cloudlet-manage: config file not found: {missing}", proc.stderr)
        self.assertIn("--config-file", proc.stderr)
