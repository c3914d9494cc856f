"""The routes, in one table: path template -> {method: handler}. Unknown paths are 404, known
paths with another method 405 (with Allow)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from cloudlet_api import errors
from cloudlet_api.context import Request, Service
from cloudlet_api.handlers import bases, overlays, root, syntheses, tasks

ROUTES: dict[str, dict[str, Callable[[Request], Any]]] = {
    "/": {"GET": root.home},
    "/bases": {"GET": bases.list_bases, "POST": bases.create_base},
    "/bases/import": {"POST": bases.import_base},
    "/bases/{id}": {"GET": bases.show_base, "DELETE": bases.delete_base},
    "/bases/{id}/package": {"GET": bases.export_base},
    "/overlays": {"GET": overlays.list_overlays, "POST": overlays.create_overlay},
    "/overlays/{id}": {"GET": overlays.show_overlay, "DELETE": overlays.delete_overlay},
    "/overlays/{id}/file": {"GET": overlays.download_overlay},
    "/syntheses": {"GET": syntheses.list_syntheses, "POST": syntheses.create_synthesis},
    "/syntheses/{id}": {"GET": syntheses.show_synthesis},
    "/tasks": {"GET": tasks.list_tasks},
    "/tasks/{id}": {"GET": tasks.show_task},
}


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "/?$")


_COMPILED = [(_compile(t), methods) for t, methods in ROUTES.items()]


class Router:
    """The innermost WSGI app: finds the handler and calls it with a Request."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        req = Request(environ)
        req.service = self.service
        path = req.path_info or "/"
        for pattern, methods in _COMPILED:
            match = pattern.match(path)
            if match is None:
                continue
            handler = methods.get(req.method)
            if handler is None:
                raise errors.MethodNotAllowed(
                    f"{req.method} is not allowed on {path}",
                    headers={"Allow": ", ".join(sorted(methods))},
                )
            req.params_in_path = match.groupdict()
            return handler(req)(environ, start_response)
        raise errors.NotFound(f"no resource at {path}")
