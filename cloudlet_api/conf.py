"""oslo.config options of cloudlet-api.

`[api]` holds the service's own options; `[glance]` and `[nova]` select the endpoints it calls
with the caller's token (keystoneauth adapter options: service type, interface, region,
endpoint_override), `[placement]` the one it reads with its own; `[service_user]` is the
service's own identity, used only to read which compute host runs a server the caller has
already been shown to own, and which compute hosts cache a base (Placement traits).
`list_opts` is the `oslo.config.opts` entry point behind etc/cloudlet-api.conf.sample.
"""

from __future__ import annotations

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

API = "api"
GLANCE = "glance"
NOVA = "nova"
PLACEMENT = "placement"
SERVICE_USER = "service_user"

_MiB = 1 << 20

api_opts = [
    cfg.StrOpt(
        "state_path",
        default="/var/lib/cloudlet-api",
        help="Directory of the service's task registry (sqlite) and of package imports in "
        "progress (spooled uploads, verification staging). Needs room for the largest package "
        "twice.",
    ),
    cfg.IntOpt(
        "max_package_size",
        default=64 * 1024,
        min=1,
        help="Largest base-VM package (.cbase) accepted by an import, in MiB; larger uploads "
        "and downloads are refused with 413 before or as soon as they pass the limit.",
    ),
    cfg.IntOpt(
        "max_json_body_size",
        default=64 * 1024,
        min=1024,
        help="Largest JSON request body, in bytes (413 beyond).",
    ),
    cfg.IntOpt(
        "max_concurrent_imports",
        default=2,
        min=1,
        help="Package imports and exports this process runs at once; a request beyond gets 429.",
    ),
    cfg.ListOpt(
        "import_url_allow",
        default=[],
        help="URL prefixes (scheme://host[:port]/path) a base import may fetch from; empty: "
        "no URL imports, uploads only.",
    ),
    cfg.FloatOpt(
        "import_url_timeout",
        default=60.0,
        min=1.0,
        help="Seconds a URL import waits for the remote server to connect or send more data.",
    ),
    cfg.FloatOpt(
        "rpc_timeout",
        default=60.0,
        min=1.0,
        help="Seconds a call to a compute host's cloudlet RPC endpoint may take (the calls "
        "only start tasks and read their state).",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(api_opts, group=API)
    for group, service_type in ((GLANCE, "image"), (NOVA, "compute"), (PLACEMENT, "placement")):
        ks_loading.register_adapter_conf_options(conf, group)
        conf.set_default("service_type", service_type, group=group)
        conf.set_default("valid_interfaces", ["internal", "public"], group=group)
    ks_loading.register_session_conf_options(conf, SERVICE_USER)
    ks_loading.register_auth_conf_options(conf, SERVICE_USER)


def _adapter_opts(service_type: str) -> list[cfg.Opt]:
    opts = ks_loading.get_adapter_conf_options(include_deprecated=False)
    for opt in opts:
        if opt.dest == "service_type":
            opt.default = service_type
        elif opt.dest == "valid_interfaces":
            opt.default = ["internal", "public"]
    return opts


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [
        (API, api_opts),
        (GLANCE, _adapter_opts("image")),
        (NOVA, _adapter_opts("compute")),
        (PLACEMENT, _adapter_opts("placement")),
        (
            SERVICE_USER,
            ks_loading.get_session_conf_options()
            + ks_loading.get_auth_common_conf_options()
            + ks_loading.get_auth_plugin_conf_options("password"),
        ),
    ]
