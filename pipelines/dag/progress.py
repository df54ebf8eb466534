"""Progress a person can follow: one actor the stages report to, and the driver's printer."""
from __future__ import annotations

import sys
import time

import ray


@ray.remote(num_cpus=0)
class RunBoard:
    """Status of every stage of a run: ``{name: {"status": waiting|running|done|skipped|failed, ...}}``."""

    def __init__(self):
        self._states: dict[str, dict] = {}

    async def update(self, name: str, status: str, **info) -> None:
        self._states[name] = {"status": status, "time": time.time(), **info}

    async def snapshot(self) -> dict:
        return dict(self._states)


def format_line(states: dict, total: int | None = None) -> str:
    """One line: the current stage and which architectures run, are done or failed (of ``total``)."""
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
    seen = len(done) + len(running) + len(waiting) + len(names({"failed"}, "train/"))
    parts.append(f"trained {len(done)}/{total or seen}")
    if failed:
        parts.append(f"failed: {', '.join(sorted(set(failed)))}")
    return " | ".join(parts)


def _watch(trainings: dict, board) -> None:
    """Report every training task that ended by dying (its process killed: out of memory, a lost node):
    it could not report that itself, since the stage functions catch everything else."""
    if not trainings:
        return
    # fetch_local=False: a finished task counts as ready at once, without waiting for its result here.
    ready, _ = ray.wait(list(trainings.values()), num_returns=len(trainings), timeout=0, fetch_local=False)
    for name in [n for n, r in trainings.items() if r in ready]:
        try:
            ray.get(trainings.pop(name))
        except Exception as e:  # noqa: BLE001  the task's process is gone
            # Waited for, so the next snapshot shows it.
            ray.get(board.update.remote(name, "failed", error=f"{type(e).__name__}: {str(e)[:300]}"))


def follow(ref, board, *, trainings: dict | None = None, poll_s: float = 2.0, out=None):
    """Wait for ``ref`` (the DAG's output), printing a progress line whenever the board changes and the
    individual stage transitions as they happen. ``trainings`` ({"train/<arch>": ObjectRef}) are watched
    for tasks whose process died. Returns ``ray.get(ref)``."""
    out = out or sys.stdout  # looked up per call: sys.stdout may have been swapped since import
    seen: dict[str, str] = {}
    last_line = ""
    trainings = dict(trainings or {})
    total = len(trainings) or None
    while True:
        ready, _ = ray.wait([ref], timeout=poll_s)
        _watch(trainings, board)
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
        line = format_line(states, total) if states else ""
        if line and line.split("] ", 1)[-1] != last_line.split("] ", 1)[-1]:
            print(line, file=out, flush=True)
            last_line = line
        if ready:
            return ray.get(ref)
