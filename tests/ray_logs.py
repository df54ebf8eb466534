"""What the test cluster's processes write to their log files, read straight from the session's logs folder
(the test cluster runs with ``log_to_driver=False``)."""
from __future__ import annotations

import time
from pathlib import Path


def logs_dir() -> Path:
    import ray

    ctx = ray.get_runtime_context()
    return Path(ctx.get_temp_dir()) / ctx.get_session_name() / "logs"


def log_sizes() -> dict[Path, int]:
    return {p: p.stat().st_size for p in logs_dir().rglob("*") if p.is_file() and p.suffix in (".out", ".log", ".err")}


def logged_since(before: dict[Path, int], settle_s: float = 0.0) -> dict[str, str]:
    """What each log file got after ``before`` (a new file: all of it), read ``settle_s`` seconds from now
    (what a process logs on its own schedule after the call that made it, e.g. a fire-and-forget shutdown)."""
    time.sleep(settle_s)
    new = {}
    for path, size in log_sizes().items():
        if size > before.get(path, 0):
            with open(path, "rb") as f:
                f.seek(before.get(path, 0))
                new[path.name] = f.read().decode(errors="replace")
    return new
