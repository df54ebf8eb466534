"""Progress a person can follow: one actor the stages report to, and the driver's printer.

The actor also hands out training slots (``train.max_parallel``), so that the number of
architectures training at once is bounded even though the DAG starts every branch together.
"""
from __future__ import annotations

import asyncio
import sys
import time

import ray


@ray.remote(num_cpus=0)
class RunBoard:
    """Status of every stage of a run: ``{name: {"status": waiting|running|done|skipped|failed, ...}}``."""

    def __init__(self, max_parallel_training: int):
        self._states: dict[str, dict] = {}
        self._slots = asyncio.Semaphore(max_parallel_training)
        self._holders: set[str] = set()

    async def update(self, name: str, status: str, **info) -> None:
        self._states[name] = {"status": status, "time": time.time(), **info}

    async def snapshot(self) -> dict:
        return dict(self._states)

    async def acquire_slot(self, holder: str) -> None:
        """Wait for a training slot. A holder that asks again is a retry of a task that died while
        holding its slot: it keeps that slot."""
        if holder in self._holders:
            return
        await self._slots.acquire()
        self._holders.add(holder)

    async def release_slot(self, holder: str) -> None:
        if holder in self._holders:
            self._holders.remove(holder)
            self._slots.release()


def format_line(states: dict) -> str:
    """One line: the current stage and which architectures run, are done or failed."""
    def names(status, prefix):
        return sorted(n.split("/", 1)[1] for n, s in states.items() if n.startswith(prefix) and s["status"] in status)

    running = names({"running"}, "train/")
    waiting = names({"waiting"}, "train/")
    done = names({"done", "skipped"}, "train/")
    failed = names({"failed"}, "train/") + [a for a in names({"failed"}, "eval/") if a not in names({"failed"}, "train/")]
    evaluating = names({"running"}, "eval/")
    stage = "data"
    for prefix in ("train/", "eval/", "compare", "robustness", "deploy", "smoke"):
        if any(n.startswith(prefix) and s["status"] in {"running", "done", "skipped"} for n, s in states.items()):
            stage = prefix.rstrip("/")
    parts = [f"[{time.strftime('%H:%M:%S')}] stage={stage}"]
    if running:
        parts.append(f"training: {', '.join(running)}")
    if evaluating:
        parts.append(f"evaluating: {', '.join(evaluating)}")
    parts.append(f"trained {len(done)}/{len(done) + len(running) + len(waiting) + len(names({'failed'}, 'train/'))}")
    if failed:
        parts.append(f"failed: {', '.join(sorted(set(failed)))}")
    return " | ".join(parts)


def _reap(trainings: dict, board) -> None:
    """Free the slot of every training task that ended by dying (its process killed: out of memory, a lost
    node), since it could not release the slot itself; the stage functions never raise otherwise."""
    if not trainings:
        return
    ready, _ = ray.wait(list(trainings.values()), num_returns=len(trainings), timeout=0)
    for name in [n for n, r in trainings.items() if r in ready]:
        ref = trainings.pop(name)
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001  the task's process is gone
            arch = name.split("/", 1)[1]
            board.release_slot.remote(arch)
            board.update.remote(name, "failed", error=f"{type(e).__name__}: {str(e)[:300]}")


def follow(ref, board, *, trainings: dict | None = None, poll_s: float = 2.0, out=sys.stdout):
    """Wait for ``ref`` (the DAG's output), printing a progress line whenever the board changes and the
    individual stage transitions as they happen. ``trainings`` ({"train/<arch>": ObjectRef}) are watched
    for tasks that died holding a training slot. Returns ``ray.get(ref)``."""
    seen: dict[str, str] = {}
    last_line = ""
    trainings = dict(trainings or {})
    while True:
        ready, _ = ray.wait([ref], timeout=poll_s)
        _reap(trainings, board)
        try:
            states = ray.get(board.snapshot.remote())
        except Exception:  # the board is gone only if the cluster is; the ref will say why
            states = {}
        for name, st in sorted(states.items(), key=lambda kv: kv[1]["time"]):
            if seen.get(name) != st["status"]:
                seen[name] = st["status"]
                extra = ""
                if st["status"] == "failed":
                    extra = f": {str(st.get('error', ''))[:200]}"
                elif st.get("seconds") is not None and st["status"] == "done":
                    extra = f" ({st['seconds']:.1f}s)"
                print(f"  {name}: {st['status']}{extra}", file=out, flush=True)
        line = format_line(states) if states else ""
        if line and line.split("] ", 1)[-1] != last_line.split("] ", 1)[-1]:
            print(line, file=out, flush=True)
            last_line = line
        if ready:
            return ray.get(ref)
