"""Versioned payloads between cloudlet clients (cloudlet-manage, cloudlet-api) and compute hosts.

oslo.versionedobjects, as os-vif and Nova do it: a host running an older cloudlet can still read
(or be sent a backported copy of) what a newer API sends during a rolling upgrade. Every object
name is prefixed `Cloudlet` because oslo.versionedobjects keeps one registry per process, shared
with Nova's own objects.
"""

from __future__ import annotations

from typing import Any

from oslo_utils import timeutils, versionutils
from oslo_versionedobjects import base, fields

OBJ_NAMESPACE = "cloudlet_object"


class CloudletObjectRegistry(base.VersionedObjectRegistry):
    pass


class CloudletObject(base.VersionedObject):
    OBJ_PROJECT_NAMESPACE = "cloudlet"
    OBJ_SERIAL_NAMESPACE = OBJ_NAMESPACE


class CloudletRequest(CloudletObject):
    """A request: fields left out by the sender take their defaults."""

    def __init__(self, context: Any = None, **kwargs: Any) -> None:
        super().__init__(context, **kwargs)
        self.obj_set_defaults()


class CloudletObjectSerializer(base.VersionedObjectSerializer):
    OBJ_BASE_CLASS = CloudletObject


class TaskKind(fields.Enum):
    CAPTURE = "capture-overlay"
    CREATE_BASE = "create-base"
    REGISTER_BASE = "register-base"
    ALL = (CAPTURE, CREATE_BASE, REGISTER_BASE)

    def __init__(self) -> None:
        super().__init__(valid_values=TaskKind.ALL)


class TaskState(fields.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ALL = (RUNNING, SUCCEEDED, FAILED)

    def __init__(self) -> None:
        super().__init__(valid_values=TaskState.ALL)


class AfterCapture(fields.Enum):
    """What happens to the source instance once its overlay is in Glance."""

    RESUME = "resume"
    DELETE = "delete"
    ALL = (RESUME, DELETE)

    def __init__(self) -> None:
        super().__init__(valid_values=AfterCapture.ALL)


class TaskKindField(fields.BaseEnumField):
    AUTO_TYPE = TaskKind()


class TaskStateField(fields.BaseEnumField):
    AUTO_TYPE = TaskState()


class AfterCaptureField(fields.BaseEnumField):
    AUTO_TYPE = AfterCapture()


@CloudletObjectRegistry.register
class CloudletCaptureRequest(CloudletRequest):
    """Capture an overlay of a running instance over the base it was booted from."""

    VERSION = "1.0"
    fields = {
        "task_id": fields.UUIDField(),
        "instance_uuid": fields.UUIDField(),
        "name": fields.StringField(),  # name of the overlay image in Glance
        "after": AfterCaptureField(default=AfterCapture.RESUME),
        "codec": fields.StringField(default="zstd"),
        "public": fields.BooleanField(default=False),
    }


@CloudletObjectRegistry.register
class CloudletCreateBaseRequest(CloudletRequest):
    """Turn a running instance into a base VM (disk + memory images in Glance)."""

    VERSION = "1.0"
    fields = {
        "task_id": fields.UUIDField(),
        "instance_uuid": fields.UUIDField(),
        "name": fields.StringField(),
        "public": fields.BooleanField(default=False),
    }


@CloudletObjectRegistry.register
class CloudletRegisterBaseRequest(CloudletRequest):
    """Register an engine base package (.cbase) that is readable on the compute host."""

    VERSION = "1.0"
    fields = {
        "task_id": fields.UUIDField(),
        "package_path": fields.StringField(),
        "name": fields.StringField(nullable=True, default=None),  # None: the package's name
        "public": fields.BooleanField(default=False),
    }


@CloudletObjectRegistry.register
class CloudletTask(CloudletObject):
    """One long-running job on a compute host, as its progress is reported.

    Readable only by the project that started it (`project_id`) and by admins."""

    # Version 1.0: initial version
    # Version 1.1: project_id
    VERSION = "1.1"
    fields = {
        "id": fields.UUIDField(),
        "kind": TaskKindField(),
        "host": fields.StringField(),
        "state": TaskStateField(),
        "stage": fields.StringField(default=""),
        "progress": fields.FloatField(default=0.0),  # 0..1, monotonic
        "instance_uuid": fields.UUIDField(nullable=True, default=None),
        "base_id": fields.StringField(nullable=True, default=None),
        "images": fields.DictOfStringsField(default={}),  # role ("overlay", "disk", ...) -> id
        "stats": fields.DictOfStringsField(default={}),  # stage timings and counters, as text
        "error": fields.StringField(nullable=True, default=None),
        "created_at": fields.DateTimeField(),
        "updated_at": fields.DateTimeField(),
        "project_id": fields.StringField(nullable=True, default=None),  # None: admins only
    }

    def obj_make_compatible(self, primitive: dict, target_version: str) -> None:
        super().obj_make_compatible(primitive, target_version)
        if versionutils.convert_version_to_tuple(target_version) < (1, 1):
            primitive.pop("project_id", None)

    def readable_by(self, context: Any) -> bool:
        return bool(getattr(context, "is_admin", False)) or (
            self.project_id is not None and self.project_id == context.project_id
        )

    @classmethod
    def start(cls, task_id: str, kind: str, host: str, **kw: Any) -> CloudletTask:
        now = timeutils.utcnow(with_timezone=True)
        task = cls(
            id=task_id, kind=kind, host=host, state=TaskState.RUNNING, created_at=now,
            updated_at=now, **kw,
        )  # fmt: skip
        task.obj_set_defaults()
        return task

    @property
    def done(self) -> bool:
        return self.state != TaskState.RUNNING
