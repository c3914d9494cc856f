"""etc/cloudlet-api.conf.sample and etc/cloudlet-api.policy.yaml.sample are what the oslo
generators make from the registered options and rules (regenerate them when these fail)."""

import io
import subprocess
import sys
from pathlib import Path

from oslo_config import cfg, generator

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_config_sample_is_current() -> None:
    conf = cfg.ConfigOpts()
    generator.register_cli_opts(conf)
    conf(["--config-file", str(ROOT / "etc/oslo-config-generator/cloudlet-api.conf")])
    conf.set_override("output_file", None)
    out = io.StringIO()
    generator.generate(conf, output_file=out)
    assert (ROOT / "etc/cloudlet-api.conf.sample").read_text() == out.getvalue(), (
        "etc/cloudlet-api.conf.sample is stale: run `.venv/bin/oslo-config-generator "
        "--config-file etc/oslo-config-generator/cloudlet-api.conf`"
    )


def test_policy_sample_is_current(tmp_path: Path) -> None:
    out = tmp_path / "policy.yaml"
    subprocess.run(
        [BIN / "oslopolicy-sample-generator", "--namespace", "cloudlet_api", "--output-file", out],
        check=True,
        capture_output=True,
    )
    assert (ROOT / "etc/cloudlet-api.policy.yaml.sample").read_text() == out.read_text(), (
        "etc/cloudlet-api.policy.yaml.sample is stale: run `.venv/bin/oslopolicy-sample-generator"
        " --config-file etc/oslo-policy-generator/cloudlet-api.conf`"
    )
