"""The WSGI application, assembled in code (no paste): outermost first,

request id -> JSON faults -> version discovery at / (no token) -> body size limit ->
keystonemiddleware auth_token -> microversion -> router -> handler
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from keystonemiddleware import auth_token
from oslo_config import cfg
from oslo_log import log as logging
from oslo_middleware import request_id

from cloudlet_api import conf as api_conf
from cloudlet_api import errors, handler, microversion, policy
from cloudlet_api.clients import Clients
from cloudlet_api.context import Service
from cloudlet_api.imports import Importer
from cloudlet_api.tasks import TaskStore

PACKAGE = "application/octet-stream"
DEFAULT_CONFIG = "/etc/cloudlet/cloudlet-api.conf"
CONFIG_ENV = "CLOUDLET_API_CONFIG"


class BodySizeLimit:
    """JSON bodies above [api] max_json_body_size are 413 before anything reads them (package
    uploads have their own limit, enforced while they stream)."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        is_package = environ.get("CONTENT_TYPE", "").split(";")[0].strip() == PACKAGE
        length = environ.get("CONTENT_LENGTH") or "0"
        if not is_package and length.isdigit() and int(length) > self.limit:
            raise errors.PayloadTooLarge(
                f"the request body is {length} bytes, more than the {self.limit} bytes "
                "([api] max_json_body_size) a JSON request may have"
            )
        return self.app(environ, start_response)


class VersionDiscovery:
    """GET / answers without a token (clients discover the API before they authenticate)."""

    def __init__(self, app: Callable, service: Service) -> None:
        self.app = app
        self.router = handler.Router(service)

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") in ("", "/") and environ["REQUEST_METHOD"] == "GET":
            return self.router(environ, start_response)
        return self.app(environ, start_response)


def loadapp(conf: cfg.ConfigOpts) -> Callable:
    """The application for a parsed configuration (options registered by conf.register_opts)."""
    state = Path(conf[api_conf.API].state_path)
    tasks = TaskStore(state / "tasks.sqlite")
    service = Service(
        conf=conf,
        enforcer=policy.make_enforcer(conf),
        clients=Clients(conf),
        tasks=tasks,
        imports=Importer(conf, tasks),
    )
    app: Callable = handler.Router(service)
    app = microversion.MicroversionMiddleware(app)
    app = auth_token.AuthProtocol(app, {"oslo_config_config": conf})
    app = BodySizeLimit(app, conf[api_conf.API].max_json_body_size)
    app = VersionDiscovery(app, service)
    app = errors.FaultWrapper(app)
    return request_id.RequestId(app)


def configure(config_files: list[str] | None = None) -> cfg.ConfigOpts:
    """Parse the configuration (the given files, or $CLOUDLET_API_CONFIG, comma-separated, or
    /etc/cloudlet/cloudlet-api.conf) and set up logging."""
    conf = cfg.ConfigOpts()
    api_conf.register_opts(conf)
    logging.register_options(conf)
    files = config_files or os.environ.get(CONFIG_ENV, DEFAULT_CONFIG).split(",")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise SystemExit(
            f"cloudlet-api: configuration file(s) {', '.join(missing)} not found "
            f"(set {CONFIG_ENV} to a comma-separated list of files)"
        )
    conf([], project="cloudlet", prog="cloudlet-api", default_config_files=files)
    logging.setup(conf, "cloudlet-api")
    return conf


def init_application(config_files: list[str] | None = None) -> Callable:
    return loadapp(configure(config_files))
