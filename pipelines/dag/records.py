"""Stage records: what makes a run resumable.

Each stage owns a directory in the run directory. When it starts it writes ``_started.json`` (its key);
when it finishes, ``_stage.json`` with its key, config, inputs and outputs; a failed architecture writes
``failed.json`` with the error. The key hashes the stage's config with the keys of its inputs, so a rerun
of the same config finds matching records and skips those stages, while a changed config (or changed
upstream data) redoes exactly what depends on the change.

Nothing a stage finished is deleted by a change of config: when a stage runs under a new key, the output
of the old key is set aside as ``<stage dir>@<old key>`` (e.g. ``archs/resnet18/train@3f2a...``), and
a later run under that old key again takes it back instead of redoing it. ``prune_set_aside`` (``visionflow
run --prune``) deletes what was set aside.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass

from pipelines.storage import RunDir, rebase_paths

RECORD = "_stage.json"
STARTED = "_started.json"
FAILED = "failed.json"
ASIDE = "@"  # <stage dir>@<key>: a finished (or interrupted) output of another key, kept


def stage_key(stage: str, config, inputs: dict[str, str] | None = None) -> str:
    """A short stable hash of a stage's name, config and its inputs' keys."""
    doc = json.dumps({"stage": stage, "config": config, "inputs": inputs or {}}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def read_record(run: RunDir, name: str) -> dict | None:
    """The record ``name`` of ``run``, or None when it is absent or not a JSON object (cut short by a power cut,
    edited by hand): such a record blocked its stage on every rerun with a bare JSONDecodeError naming no
    file. A warning names it; the stage runs again and its next record replaces the file."""
    try:
        doc = run.read_json(name)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        warnings.warn(f"{run.path(name)} is not a JSON record ({type(e).__name__}: {e}); that stage runs again",
                      RuntimeWarning, stacklevel=2)
        return None
    if doc is not None and not isinstance(doc, dict):
        warnings.warn(f"{run.path(name)} is not a stage record (a JSON {type(doc).__name__}); that stage runs again",
                      RuntimeWarning, stacklevel=2)
        return None
    return doc


@dataclass
class Stage:
    """One stage's directory and records in a run directory."""

    run: RunDir
    name: str  # also its directory, e.g. "data" or "archs/resnet18/train"
    key: str

    @property
    def set_aside(self) -> str:
        """Where this key's output waits while another key's output is the stage's current one."""
        return f"{self.name}{ASIDE}{self.key}"

    def _read(self, name: str) -> dict | None:
        return read_record(self.run, name)

    def _current_key(self) -> str | None:
        for name in (RECORD, STARTED):
            doc = self._read(f"{self.name}/{name}")
            if doc and doc.get("key"):
                return doc["key"]
        return None

    def _swap_in(self) -> bool:
        """Take this key's set-aside output back (setting the current one aside); False when there is none."""
        if not self.run.exists(self.set_aside):
            return False
        self._set_current_aside()
        self.run.move(self.set_aside, self.name)
        return True

    def _set_current_aside(self) -> None:
        """Move the stage's current output (another key's) to ``<name>@<its key>``; an output without a
        key (nothing started) is just removed."""
        if not self.run.exists(self.name):
            return
        key = self._current_key()
        if key is None or key == self.key:
            self.run.remove(self.name)
            return
        target = f"{self.name}{ASIDE}{key}"
        self.run.remove(target)  # an older copy of that key's output, superseded by this one
        self.run.move(self.name, target)

    def finished(self) -> dict | None:
        """The record of a finished run of this very stage (same key), or None. A finished run of this key
        that an earlier config change set aside is taken back first."""
        rec = self._read(f"{self.name}/{RECORD}")
        if rec and rec.get("key") == self.key and rec.get("status") == "done":
            return self._here(rec)
        aside = self._read(f"{self.set_aside}/{RECORD}")
        if aside and aside.get("key") == self.key and aside.get("status") == "done" and self._swap_in():
            return self._here(self._read(f"{self.name}/{RECORD}"))
        return None

    def _here(self, rec: dict) -> dict:
        """``rec`` with the paths it recorded under the run directory where it was written (``run_dir``) moved to
        where the run directory is now: a run directory moved or copied (``mv``, another machine or mount
        point) skipped its finished stages and handed out the old location's paths, shards and checkpoints."""
        old = rec.get("run_dir")
        return rebase_paths(rec, old, self.run.uri) if old and old != self.run.uri else rec

    def begin(self, *, resumable: bool) -> bool:
        """Prepare the directory before the stage runs; returns True when it resumes earlier work.

        A resumable stage (training: the trainer continues from its last checkpoint) keeps what an
        interrupted run of the same key left; anything else, or a different key, starts from an empty dir.
        """
        started = self._read(f"{self.name}/{STARTED}")
        if not (started and started.get("key") == self.key) and resumable:
            self._swap_in()  # an interrupted run of this key, set aside by a config change since
            started = self._read(f"{self.name}/{STARTED}")
        resume = resumable and bool(started) and started.get("key") == self.key
        if not resume:
            self._set_current_aside()
            self.run.remove(self.name)
        else:
            self.run.remove(f"{self.name}/{FAILED}")
            self.run.remove(f"{self.name}/{RECORD}")
        self.run.write_json(f"{self.name}/{STARTED}", {"key": self.key, "started": time.time()})
        return resume

    def done(self, config, inputs: dict, outputs: dict, seconds: float) -> dict:
        rec = {"stage": self.name, "key": self.key, "status": "done", "config": config, "inputs": inputs,
               "outputs": outputs, "seconds": round(seconds, 2), "finished": time.time(), "run_dir": self.run.uri}
        self.run.write_json(f"{self.name}/{RECORD}", rec)
        return rec

    def failed(self, error: str, config=None) -> dict:
        rec = {"stage": self.name, "key": self.key, "status": "failed", "error": error, "config": config,
               "finished": time.time()}
        self.run.write_json(f"{self.name}/{FAILED}", rec)
        return rec


def _is_set_aside(name: str) -> bool:
    """``<stage dir>@<key>``, the key as ``stage_key`` makes it (16 hex digits): not any folder with an "@" (a
    run directory in a project folder listed ``node_modules/@types`` for --prune to delete)."""
    stem, sep, key = name.rpartition(ASIDE)
    return bool(stem and sep) and len(key) == 16 and all(c in "0123456789abcdef" for c in key)


def set_aside_outputs(run: RunDir, name: str = "", depth: int = 3) -> list[str]:
    """Every set-aside stage output (relative names, e.g. ``archs/resnet18/train@3f2a...``); stage
    directories lie at most ``depth`` levels down (``archs/<arch>/<stage>``)."""
    found = []
    for d in run.list_dirs(name):
        rel = f"{name}/{d}" if name else d
        if _is_set_aside(d):
            found.append(rel)
        elif depth > 1:
            found += set_aside_outputs(run, rel, depth - 1)
    return found


def prune_set_aside(run: RunDir) -> list[str]:
    """Delete every set-aside output (what no current stage refers to); returns what was deleted."""
    gone = set_aside_outputs(run)
    for rel in gone:
        run.remove(rel)
    return gone
