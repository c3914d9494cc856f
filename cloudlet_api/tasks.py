"""The service's task registry (sqlite under [api] state_path): every long operation a project
started, with its stage, progress and result.

Imports run in this service and update their record as they go. Captures and base creations
run on a compute host (their record names the host; reading it asks the host over RPC);
syntheses run in Nova (reading one asks Nova, with the caller's token). The record's project is
the only owner: a task is never shown to another project.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

IMPORT_BASE = "import-base"
CREATE_BASE = "create-base"
CAPTURE_OVERLAY = "capture-overlay"
SYNTHESIZE = "synthesize"

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"

SQLITE_TIMEOUT = 30.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Task:
    id: str
    project_id: str
    user_id: str
    kind: str
    name: str | None = None  # what the caller named the result
    state: str = RUNNING
    stage: str = "queued"
    progress: float = 0.0
    host: str | None = None  # compute host running it (create-base, capture-overlay)
    server_id: str | None = None  # the source server, or the synthesized one
    base_id: str | None = None
    images: dict[str, str] = field(default_factory=dict)  # role -> Glance image id
    stats: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    pid: int | None = None  # the service process running it (import-base)
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def view(self) -> dict[str, Any]:
        """The API representation (no process ids)."""
        out = asdict(self)
        del out["pid"]
        return out


_COLUMNS = [f for f in Task.__dataclass_fields__]
_JSON = {"images", "stats"}


class TaskStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._db() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, project_id TEXT NOT NULL,"
                " user_id TEXT, kind TEXT NOT NULL, name TEXT, state TEXT NOT NULL, stage TEXT,"
                " progress REAL, host TEXT, server_id TEXT, base_id TEXT, images TEXT,"
                " stats TEXT, error TEXT, pid INTEGER, created_at TEXT, updated_at TEXT)"
            )
            conn.execute(
                "CREATE INDEX IF NOT EXISTS tasks_project ON tasks (project_id, created_at)"
            )

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=SQLITE_TIMEOUT)
        with closing(conn):
            conn.row_factory = sqlite3.Row
            with conn:
                yield conn

    def new(self, project_id: str, user_id: str, kind: str, **kw: Any) -> Task:
        task = Task(id=str(uuid.uuid4()), project_id=project_id, user_id=user_id, kind=kind, **kw)
        if kind == IMPORT_BASE:
            task.pid = os.getpid()
        self.save(task)
        return task

    def save(self, task: Task) -> None:
        task.updated_at = _now()
        values = [
            json.dumps(getattr(task, c)) if c in _JSON else getattr(task, c) for c in _COLUMNS
        ]
        with self._db() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO tasks ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                values,
            )

    def _task(self, row: sqlite3.Row) -> Task:
        return Task(**{c: json.loads(row[c]) if c in _JSON else row[c] for c in _COLUMNS})

    def get(self, task_id: str, project_id: str) -> Task | None:
        """The task, if it belongs to `project_id`."""
        with self._db() as conn:
            row = conn.execute(
                "SELECT * FROM tasks WHERE id = ? AND project_id = ?", (task_id, project_id)
            ).fetchone()
        return self._task(row) if row else None

    def list(
        self, project_id: str, kind: str | None = None, state: str | None = None
    ) -> list[Task]:
        where, args = ["project_id = ?"], [project_id]
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if state:
            where.append("state = ?")
            args.append(state)
        with self._db() as conn:
            rows = conn.execute(
                f"SELECT * FROM tasks WHERE {' AND '.join(where)} ORDER BY created_at, id", args
            ).fetchall()
        return [self._task(r) for r in rows]
