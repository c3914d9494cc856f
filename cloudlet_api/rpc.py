"""The compute hosts' cloudlet RPC endpoint, reached with cloudlet_nova's client on this
service's own transport ([DEFAULT] transport_url: the message bus nova-compute listens on, and
[DEFAULT] control_exchange: Nova's exchange on it, default `nova` as in Nova)."""

from __future__ import annotations

import threading
from typing import Any

import oslo_messaging as messaging
from oslo_config import cfg
from oslo_messaging import opts as messaging_opts
from oslo_messaging._metrics import client as metrics_client

from cloudlet_api import conf as api_conf

# nova.config sets oslo.messaging's control_exchange default to this; a service that keeps
# oslo.messaging's own default ("openstack") sends to an exchange no compute host listens on
NOVA_EXCHANGE = "nova"

_transports: dict[str, Any] = {}
_lock = threading.Lock()


def transport(conf: cfg.ConfigOpts) -> Any:
    """One RPC transport per process and configuration (connections are pooled inside it)."""
    from nova import rpc as nova_rpc

    with _lock:
        if id(conf) not in _transports:
            # oslo.messaging registers its client metrics options on the global CONF only
            conf.register_opts(
                metrics_client.oslo_messaging_metrics, group="oslo_messaging_metrics"
            )
            conf.register_opts(dict(messaging_opts.list_opts())[None])
            conf.set_default("control_exchange", NOVA_EXCHANGE)
            _transports[id(conf)] = messaging.get_rpc_transport(
                conf, allowed_remote_exmods=nova_rpc.get_allowed_exmods()
            )
        return _transports[id(conf)]


def client(conf: cfg.ConfigOpts) -> Any:
    from cloudlet_nova.rpc import CloudletRPCClient

    return CloudletRPCClient(timeout=conf[api_conf.API].rpc_timeout, transport=transport(conf))


def nova_context(ctx: Any) -> Any:
    """The nova RequestContext the host acts with: the caller's identity and token, so what
    the host uploads to Glance belongs to the caller's project."""
    from nova import context as nova_ctx

    return nova_ctx.RequestContext(
        user_id=ctx.user_id,
        project_id=ctx.project_id,
        roles=list(ctx.roles),
        auth_token=ctx.auth_token,
        service_catalog=ctx.service_catalog,
        is_admin=False,
        request_id=ctx.request_id,
    )
