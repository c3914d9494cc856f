"""The dashboard's API wrapper (cloudlet_dashboard.api.cloudlet) against the in-suite
cloudlet-api over real HTTP: the connection Horizon builds from the user's token and the
catalog's `cloudlet` endpoint, and the service's refusals arriving as CloudletError with the
service's message. Keystone, Glance and Nova behind the API are the stand-ins of standins.py.

Each check runs in a child Python with the dashboard's Django settings (Horizon's modules
read them on import), so this pytest process stays free of Django."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.api import objects
from tests.api.conftest import API, PROJECT_A

CHILD = r"""
import json, os, sys
import django
django.setup()
from types import SimpleNamespace
from cloudlet_dashboard.api import cloudlet

url, token = os.environ["CLOUDLET_URL"], os.environ["CLOUDLET_TOKEN"]
catalog = [{"type": "cloudlet", "name": "cloudlet", "endpoints": [
    {"region": "RegionOne", "interface": "public", "url": url}]}]
user = SimpleNamespace(token=SimpleNamespace(id=token), services_region="RegionOne",
                       service_catalog=catalog)
request = SimpleNamespace(user=user, META={"REMOTE_ADDR": "127.0.0.1"})
out = {"bases": [b.id for b in cloudlet.base_list(request)]}
try:
    cloudlet.base_delete(request, sys.argv[1])
    out["delete"] = "deleted"
except cloudlet.CloudletError as e:
    out["delete"] = [str(e), e.status_code]
print(json.dumps(out))
"""


def run_as(api: API, persona: str, base: str) -> dict:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="cloudlet_dashboard.test.settings",
        CLOUDLET_URL=api.url,
        CLOUDLET_TOKEN=api.env.tokens[persona],
    )
    done = subprocess.run(
        [sys.executable, "-c", CHILD, base], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_dashboard_talks_to_the_service_with_the_users_token(api: API) -> None:
    base, _, _ = objects.base(api, PROJECT_A)
    member = run_as(api, "member", base)
    assert base in member["bases"]
    # a member may not delete a base (the default rule wants a manager): the service's message
    message, status = member["delete"]
    assert status == 403
    assert "cloudlet:base:delete" in message
    # another project's manager does not see it, and deleting it is "not found"
    outsider = run_as(api, "manager_b", base)
    assert base not in outsider["bases"]
    assert outsider["delete"][1] == 404, outsider
    assert base in api.env.cloud.images
