"""devstack/plugin.sh sets up what the all-in-one does: the same cloudlet-api options in the same
order as tools/aio/etc/cloudlet-api.conf, the same cloudlet options in nova.conf, Nova's
api-paste.ini through the same etc/nova-api-paste.sed, the same catalog entry.

DevStack itself cannot run here (a real DevStack run is a separate issue): the plugin is run by
bash as stack.sh runs it (`source plugin.sh stack post-config` after devstack/settings), with
DevStack's helper functions replaced by ones that record what they were asked to set.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudlet_api.microversion import SERVICE_TYPE

REPO = Path(__file__).resolve().parents[2]
AIO_ETC = REPO / "tools" / "aio" / "etc"
# Nova's api-paste.ini as its wheel installs it (tools/setup.sh installs nova into the venv)
SHIPPED_PASTE = (Path(sys.prefix) / "etc" / "nova" / "api-paste.ini").read_text()

# DevStack's functions, recording each setting as "file|section|option|value"
STUBS = r"""
record() { printf '%s|%s|%s|%s\n' "$@" >> "$LOG"; }
iniset() { record "$1" "$2" "$3" "$4"; }
inidelete() { record "$1" "$2" "$3" "<deleted>"; }
iniset_rpc_backend() { record "$2" "$3" transport_url "rabbit://${4:-}"; }
configure_keystone_authtoken_middleware() {
    record "$1" "${3:-keystone_authtoken}" "<devstack>" "$2"
}
configure_keystoneauth() { record "$1" "$3" "<devstack>" "$2"; }
setup_logging() { :; }
write_uwsgi_config() { record "$1" uwsgi module "$2"; record "$1" uwsgi http "$4"; }
create_service_user() { record keystone user "$1" "$2"; }
get_or_create_service() { record keystone service "$1" "$2"; }
get_or_create_endpoint() { record keystone endpoint "$1" "$3 $4 $5"; }
is_service_enabled() { [[ ",$ENABLED_SERVICES," == *",$1,"* ]]; }
trueorfalse() { local v=${!2:-$1}; [[ ${v,,} =~ ^(true|yes|1|on)$ ]] && echo True || echo False; }
ipv6_unquote() { echo "$1"; }
echo_summary() { :; }
die() { echo "die: $*" >&2; exit 1; }
sudo() { "$@"; }
"""


def run_post_config(tmp: Path, **env: str) -> list[tuple[str, str, str, str]]:
    log = tmp / "settings.log"
    log.unlink(missing_ok=True)
    variables = {
        "LOG": str(log),
        "DEST": str(tmp / "stack"),
        "DATA_DIR": str(tmp / "data"),
        "STACK_USER": os.environ.get("USER", "root"),
        "CLOUDLET_DIR": str(REPO),
        "CLOUDLET_CONF_DIR": str(tmp / "etc-cloudlet"),
        "NOVA_CONF": "nova.conf",
        "NOVA_API_PASTE_INI": str(tmp / "api-paste.ini"),
        "NOVA_INSTANCES_PATH": "/opt/stack/data/nova/instances",
        "VIRT_DRIVER": "libvirt",
        "CELLSV2_SETUP": "superconductor",
        "NOVA_CPU_CELL": "1",
        "SERVICE_HOST": "10.0.0.5",
        "SERVICE_LISTEN_ADDRESS": "0.0.0.0",
        "REGION_NAME": "RegionOne",
        "ENABLE_DEBUG_LOG_LEVEL": "True",
        "ENABLED_SERVICES": "n-api,n-cpu,cloudlet-api",
        # DevStack's Python environment: oslopolicy-sample-generator writes the policy file
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **env,
    }
    script = STUBS + (
        f'source "{REPO}/devstack/settings"\n'
        f'source "{REPO}/devstack/plugin.sh" stack post-config\n'
    )
    proc = subprocess.run(
        ["bash", "-c", f"set -eu\ndefine_plugin() {{ :; }}\nenable_service() {{ :; }}\n{script}"],
        env={**os.environ, **variables},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    return [tuple(line.split("|", 3)) for line in lines]  # type: ignore[misc]


def settings_of(log: list[tuple[str, str, str, str]], path: str) -> list[tuple[str, str]]:
    return [(section, option) for file, section, option, _ in log if file == path]


@pytest.fixture
def paste(tmp_path: Path) -> Path:
    path = tmp_path / "api-paste.ini"
    path.write_text(SHIPPED_PASTE)
    return path


def test_cloudlet_api_conf_has_the_all_in_ones_options_in_its_order(
    tmp_path: Path, paste: Path
) -> None:
    log = run_post_config(tmp_path)
    conf = str(tmp_path / "etc-cloudlet" / "cloudlet-api.conf")
    ours = settings_of(log, conf)
    aio = configparser.ConfigParser(interpolation=None)
    aio.optionxform = str  # type: ignore[assignment,method-assign]
    aio.read(AIO_ETC / "cloudlet-api.conf")
    aio_sections = ["DEFAULT", *aio.sections()]
    assert list(dict.fromkeys(section for section, _ in ours)) == aio_sections
    for section in aio_sections:
        options = [o for s, o in ours if s == section]
        if section in ("keystone_authtoken", "service_user"):
            assert options == ["<devstack>"]  # DevStack's helpers: a service user's password auth
            continue
        expected = list(aio.defaults()) if section == "DEFAULT" else list(aio[section])
        if section == "DEFAULT":
            expected.remove("log_file")  # DevStack logs services to the journal
        else:
            expected = [o for o in expected if o not in aio.defaults()]
        assert options == expected, section
    # on the computes' bus (their cell's), the state under DATA_DIR
    values = {(f, s, o): v for f, s, o, v in log}
    assert values[(conf, "DEFAULT", "transport_url")] == "rabbit://nova_cell1"
    assert values[(conf, "api", "state_path")] == str(tmp_path / "data" / "cloudlet-api")


def test_compute_hosts_get_the_all_in_ones_nova_options(tmp_path: Path, paste: Path) -> None:
    log = run_post_config(tmp_path, ENABLED_SERVICES="n-cpu")
    ours = {(s, o): v for f, s, o, v in log if f == "nova.conf"}
    aio = configparser.ConfigParser(interpolation=None)
    aio.read(AIO_ETC / "nova.conf")
    expected = {("DEFAULT", "compute_driver")} | {("cloudlet", o) for o in aio["cloudlet"]
                                                   if o not in aio.defaults()}
    assert set(ours) == expected
    assert ours[("DEFAULT", "compute_driver")] == aio["DEFAULT"]["compute_driver"]
    assert ours[("cloudlet", "cache_dir")] == "/opt/stack/data/nova/instances/_cloudlet"
    assert not [f for f, *_ in log if f not in ("nova.conf",)]  # nothing of cloudlet-api here
    assert paste.read_text() == SHIPPED_PASTE  # no nova-api on this host


def test_compute_host_needs_the_libvirt_driver(tmp_path: Path, paste: Path) -> None:
    with pytest.raises(AssertionError, match="extends Nova's libvirt driver"):
        run_post_config(tmp_path, ENABLED_SERVICES="n-cpu", VIRT_DRIVER="ironic")


def test_nova_api_paste_gets_the_filter_once(tmp_path: Path, paste: Path) -> None:
    run_post_config(tmp_path)
    run_post_config(tmp_path)  # stack.sh again over the same file
    text = paste.read_text()
    assert text.count("[filter:cloudlet]") == 1
    assert "authtoken keystonecontext cloudlet osapi_compute_app_v21" in text
    expected = subprocess.run(
        ["sed", "-f", str(REPO / "etc" / "nova-api-paste.sed")],
        input=SHIPPED_PASTE, capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert text == expected  # what the all-in-one's up.sh makes of the same file


def test_nova_actions_can_be_left_out(tmp_path: Path, paste: Path) -> None:
    run_post_config(tmp_path, CLOUDLET_NOVA_ACTIONS="False")
    assert paste.read_text() == SHIPPED_PASTE


def test_catalog_entry_and_service_user_as_the_all_in_one(tmp_path: Path, paste: Path) -> None:
    log = run_post_config(tmp_path)
    keystone = [(s, o, v) for f, s, o, v in log if f == "keystone"]
    url = "http://10.0.0.5:8790"
    assert keystone == [
        ("user", "cloudlet", "admin"),  # + DevStack's service role, as setup_keystone.py
        ("service", "cloudlet", SERVICE_TYPE),
        ("endpoint", "cloudlet", f"{url} {url} {url}"),  # public, admin, internal
    ]
    uwsgi = {o: v for f, s, o, v in log if f.endswith("cloudlet-api-uwsgi.ini")}
    assert uwsgi["module"] == "cloudlet_api.wsgi:application"
    assert (uwsgi["http"], uwsgi["http-socket"]) == ("<deleted>", "0.0.0.0:8790")


def test_horizon_gets_the_panels_enabled_files_and_settings(tmp_path: Path, paste: Path) -> None:
    repo = tmp_path / "cloudlet"  # a checkout with the dashboard's Horizon files
    for kind, name in (("enabled", "_1480_project_cloudlet.py"),
                       ("local_settings.d", "_1480_cloudlet.py")):
        (repo / "cloudlet_dashboard" / kind).mkdir(parents=True)
        (repo / "cloudlet_dashboard" / kind / name).write_text(f"# {kind}\n")
    horizon = tmp_path / "horizon"
    (horizon / "openstack_dashboard" / "local" / "enabled").mkdir(parents=True)
    run_post_config(tmp_path, ENABLED_SERVICES="horizon", CLOUDLET_DIR=str(repo),
                    HORIZON_DIR=str(horizon))
    local = horizon / "openstack_dashboard" / "local"
    assert (local / "enabled" / "_1480_project_cloudlet.py").read_text() == "# enabled\n"
    assert (local / "local_settings.d" / "_1480_cloudlet.py").read_text() == "# local_settings.d\n"
    (local / "enabled" / "_1480_project_cloudlet.py").unlink()
    (repo / "cloudlet_dashboard" / "enabled" / "_1480_project_cloudlet.py").unlink()
    with pytest.raises(AssertionError, match="no enabled files"):
        run_post_config(tmp_path, ENABLED_SERVICES="horizon", CLOUDLET_DIR=str(repo),
                        HORIZON_DIR=str(horizon))
