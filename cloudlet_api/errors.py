"""API errors: each carries its HTTP status and a message a user can act on; the fault
middleware renders them (and anything unexpected, as 500) as JSON:
{"errors": [{"status": 404, "title": "Not Found", "detail": "...", "request_id": "req-..."}]}."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from oslo_log import log as logging

LOG = logging.getLogger(__name__)


class APIError(Exception):
    status = 500

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(APIError):
    status = 400


class Forbidden(APIError):
    status = 403


class NotFound(APIError):
    status = 404


class MethodNotAllowed(APIError):
    status = 405


class NotAcceptable(APIError):
    status = 406


class Conflict(APIError):
    status = 409


class LengthRequired(APIError):
    status = 411


class PayloadTooLarge(APIError):
    status = 413


class UnsupportedMediaType(APIError):
    status = 415


class TooManyRequests(APIError):
    status = 429


class BadGateway(APIError):
    """Glance, Nova or a compute host answered something this service cannot use."""

    status = 502


def render(
    environ: dict[str, Any],
    start_response: Callable,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
) -> Iterable[bytes]:
    title = HTTPStatus(status).phrase
    body = json.dumps(
        {
            "errors": [
                {
                    "status": status,
                    "title": title,
                    "detail": detail,
                    "request_id": environ.get("openstack.request_id"),
                }
            ]
        }
    ).encode()
    out = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    out += list((headers or {}).items())
    start_response(f"{status} {title}", out)
    return [body]


class FaultWrapper:
    """Turns APIError into its JSON response and any other exception into a logged 500."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        try:
            return self.app(environ, start_response)
        except APIError as e:
            if e.status >= 500:
                LOG.warning(
                    "%s %s: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), e.detail
                )
            return render(environ, start_response, e.status, e.detail, e.headers)
        except Exception:
            LOG.exception(
                "unexpected error in %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
            )
            return render(
                environ,
                start_response,
                500,
                "the cloudlet API hit an unexpected error; the request id is in the service's log",
            )
