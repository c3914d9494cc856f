"""Microversions: `OpenStack-API-Version: cloudlet 1.x` (microversion-parse), as placement.

A request without the header gets the minimum version; `latest` the maximum; anything outside
[MIN, MAX] is 406, a malformed value 400. Every response names the version it was served at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import microversion_parse

from cloudlet_api import errors

SERVICE_TYPE = "cloudlet"
HEADER = "OpenStack-API-Version"
ENVIRON_KEY = "cloudlet.microversion"

# 1.0: bases, overlays, syntheses, tasks.
VERSIONS = ["1.0"]
MIN_VERSION = microversion_parse.Version(*map(int, VERSIONS[0].split(".")))
MAX_VERSION = microversion_parse.Version(*map(int, VERSIONS[-1].split(".")))


def extract(environ: dict[str, Any]) -> microversion_parse.Version:
    headers = microversion_parse.headers_from_wsgi_environ(environ)
    value = microversion_parse.get_version(headers, service_type=SERVICE_TYPE)
    if value is None:
        return MIN_VERSION
    if value.strip() == "latest":
        return MAX_VERSION
    try:
        version = microversion_parse.parse_version_string(value)
    except (TypeError, ValueError):
        raise errors.BadRequest(
            f"invalid {HEADER} value {value!r}: give '{SERVICE_TYPE} 1.x' or '{SERVICE_TYPE} "
            "latest'"
        ) from None
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise errors.NotAcceptable(
            f"{HEADER} {SERVICE_TYPE} {value} is not supported: this service serves "
            f"{MIN_VERSION} to {MAX_VERSION}",
            headers=_headers(None),
        )
    return version


def _headers(version: microversion_parse.Version | None) -> dict[str, str]:
    out = {"Vary": HEADER}
    if version is not None:
        out[HEADER] = f"{SERVICE_TYPE} {version}"
    return out


class MicroversionMiddleware:
    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        version = extract(environ)
        environ[ENVIRON_KEY] = version

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, headers + list(_headers(version).items()), exc_info)

        return self.app(environ, start)
