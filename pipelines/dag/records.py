"""Stage records: what makes a run resumable.

Each stage owns a directory in the run directory. When it starts it writes ``_started.json`` (its key);
when it finishes, ``_stage.json`` with its key, config, inputs and outputs; a failed architecture writes
``failed.json`` with the error. The key hashes the stage's config with the keys of its inputs, so a rerun
of the same config finds matching records and skips those stages, while a changed config (or changed
upstream data) redoes exactly what depends on the change.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from pipelines.dag.storage import RunDir

RECORD = "_stage.json"
STARTED = "_started.json"
FAILED = "failed.json"


def stage_key(stage: str, config, inputs: dict[str, str] | None = None) -> str:
    """A short stable hash of a stage's name, config and its inputs' keys."""
    doc = json.dumps({"stage": stage, "config": config, "inputs": inputs or {}}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


@dataclass
class Stage:
    """One stage's directory and records in a run directory."""

    run: RunDir
    name: str  # also its directory, e.g. "data" or "archs/resnet18/train"
    key: str

    def finished(self) -> dict | None:
        """The record of a finished run of this very stage (same key), or None."""
        rec = self.run.read_json(f"{self.name}/{RECORD}")
        if rec and rec.get("key") == self.key and rec.get("status") == "done":
            return rec
        return None

    def begin(self, *, resumable: bool) -> bool:
        """Prepare the directory before the stage runs; returns True when it resumes earlier work.

        A resumable stage (training: the trainer continues from its last checkpoint) keeps what an
        interrupted run of the same key left; anything else, or a different key, starts from an empty dir.
        """
        started = self.run.read_json(f"{self.name}/{STARTED}")
        resume = resumable and bool(started) and started.get("key") == self.key
        if not resume:
            self.run.remove(self.name)
        else:
            self.run.remove(f"{self.name}/{FAILED}")
            self.run.remove(f"{self.name}/{RECORD}")
        self.run.write_json(f"{self.name}/{STARTED}", {"key": self.key, "started": time.time()})
        return resume

    def done(self, config, inputs: dict, outputs: dict, seconds: float) -> dict:
        rec = {"stage": self.name, "key": self.key, "status": "done", "config": config, "inputs": inputs,
               "outputs": outputs, "seconds": round(seconds, 2), "finished": time.time()}
        self.run.write_json(f"{self.name}/{RECORD}", rec)
        return rec

    def failed(self, error: str, config=None) -> dict:
        rec = {"stage": self.name, "key": self.key, "status": "failed", "error": error, "config": config,
               "finished": time.time()}
        self.run.write_json(f"{self.name}/{FAILED}", rec)
        return rec
