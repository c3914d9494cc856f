"""Each spawn's synthesis statistics, kept on the host beside the instance.

`<instance dir>/cloudlet-synthesis.json` holds the engine's Stats of the spawn (the stage names of
the standalone `cloudlet synthesize`, plus "fetch base" when the base had to come from Glance),
rewritten atomically (temp file + rename) each time a stage ends, so a reader (the RPC
`get_synthesis`, for the API's and the dashboard's timeline) always sees a whole record: live
while the spawn runs, final when it ends. It goes with the instance directory.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudlet.stats import Stats

FILE_NAME = "cloudlet-synthesis.json"
RUNNING, DONE, FAILED = "running", "done", "failed"


class SynthesisRecord:
    """The record of one spawn from a cloudlet image; `stats` is what the engine is given."""

    def __init__(
        self, instance_dir: Path, instance_uuid: str, project_id: str, image_id: str, kind: str
    ) -> None:
        self.path = Path(instance_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._head: dict[str, Any] = {
            "instance_uuid": instance_uuid,
            "project_id": project_id,
            "image_id": image_id,
            "kind": kind,
            "state": RUNNING,
            "error": None,
            "started_at": datetime.now(UTC).isoformat(),
        }
        self.stats = Stats(listener=self._stage_event)
        self._write()

    def finish(self, error: BaseException | None = None) -> None:
        """The final record: done, or failed with the error's message."""
        with self._lock:
            self._head["state"] = DONE if error is None else FAILED
            self._head["error"] = None if error is None else str(error)
        self._write()

    def _stage_event(self, name: str, seconds: float | None, failed: bool) -> None:
        if seconds is not None:  # a stage ended
            self._write()

    def _write(self) -> None:
        with self._lock:
            record = {**self._head, "stats": self.stats.as_dict()}
            tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(record, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except FileNotFoundError:
                pass  # the instance directory went (a refused spawn): nothing to record in


def load(instance_dir: Path) -> dict[str, Any] | None:
    """The record, or None when the instance has none (not a cloudlet spawn, or gone)."""
    try:
        return json.loads((Path(instance_dir) / FILE_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
