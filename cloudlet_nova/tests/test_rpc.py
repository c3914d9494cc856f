"""The cloudlet RPC endpoint and client over oslo.messaging (the fake:// transport of Nova's
RPCFixture: a real RPC server and client, in memory), and the versioned payloads."""

from __future__ import annotations

import json
import uuid

from nova import context as nova_context
from nova import exception
from oslo_versionedobjects import fixture as ovo_fixture

from cloudlet_nova import objects
from cloudlet_nova.objects import CloudletCaptureRequest, CloudletTask, TaskKind, TaskState
from cloudlet_nova.tasks import INTERRUPTED
from cloudlet_nova.tests import fixtures as cf
from cloudlet_nova.tests.capture_base import HOST, CaptureTestBase

# Bump an object's VERSION when its fields change, then update its hash here.
OBJECT_HASHES = {
    "CloudletCaptureRequest": "1.0-71e000576b41773721c2f5622c442573",
    "CloudletCreateBaseRequest": "1.0-af2990e4d24b74675d964b2415c4aed3",
    "CloudletRegisterBaseRequest": "1.0-3e5de38cfbbbe9cf4bb9b27871dd13e2",
    "CloudletTask": "1.1-ada4fe7dcc0a26ccb325b0f9ef4d8af7",
}


class RPCTest(CaptureTestBase):
    def test_plain_instance_is_refused_by_the_call_itself(self) -> None:
        server = self._create_server(flavor_id=self.flavor_id, networks="none")  # a plain image
        request = CloudletCaptureRequest(task_id=str(uuid.uuid4()), instance_uuid=server["id"],
                                         name="x")
        e = self.assertRaises(exception.Invalid, self.client.capture_overlay, self.ctxt, HOST,
                              request)
        self.assertIn("not booted from a cloudlet base or overlay image", str(e))
        self.assertIsNone(self.client.get_task(self.ctxt, HOST, request.task_id))
        server = self.api.get_server(server["id"])
        self.assertIsNone(server["OS-EXT-STS:task_state"])

    def test_unknown_task_and_duplicate_task_id(self) -> None:
        self.assertIsNone(self.client.get_task(self.ctxt, HOST, str(uuid.uuid4())))
        server = self.boot(self.images.disk_image)
        request = CloudletCaptureRequest(task_id=str(uuid.uuid4()), instance_uuid=server["id"],
                                         name="x")
        task = self.wait(self.client.capture_overlay(self.ctxt, HOST, request))
        self.assertEqual(TaskState.SUCCEEDED, task.state, task.error)
        self.assertRaises(exception.Invalid, self.client.capture_overlay, self.ctxt, HOST, request)
        server = self.api.get_server(server["id"])
        self.assertIsNone(server["OS-EXT-STS:task_state"])  # the refused duplicate let it go

    def test_a_task_running_when_compute_stops_reads_as_failed_after_restart(self) -> None:
        store = self.driver.rpc_server.endpoint.store
        task = CloudletTask.start(str(uuid.uuid4()), TaskKind.CAPTURE, HOST)
        task.stage = "build overlay"
        store.save(task)
        self.assertEqual(TaskState.RUNNING, self.client.get_task(self.ctxt, HOST, task.id).state)
        self.restart_compute_service(HOST)
        got = self.client.get_task(self.ctxt, HOST, task.id)
        self.assertEqual(TaskState.FAILED, got.state)
        self.assertEqual(INTERRUPTED, got.error)
        self.assertEqual("build overlay", got.stage)

    def test_payload_versions(self) -> None:
        classes = {n: c for n, c in objects.CloudletObjectRegistry.obj_classes().items()
                   if n.startswith("Cloudlet")}
        expected, actual = ovo_fixture.ObjectVersionChecker(classes).test_hashes(OBJECT_HASHES)
        self.assertEqual(expected, actual)
        request = CloudletCaptureRequest(task_id=str(uuid.uuid4()),
                                         instance_uuid=str(uuid.uuid4()), name="n")
        back = CloudletCaptureRequest.obj_from_primitive(request.obj_to_primitive())
        self.assertEqual(("resume", "zstd", False), (back.after, back.codec, back.public))

    def test_a_task_is_readable_only_by_its_project_and_admins(self) -> None:
        server = self.boot(self.images.disk_image)  # in project A
        project_a = nova_context.RequestContext(user_id="a", project_id=cf.PROJECT_A,
                                                roles=["member"])
        project_b = nova_context.RequestContext(user_id="b", project_id=cf.PROJECT_B,
                                                roles=["member"])
        request = CloudletCaptureRequest(task_id=str(uuid.uuid4()), instance_uuid=server["id"],
                                         name="x")
        started = self.client.capture_overlay(project_a, HOST, request)
        self.assertEqual(cf.PROJECT_A, started.project_id)
        task = self.client.wait(project_a, HOST, started.id, timeout=120, interval=0.05)
        self.assertEqual(TaskState.SUCCEEDED, task.state, task.error)
        self.assertIsNone(self.client.get_task(project_b, HOST, task.id))  # as if unknown
        self.assertEqual(task.images, self.client.get_task(self.ctxt, HOST, task.id).images)
        # a record from before tasks had a project (1.0) is for admins only
        old = CloudletTask.start(str(uuid.uuid4()), TaskKind.CAPTURE, HOST)
        primitive = old.obj_to_primitive(target_version="1.0")
        self.assertNotIn("project_id", primitive["cloudlet_object.data"])
        self.driver.rpc_server.endpoint.store._path(old.id).write_text(json.dumps(primitive))
        self.assertIsNone(self.client.get_task(project_a, HOST, old.id))
        self.assertIsNone(self.client.get_task(self.ctxt, HOST, old.id).project_id)
