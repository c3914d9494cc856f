"""oslo.config options of the cloudlet compute driver and weigher (group [cloudlet]).

Registered on import; `list_opts` is the `oslo.config.opts` entry point that
oslo-config-generator uses for etc/cloudlet-nova.conf.sample.
"""

from oslo_config import cfg

GROUP = "cloudlet"

opts = [
    cfg.StrOpt(
        "cache_dir",
        help="Per-host cache of base VMs (a cloudlet home). Default: <instances_path>/_cloudlet. "
        "Must be readable by QEMU's user: instance disks are copy-on-write layers over it.",
    ),
    cfg.BoolOpt(
        "rpc_enabled",
        default=True,
        help="Serve the cloudlet RPC endpoint (topic 'cloudlet', server = host) from "
        "nova-compute: overlay capture and base creation.",
    ),
    cfg.StrOpt(
        "base_import_dir",
        help="Directory on the compute host from which admins may register engine base "
        "packages (cloudlet-manage base register): the package path, absolute or relative to "
        "this directory, must resolve inside it (symlinks followed, '..' refused). Unset: "
        "registration from host paths is refused.",
    ),
    cfg.FloatOpt(
        "base_weight_multiplier",
        default=10.0,
        help="Scheduler weigher cloudlet_nova.weigher.CloudletBaseWeigher: weight of a host "
        "that already caches the base VM of the image being booted (others weigh 0).",
    ),
    cfg.FloatOpt(
        "synthesis_timeout",
        default=1800.0,
        min=1.0,
        help="Seconds a spawn from an overlay image may take to synthesize the whole overlay "
        "(download, verify, apply), and a memory restore may take; past it the spawn fails "
        "and leaves nothing. A download silent for 60 s fails sooner.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(opts, group=GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [(GROUP, opts)]


register_opts(cfg.CONF)
