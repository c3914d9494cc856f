"""Overlay capture through the cloudlet RPC endpoint of a compute host (cloudlet_nova.capture).

Nova's functional framework with the cloudlet driver; fakelibvirt stands for libvirtd + QEMU
(see capture_base). The overlay is checked by applying it with the engine.
"""

from __future__ import annotations

import io
import subprocess
import uuid
from pathlib import Path

import fixtures
from nova import exception

from cloudlet.overlay.apply import apply_overlay
from cloudlet.overlay.reader import OverlayReader
from cloudlet_nova import glance
from cloudlet_nova.objects import AfterCapture, CloudletCaptureRequest, TaskState
from cloudlet_nova.tests.capture_base import HOST, CaptureTestBase


class CaptureTest(CaptureTestBase):
    def capture(self, server: dict, **kw: object):  # noqa: ANN201
        request = CloudletCaptureRequest(task_id=str(uuid.uuid4()), instance_uuid=server["id"],
                                         name=kw.pop("name", "customised"), **kw)
        return self.wait(self.client.capture_overlay(self.ctxt, HOST, request))

    def apply(self, overlay_id: str, out: Path) -> tuple[bytes, bytes]:
        """Synthesize the uploaded overlay with the engine over the host's cached base."""
        base = self.driver.cache.get(self.base.id)
        out.mkdir()
        with OverlayReader.open(io.BytesIO(self.glance._imagedata[overlay_id])) as reader:
            apply_overlay(
                reader, base.disk_path, base.chunk_index("disk").digests,
                base.memory_path, base.chunk_index("memory").digests,
                out / "disk.raw", out / "memory.img", expected_base_id=base.id,
            )  # fmt: skip
        return (out / "disk.raw").read_bytes(), (out / "memory.img").read_bytes()

    def flat_disk(self, server: dict) -> bytes:
        raw = self.scratch / "instance-disk.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(self.root_disk(server)),
                        str(raw)], check=True, timeout=60)  # fmt: skip
        return raw.read_bytes()

    def test_capture_uploads_an_overlay_of_the_customised_instance(self) -> None:
        server = self.boot(self.images.disk_image)
        self.customise(server)
        task = self.capture(server, name="web-overlay")
        self.assertEqual(TaskState.SUCCEEDED, task.state, task.error)
        self.assertEqual(1.0, task.progress)
        self.assertEqual(self.base.id, task.base_id)
        overlay_id = task.images["overlay"]
        image = self.glance.show(None, overlay_id)
        self.assertEqual("web-overlay", image["name"])
        info = glance.describe(image)
        self.assertEqual((glance.Kind.OVERLAY, self.base.id, self.images.disk_image),
                         (info.kind, info.base_id, info.disk_image))
        # the instance runs on, as it was, with the memory it had
        server = self.api.get_server(server["id"])
        self.assertEqual(("ACTIVE", None), (server["status"], server["OS-EXT-STS:task_state"]))
        self.assertTrue(self.domain_running(server))
        # the overlay rebuilds exactly the instance's disk and memory over the base
        disk, memory = self.apply(overlay_id, self.scratch / "synth")
        self.assertEqual(self.flat_disk(server), disk)
        _layout, now = self.memory_of(server)
        self.assertEqual(now, memory)
        self.assertIn(b"customised in RAM", memory)
        self.assert_no_leftovers()

    def test_overlay_boots_a_new_server_with_the_customised_memory(self) -> None:
        server = self.boot(self.images.disk_image)
        self.customise(server)
        overlay_id = self.capture(server).images["overlay"]
        expected = self.libvirt_fx.streams[server["id"]]
        self.libvirt_fx.customise = None
        second = self.boot(overlay_id)
        self.assertEqual(expected, self.libvirt_fx.streams[second["id"]])

    def test_capture_and_delete(self) -> None:
        server = self.boot(self.images.disk_image)
        task = self.capture(server, after=AfterCapture.DELETE)
        self.assertEqual(TaskState.SUCCEEDED, task.state, task.error)
        self.assertIn(task.images["overlay"], self.glance.images)
        self._wait_until_deleted(server)
        self.assert_no_leftovers()

    def test_failed_upload_leaves_the_instance_running_and_no_image(self) -> None:
        server = self.boot(self.images.disk_image)
        self.customise(server)
        before = set(self.glance.images)
        create = self.glance.create

        def broken_upload(context, metadata, data=None):  # noqa: ANN001, ANN202
            create(context, metadata)  # the record is made, then the data transfer breaks
            data.read(4096)
            raise exception.CouldNotUploadImage(image_id=metadata["id"])

        self.useFixture(fixtures.MockPatchObject(self.glance, "create", broken_upload))
        task = self.capture(server)
        self.assertEqual(TaskState.FAILED, task.state)
        self.assertIn("upload overlay", task.error)
        self.assertIn("Could not upload image", task.error)
        self.assertEqual(before, set(self.glance.images), "half-made image left in Glance")
        server = self.api.get_server(server["id"])
        self.assertEqual(("ACTIVE", None), (server["status"], server["OS-EXT-STS:task_state"]))
        self.assertTrue(self.domain_running(server))
        self.assert_no_leftovers()

    def test_failed_overlay_build_restores_an_instance_kept_for_deletion(self) -> None:
        server = self.boot(self.images.disk_image)
        self.useFixture(fixtures.MockPatch("cloudlet_nova.capture.build_overlay",
                                           side_effect=OSError(28, "No space left on device")))
        task = self.capture(server, after=AfterCapture.DELETE)
        self.assertEqual(TaskState.FAILED, task.state)
        self.assertIn("No space left on device", task.error)
        server = self.api.get_server(server["id"])
        self.assertEqual(("ACTIVE", None), (server["status"], server["OS-EXT-STS:task_state"]))
        self.assertTrue(self.domain_running(server))
        self.assert_no_leftovers()

    def test_capture_refuses_an_instance_that_is_not_active(self) -> None:
        server = self.boot(self.images.disk_image)
        self.api.post_server_action(server["id"], {"suspend": None})
        self._wait_for_state_change(server, "SUSPENDED")
        request = CloudletCaptureRequest(task_id=str(uuid.uuid4()), instance_uuid=server["id"],
                                         name="x")
        self.assertRaises(exception.InstanceInvalidState,
                          self.client.capture_overlay, self.ctxt, HOST, request)
