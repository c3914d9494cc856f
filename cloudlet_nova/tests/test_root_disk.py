"""The root disk of a cloudlet instance, made with the real qemu-img (Nova's functional base
mocks image creation, so this part of the spawn is tested here)."""

import json
import subprocess
from pathlib import Path

import fixtures
import testtools

from cloudlet_nova import spawn, state


class RootDiskTest(testtools.TestCase):
    def test_qcow2_over_the_synthesized_disk(self) -> None:
        tmp = Path(self.useFixture(fixtures.TempDir()).path)
        backing = tmp / "disk.raw"
        backing.write_bytes(b"x" * (3 << 20))
        st = state.InstanceState(kind="overlay", image_id="i", base_id="b" * 64,
                                 disk=str(backing), memory="m", layout="l")
        root = tmp / "disk"
        spawn.create_root_disk(root, st, root_gb=1)
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(root)],
            check=True, capture_output=True, text=True).stdout)
        self.assertEqual("qcow2", info["format"])
        self.assertEqual(str(backing), info["backing-filename"])
        self.assertEqual("raw", info["backing-filename-format"])
        self.assertEqual(1 << 30, info["virtual-size"])
        spawn.create_root_disk(tmp / "disk0", st, root_gb=0)  # flavor without a root size
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(tmp / "disk0")],
            check=True, capture_output=True, text=True).stdout)
        self.assertEqual(3 << 20, info["virtual-size"])
