"""The compute host's cloudlet RPC endpoint (topic `cloudlet`, server = host) and its client.

Captures and base creation take minutes, longer than any sane RPC timeout, so every operation is
a short `call` that validates the request, records a task and starts the work in a thread on the
host; the client then polls `get_task` for progress. Errors found before the work starts (no such
instance, wrong state, no base) come back as Nova exceptions from the call itself. A spawn's
synthesis statistics are read with `get_synthesis` (cloudlet_nova.records).

The client is what cloudlet-manage uses today and what the REST API will use.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nova.conf
import oslo_messaging as messaging
from nova import exception
from nova import rpc as nova_rpc
from oslo_log import log as logging
from oslo_utils import uuidutils

from cloudlet_nova import basevm, capture, records
from cloudlet_nova.objects import (
    CloudletCaptureRequest,
    CloudletCreateBaseRequest,
    CloudletObjectSerializer,
    CloudletRegisterBaseRequest,
    CloudletTask,
    TaskKind,
)
from cloudlet_nova.tasks import Progress, TaskStore

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF

TOPIC = "cloudlet"
RPC_API_VERSION = "1.0"
TASK_THREAD_JOIN = 60.0  # seconds cleanup_host waits for a running task to finish its stage


def task_dir(host: str) -> Path:
    return Path(CONF.state_path) / "cloudlet" / "tasks" / host


class CloudletEndpoint:
    """What the host answers. Jobs come from capture.py / basevm.py: validate in __init__
    (synchronously, inside the call), then `run(progress)` in a task thread."""

    target = messaging.Target(version=RPC_API_VERSION)

    def __init__(self, driver: Any, store: TaskStore, host: str) -> None:
        self.driver = driver
        self.store = store
        self.host = host
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def start_capture(self, ctxt: Any, request: CloudletCaptureRequest) -> CloudletTask:
        job = capture.OverlayCapture(self.driver, self.host, ctxt, request)
        return self._start(ctxt, TaskKind.CAPTURE, request.task_id, job, request.instance_uuid)

    def start_create_base(self, ctxt: Any, request: CloudletCreateBaseRequest) -> CloudletTask:
        job = basevm.BaseCreation(self.driver, self.host, ctxt, request)
        return self._start(ctxt, TaskKind.CREATE_BASE, request.task_id, job, request.instance_uuid)

    def start_register_base(
        self, ctxt: Any, request: CloudletRegisterBaseRequest
    ) -> CloudletTask:
        job = basevm.BaseRegistration(self.driver, self.host, ctxt, request)
        return self._start(ctxt, TaskKind.REGISTER_BASE, request.task_id, job, None)

    def get_task(self, ctxt: Any, task_id: str) -> CloudletTask | None:
        """The task, if the caller's project started it (or the caller is an admin); another
        project's task answers None, as an unknown one (Nova's 404 for another's server)."""
        task = self.store.get(task_id)
        return task if task is not None and task.readable_by(ctxt) else None

    def get_synthesis(self, ctxt: Any, instance_uuid: str) -> dict[str, Any] | None:
        """The synthesis record of the instance's spawn (cloudlet_nova.records), if the caller's
        project owns the instance (or the caller is an admin); another project's answers None,
        as one without a record does."""
        if not uuidutils.is_uuid_like(instance_uuid):
            return None
        canonical = str(uuid.UUID(instance_uuid))  # a path component: no other spelling
        record = records.load(Path(CONF.instances_path) / canonical)
        if record is None:
            return None
        if getattr(ctxt, "is_admin", False) or (
            record.get("project_id") is not None and record.get("project_id") == ctxt.project_id
        ):
            return record
        return None

    def _start(
        self, ctxt: Any, kind: str, task_id: str, job: Any, instance_uuid: str | None
    ) -> CloudletTask:
        if self.store.get(task_id) is not None:
            job.abandon()
            raise exception.Invalid(message=f"cloudlet task {task_id} already exists")
        task = CloudletTask.start(task_id, kind, self.host, instance_uuid=instance_uuid,
                                  project_id=ctxt.project_id)  # fmt: skip
        progress = Progress(self.store, task)
        progress.stage("queued", 0.0)
        thread = threading.Thread(
            target=self._run, args=(job, progress), name=f"cloudlet-{kind}-{task_id[:8]}"
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return task.obj_clone()

    def _run(self, job: Any, progress: Progress) -> None:
        try:
            job.run(progress)
            progress.succeed()
            LOG.info("cloudlet task %s succeeded: %s", progress.task.id, progress.task.images)
        except Exception as e:  # every failure ends in the task record, never in a lost thread
            LOG.exception("cloudlet task %s failed", progress.task.id)
            progress.fail(e)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def wait_idle(self, timeout: float) -> bool:
        """Wait for running tasks (bounded); True when none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)


class CloudletRPCService:
    """The started server, kept by the driver and stopped in cleanup_host."""

    def __init__(self, server: messaging.RPCServer, endpoint: CloudletEndpoint) -> None:
        self.server = server
        self.endpoint = endpoint

    def stop(self, timeout: float = TASK_THREAD_JOIN) -> None:
        self.server.stop()
        self.server.wait()
        if not self.endpoint.wait_idle(timeout):
            LOG.warning("cloudlet tasks still running after %.0f s at shutdown", timeout)


def start_server(driver: Any, host: str | None = None) -> CloudletRPCService:
    """Start the host's endpoint on nova's transport (called from the driver's init_host with
    the compute service's host name; default [DEFAULT] host)."""
    host = host or CONF.host
    store = TaskStore(task_dir(host))
    store.fail_interrupted()
    endpoint = CloudletEndpoint(driver, store, host)
    target = messaging.Target(topic=TOPIC, server=host, version=RPC_API_VERSION)
    server = nova_rpc.get_server(target, [endpoint], serializer=CloudletObjectSerializer())
    server.start()
    LOG.info("cloudlet RPC endpoint listening: topic %s, server %s", TOPIC, host)
    return CloudletRPCService(server, endpoint)


class CloudletRPCClient:
    """Talks to one compute host's endpoint: on nova's transport (nova.rpc initialised by
    nova.config.parse_args), or on `transport` (cloudlet-api, which has its own configuration)."""

    def __init__(self, timeout: float = 120.0, transport: Any = None) -> None:
        target = messaging.Target(topic=TOPIC, version=RPC_API_VERSION)
        if transport is None:
            self._client = nova_rpc.get_client(target, serializer=CloudletObjectSerializer())
        else:
            serializer = nova_rpc.RequestContextSerializer(CloudletObjectSerializer())
            self._client = messaging.get_rpc_client(transport, target, serializer=serializer)
        self.timeout = timeout

    def _call(self, ctxt: Any, host: str, method: str, **kw: Any) -> Any:
        cctxt = self._client.prepare(server=host, version=RPC_API_VERSION, timeout=self.timeout)
        return cctxt.call(ctxt, method, **kw)

    def capture_overlay(
        self, ctxt: Any, host: str, request: CloudletCaptureRequest
    ) -> CloudletTask:
        return self._call(ctxt, host, "start_capture", request=request)

    def create_base(self, ctxt: Any, host: str, request: CloudletCreateBaseRequest) -> CloudletTask:
        return self._call(ctxt, host, "start_create_base", request=request)

    def register_base(
        self, ctxt: Any, host: str, request: CloudletRegisterBaseRequest
    ) -> CloudletTask:
        return self._call(ctxt, host, "start_register_base", request=request)

    def get_task(self, ctxt: Any, host: str, task_id: str) -> CloudletTask | None:
        return self._call(ctxt, host, "get_task", task_id=task_id)

    def get_synthesis(self, ctxt: Any, host: str, instance_uuid: str) -> dict[str, Any] | None:
        """The host's record of an instance's spawn (None: another project's, or none)."""
        return self._call(ctxt, host, "get_synthesis", instance_uuid=instance_uuid)

    def wait(
        self,
        ctxt: Any,
        host: str,
        task_id: str,
        timeout: float,
        on_update: Callable[[CloudletTask], None] | None = None,
        interval: float = 1.0,
    ) -> CloudletTask:
        """Poll until the task ends; returns it (succeeded or failed). TimeoutError past
        `timeout` seconds: the task keeps running on the host and can be polled again."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            task = self.get_task(ctxt, host, task_id)
            if task is None:
                raise exception.NotFound(message=f"host {host} has no cloudlet task {task_id}")
            seen = (task.stage, round(task.progress, 3), task.state)
            if on_update is not None and seen != last:
                on_update(task)
            last = seen
            if task.done:
                return task
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"cloudlet task {task_id} on {host} still {task.stage} after {timeout:.0f} s"
                )
            time.sleep(interval)
