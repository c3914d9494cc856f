"""Each spawn's synthesis statistics on the host (cloudlet_nova.records) and the RPC that reads
them, in Nova's functional framework (the harness of test_driver: fakelibvirt with real save
files stands for libvirtd + QEMU, the Glance fixture made to answer as Glance does)."""

from __future__ import annotations

from pathlib import Path

import fixtures
from nova import context as nova_context

from cloudlet.stats import Stats
from cloudlet.synthesis import PlainImages, SynthesisSpec, prepare_synthesis
from cloudlet_nova import records
from cloudlet_nova.tests import fixtures as cf
from cloudlet_nova.tests.capture_base import HOST, CaptureTestBase


class SynthesisRecordTest(CaptureTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.project_a = nova_context.RequestContext(user_id="a", project_id=cf.PROJECT_A,
                                                     roles=["member"])  # fmt: skip
        self.project_b = nova_context.RequestContext(user_id="b", project_id=cf.PROJECT_B,
                                                     roles=["member"])  # fmt: skip

    def stage_names(self, record: dict) -> list[str]:
        stages = record["stats"]["stages"]
        for name, stage in stages.items():
            self.assertFalse(stage["failed"], name)
            self.assertLessEqual(stage["start"], stage["end"], name)
        return sorted(stages, key=lambda name: stages[name]["start"])

    def test_spawn_from_an_overlay_records_the_engine_stages(self) -> None:
        ov = cf.make_overlay(self.base, self.scratch)
        overlay_id = cf.upload_overlay(self.glance, ov.path.read_bytes(), self.base.id,
                                       self.images.disk_image)  # fmt: skip
        during_restore: list[dict | None] = []
        restore_flags = cf.fakelibvirt.Connection.restoreFlags

        def restore_watched(conn, frm, dxml=None, flags=0):  # noqa: ANN001, ANN202
            # <instance dir>/cloudlet/restore.save: what the host has recorded so far
            during_restore.append(records.load(Path(frm).parent.parent))
            return restore_flags(conn, frm, dxml, flags)

        self.useFixture(fixtures.MonkeyPatch(
            f"{cf.fakelibvirt.__name__}.Connection.restoreFlags", restore_watched))
        server = self.boot(overlay_id)  # by project A
        record = records.load(self.instance_dir(server))
        # live: while the memory was being restored, the stages before it were on record
        [live] = during_restore
        self.assertEqual("running", live["state"])
        self.assertIn("apply overlay", live["stats"]["stages"])
        self.assertNotIn("restore memory", live["stats"]["stages"])
        self.assertEqual(
            (server["id"], cf.PROJECT_A, overlay_id, "overlay", "done", None),
            tuple(record[k] for k in ("instance_uuid", "project_id", "image_id", "kind",
                                      "state", "error")),
        )  # fmt: skip
        # the stage names of the engine's own synthesis of this overlay into plain images (what
        # `cloudlet synthesize --no-early-start` reports), between the base and the restore
        engine = Stats()
        spec = SynthesisSpec(source=ov.path, sink=PlainImages(), runner=None)
        with prepare_synthesis(self.home, spec, engine) as synth:
            synth.start()
        self.assertIn("apply overlay", engine.stages)
        self.assertEqual(["fetch base", *engine.stages, "restore memory"],
                         self.stage_names(record))  # fmt: skip
        self.assertEqual(engine.stages["apply overlay"].bytes,
                         record["stats"]["stages"]["apply overlay"]["bytes"])  # fmt: skip

        self.assertEqual(record, self.client.get_synthesis(self.project_a, HOST, server["id"]))
        self.assertEqual(record, self.client.get_synthesis(self.ctxt, HOST, server["id"]))  # admin
        # another project's member learns nothing, not even that there is a record
        self.assertIsNone(self.client.get_synthesis(self.project_b, HOST, server["id"]))

    def test_spawn_from_a_base_records_its_restore(self) -> None:
        server = self.boot(self.images.disk_image)
        record = self.client.get_synthesis(self.project_a, HOST, server["id"])
        self.assertEqual(("base", "done"), (record["kind"], record["state"]))
        self.assertEqual(["fetch base", "restore memory"], self.stage_names(record))

    def test_no_record_for_a_plain_server_or_a_path(self) -> None:
        server = self._create_server(flavor_id=self.flavor_id, networks="none")  # a plain image
        self.assertIsNone(self.client.get_synthesis(self.ctxt, HOST, server["id"]))
        self.assertIsNone(self.client.get_synthesis(self.ctxt, HOST, "../_cloudlet"))
