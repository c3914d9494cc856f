"""The policy matrix, generated from the rule list: for every rule, a persona the default allows
succeeds and one it does not gets 403. A rule added without a case here fails
test_every_rule_has_a_case. Over real HTTP with auth_token and the stand-ins of standins.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from cloudlet_api import policies
from tests.api import objects
from tests.api.conftest import API, PROJECT_A


@dataclass
class Case:
    allowed: str
    denied: str
    request: Callable[[API], tuple[str, str, dict[str, Any]]]  # fresh objects per call
    status: int
    # a rule that guards a field, not an operation: without it the field is left out
    hides: str | None = None


def _get(path: str) -> Callable[[API], tuple[str, str, dict[str, Any]]]:
    return lambda api: ("GET", path, {})


CASES: dict[str, Case] = {
    "cloudlet:base:list": Case("reader", "outsider", _get("/bases"), 200),
    "cloudlet:base:show": Case(
        "reader", "outsider", lambda a: ("GET", f"/bases/{objects.base(a, PROJECT_A)[0]}", {}), 200
    ),
    "cloudlet:base:cache_hosts": Case(
        "reader",
        "outsider",
        lambda a: ("GET", f"/bases/{objects.base(a, PROJECT_A)[0]}", {}),
        200,
        hides="cached_on",
    ),
    "cloudlet:base:export": Case(
        "reader",
        "outsider",
        lambda a: ("GET", f"/bases/{objects.real_base(a, PROJECT_A)[0]}/package", {}),
        200,
    ),
    "cloudlet:base:import": Case(
        "member",
        "reader",
        lambda a: (
            "POST",
            "/bases/import",
            {
                "data": b"checked later, in the task",
                "headers": {"Content-Type": "application/octet-stream"},
            },
        ),
        202,
    ),
    "cloudlet:base:create": Case(
        "member",
        "reader",
        lambda a: (
            "POST",
            "/bases",
            {"json": {"server_id": objects.server(a, PROJECT_A), "name": "warm"}},
        ),
        202,
    ),
    "cloudlet:base:delete": Case(
        "manager",
        "member",
        lambda a: ("DELETE", f"/bases/{objects.base(a, PROJECT_A)[0]}", {}),
        204,
    ),
    "cloudlet:overlay:list": Case("reader", "outsider", _get("/overlays"), 200),
    "cloudlet:overlay:show": Case(
        "reader",
        "outsider",
        lambda a: ("GET", f"/overlays/{objects.overlay(a, PROJECT_A)}", {}),
        200,
    ),
    "cloudlet:overlay:download": Case(
        "reader",
        "outsider",
        lambda a: ("GET", f"/overlays/{objects.overlay(a, PROJECT_A)}/file", {}),
        200,
    ),
    "cloudlet:overlay:create": Case(
        "member",
        "reader",
        lambda a: (
            "POST",
            "/overlays",
            {"json": {"server_id": objects.server(a, PROJECT_A), "name": "app"}},
        ),
        202,
    ),
    "cloudlet:overlay:delete": Case(
        "member",
        "reader",
        lambda a: ("DELETE", f"/overlays/{objects.overlay(a, PROJECT_A)}", {}),
        204,
    ),
    "cloudlet:synthesis:create": Case(
        "member",
        "reader",
        lambda a: (
            "POST",
            "/syntheses",
            {
                "json": {
                    "overlay_id": objects.overlay(a, PROJECT_A),
                    "name": "app1",
                    "flavor_id": "1",
                }
            },
        ),
        202,
    ),
    "cloudlet:synthesis:list": Case("reader", "outsider", _get("/syntheses"), 200),
    "cloudlet:synthesis:show": Case(
        "reader", "outsider", lambda a: ("GET", f"/syntheses/{objects.synthesis(a)}", {}), 200
    ),
    "cloudlet:task:list": Case("reader", "outsider", _get("/tasks"), 200),
    "cloudlet:task:show": Case(
        "reader", "outsider", lambda a: ("GET", f"/tasks/{objects.task(a)}", {}), 200
    ),
}

RULES = [rule.name for rule in policies.list_rules()]


def test_every_rule_has_a_case() -> None:
    assert sorted(RULES) == sorted(CASES), "each policy rule needs a case in CASES"


def test_every_rule_is_project_scoped() -> None:
    for rule in policies.list_rules():
        assert rule.scope_types == ["project"], rule.name


@pytest.mark.parametrize("rule", RULES)
def test_allowed_persona_succeeds(api: API, rule: str) -> None:
    case = CASES[rule]
    method, path, kw = case.request(api)
    resp = api.call(case.allowed, method, path, **kw)
    assert resp.status_code == case.status, resp.text
    if case.hides:
        assert case.hides in resp.json()["base"], resp.text


@pytest.mark.parametrize("rule", [r for r in RULES if CASES[r].hides])
def test_denied_persona_does_not_see_the_field(
    api_factory: Callable[..., API], tmp_path, rule: str
) -> None:
    """The operation opened to everyone by the policy file, so only the field's rule decides."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text('"cloudlet:base:show": "@"\n')
    api = api_factory(policy_file=policy_file)
    case = CASES[rule]
    method, path, kw = case.request(api)
    resp = api.call(case.denied, method, path, **kw)
    assert resp.status_code == case.status, resp.text
    assert case.hides not in resp.json()["base"]


@pytest.mark.parametrize("rule", [r for r in RULES if not CASES[r].hides])
def test_denied_persona_gets_403(api: API, rule: str) -> None:
    case = CASES[rule]
    method, path, kw = case.request(api)
    before = (dict(api.env.cloud.images), dict(api.env.cloud.servers), len(api.host.requests))
    resp = api.call(case.denied, method, path, **kw)
    assert resp.status_code == 403, resp.text
    assert rule in resp.json()["errors"][0]["detail"]
    # refused before anything was done
    assert (
        dict(api.env.cloud.images),
        dict(api.env.cloud.servers),
        len(api.host.requests),
    ) == before


def test_policy_file_overrides_a_default(api_factory: Callable[..., API], tmp_path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text('"cloudlet:overlay:list": "role:admin"\n')
    api = api_factory(policy_file=policy_file)
    assert api.call("member", "GET", "/overlays").status_code == 403
    assert api.call("admin", "GET", "/overlays").status_code == 200
    # the other rules keep their defaults
    assert api.call("reader", "GET", "/bases").status_code == 200
