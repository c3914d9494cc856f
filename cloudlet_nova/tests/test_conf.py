"""etc/cloudlet-nova.conf.sample is what oslo-config-generator makes from the registered options."""

import io
from pathlib import Path

import testtools
from oslo_config import cfg, generator

ROOT = Path(__file__).resolve().parents[2]
GENERATOR_CONF = ROOT / "etc" / "oslo-config-generator" / "cloudlet-nova.conf"
SAMPLE = ROOT / "etc" / "cloudlet-nova.conf.sample"


class SampleConfigTest(testtools.TestCase):
    def test_sample_is_current(self) -> None:
        conf = cfg.ConfigOpts()
        generator.register_cli_opts(conf)
        conf(["--config-file", str(GENERATOR_CONF)])
        out = io.StringIO()
        conf.set_override("output_file", None)
        generator.generate(conf, output_file=out)
        self.assertEqual(
            SAMPLE.read_text(), out.getvalue(),
            "etc/cloudlet-nova.conf.sample is stale: run "
            "`.venv/bin/oslo-config-generator --config-file "
            "etc/oslo-config-generator/cloudlet-nova.conf`")
