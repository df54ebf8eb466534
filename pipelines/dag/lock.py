"""One ``visionflow run`` at a time per run directory: a lock file naming its owner.

``RUN_DIR/.lock`` holds the owner's host, pid and start time, and its ``beat`` field is refreshed every
``BEAT_S`` seconds while the run lives. A second run refuses with one line naming the first. A lock is
stale, and taken over, when its owner is a process of this host that no longer exists, or when its beat
is older than ``STALE_S`` (an owner on another host that died).

On a local path the lock never shows half written (it is written aside, then hard-linked into place,
which fails when a lock exists), and a stale lock is taken over by renaming it aside first: of two runs
taking the same stale lock over, only one moves it, and one that finds it moved a live lock puts it back.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from pipelines.storage import RunDir

LOCK = ".lock"
BEAT_S = 30.0
STALE_S = 180.0


class RunDirBusy(RuntimeError):
    """Another live ``visionflow run`` holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def is_stale(doc: dict, now: float | None = None) -> bool:
    """True when the lock's owner is gone: a dead pid on this host, or no beat for ``STALE_S``."""
    now = time.time() if now is None else now
    if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int):
        return not _alive(doc["pid"])
    return now - float(doc.get("beat", doc.get("started", 0))) > STALE_S


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory for this process (see the module docstring)."""

    def __init__(self, run_dir: str | RunDir, command: str = "visionflow run"):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.doc = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                    "started": time.time(), "beat": time.time()}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _create(self) -> bool:
        """Write the lock if there is none; False when one exists (local: atomically, O_EXCL)."""
        data = json.dumps(self.doc).encode()
        if self.run.remote:  # object stores have no exclusive create: check, then write
            if self.run.exists(LOCK):
                return False
            self.run.write_bytes(LOCK, data)
            return True
        self.run.makedirs("")
        aside = self._aside("new")
        with open(aside, "wb") as f:
            f.write(data)
        try:
            os.link(aside, self.run.local(LOCK))  # atomic, whole, and only where there is no lock
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(aside)

    def _aside(self, what: str) -> str:
        return str(self.run.local(f"{LOCK}.{what}.{self.doc['pid']}.{threading.get_ident()}.{time.monotonic_ns()}"))

    def _take_over(self, stale: dict) -> None:
        """Remove the stale lock ``stale`` that was read, and nothing else: a lock that another run wrote
        meanwhile (it took the same stale lock over first) stays."""
        if self.run.remote:
            self.run.remove(LOCK)
            return
        aside = self._aside("stale")
        try:
            os.rename(self.run.local(LOCK), aside)  # atomic: of two runs, one moves it
        except FileNotFoundError:
            return  # another run moved it first
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
        except ValueError:
            moved = {}
        if moved and moved != stale:  # a live lock written since: back where it was
            try:
                os.link(aside, self.run.local(LOCK))
            except FileExistsError:
                pass
        os.unlink(aside)

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                break
            try:
                held = self.run.read_json(LOCK) or {}
            except ValueError:  # a lock torn by a crash mid-write (written before locks were linked whole)
                held = {}
            if held and not is_stale(held):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
                raise RunDirBusy(f"run directory {self.run.uri} is in use by `{held.get('command', 'visionflow run')}` "
                                 f"(pid {held.get('pid')} on {held.get('host')}, since {since}); wait for it to end "
                                 f"or stop it, or use another --run-dir (a lock left by a dead run is taken over)")
            self._take_over(held)  # stale: its owner is gone
        else:
            raise RunDirBusy(f"run directory {self.run.uri}: could not take its lock {LOCK} (another run keeps taking it)")
        self._beat = threading.Thread(target=self._beat_loop, name="run-lock-beat", daemon=True)
        self._beat.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(BEAT_S):
            self.doc["beat"] = time.time()
            if self._stop.is_set():
                return
            try:
                self.run.write_json(LOCK, self.doc)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(60)  # a beat being written (a slow upload) must not put the lock back after it
        held = self.run.read_json(LOCK) if self.run.exists(LOCK) else None
        if held and held.get("pid") == self.doc["pid"] and held.get("host") == self.doc["host"]:
            self.run.remove(LOCK)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
