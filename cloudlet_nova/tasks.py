"""Long-running work on a compute host (captures, base creation): records and progress.

A task record is a JSON file (the CloudletTask primitive) in the host's state directory, written
by atomic rename at every stage, so a client polling over RPC sees progress and a nova-compute
that died mid-task reads the record back as failed instead of running forever.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from oslo_log import log as logging
from oslo_utils import timeutils

from cloudlet.stats import Stats
from cloudlet_nova.objects import CloudletTask, TaskState

LOG = logging.getLogger(__name__)

INTERRUPTED = "interrupted: nova-compute stopped while the task ran; its work files were removed"


class TaskStore:
    """Task records of one compute host, one JSON file each."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()

    def _path(self, task_id: str) -> Path:
        return self.directory / f"{uuid.UUID(task_id)}.json"

    def save(self, task: CloudletTask) -> None:
        task.updated_at = timeutils.utcnow(with_timezone=True)
        data = json.dumps(task.obj_to_primitive(), sort_keys=True)
        path = self._path(task.id)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        with self._lock:
            tmp.write_text(data)
            os.replace(tmp, path)

    def get(self, task_id: str) -> CloudletTask | None:
        try:
            data = json.loads(self._path(task_id).read_text())
        except FileNotFoundError:
            return None
        task = CloudletTask.obj_from_primitive(data)
        if not task.obj_attr_is_set("project_id"):  # a 1.0 record: no owner, admins only
            task.project_id = None
        return task

    def fail_interrupted(self) -> list[str]:
        """Mark every task still 'running' as failed: called once when the host's server starts,
        before it runs any task, so a running record can only be a leftover of a dead process."""
        failed = []
        for path in sorted(self.directory.glob("*.json")):
            task = self.get(path.stem)
            if task is not None and not task.done:
                task.state = TaskState.FAILED
                task.error = INTERRUPTED
                self.save(task)
                failed.append(task.id)
                LOG.warning("cloudlet task %s (%s) was interrupted", task.id, task.kind)
        for tmp in self.directory.glob("*.tmp*"):
            tmp.unlink(missing_ok=True)
        return failed


class Progress:
    """Reports a task's stages: each stage owns a slice of 0..1 and is saved as it starts."""

    def __init__(self, store: TaskStore, task: CloudletTask) -> None:
        self.store = store
        self.task = task
        self.stats = Stats(listener=self._engine_stage)

    def _engine_stage(self, name: str, seconds: float | None, failed: bool) -> None:
        """The engine's own stages (parse memory, diff + dedup, compress) show as sub-stages."""
        own = self.task.stage.split(": ")[0]
        if seconds is None and own and name != own:
            self.task.stage = f"{own}: {name}"
            self.store.save(self.task)

    def stage(self, name: str, start: float) -> None:
        LOG.info("cloudlet task %s: %s", self.task.id, name)
        self.task.stage = name
        self.task.progress = max(self.task.progress, min(start, 1.0))
        self.store.save(self.task)

    def fraction(self, lo: float, hi: float) -> Callable[[int, int], None]:
        """A (done, total) callback that moves progress within [lo, hi] (saved every 5 %)."""
        step = (hi - lo) / 20

        def report(done: int, total: int) -> None:
            value = lo + (hi - lo) * (done / total if total else 1.0)
            if value - self.task.progress >= step or done >= total:
                self.task.progress = max(self.task.progress, min(value, hi))
                self.store.save(self.task)

        return report

    def succeed(self) -> CloudletTask:
        self.task.state = TaskState.SUCCEEDED
        self.task.stage = "done"
        self.task.progress = 1.0
        stages = {f"{n} (s)": f"{st.seconds:.2f}" for n, st in self.stats.stages.items()}
        self.task.stats = stages | {k: str(v) for k, v in self.stats.counters.items()}
        self.store.save(self.task)
        return self.task

    def fail(self, error: BaseException) -> CloudletTask:
        self.task.state = TaskState.FAILED
        self.task.error = f"{self.task.stage or 'start'}: {error}"
        self.store.save(self.task)
        return self.task
