"""What the test cluster's processes write to their log files, read straight from the session's logs folder
(the test cluster runs with ``log_to_driver=False``)."""
from __future__ import annotations

import time
from pathlib import Path


def logs_dir() -> Path:
    import ray

    ctx = ray.get_runtime_context()
    return Path(ctx.get_temp_dir()) / ctx.get_session_name() / "logs"


def _log_files() -> dict[str, Path]:
    """Each log file by name. Ray's log monitor moves the files of dead workers into ``logs/old/``: keyed by
    name, a moved file is the same file, not a new one (read whole, an old actor's logs would look new)."""
    return {p.name: p for p in logs_dir().rglob("*") if p.is_file() and p.suffix in (".out", ".log", ".err")}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # moved between the listing and now: seen at its new place next time
        return 0


def log_sizes() -> dict[str, int]:
    return {name: _size(p) for name, p in _log_files().items()}


def logged_since(before: dict[str, int], settle_s: float = 0.0) -> dict[str, str]:
    """What each log file got after ``before`` (a new file: all of it), read ``settle_s`` seconds from now
    (what a process logs on its own schedule after the call that made it, e.g. a fire-and-forget shutdown)."""
    time.sleep(settle_s)
    new = {}
    for name, path in _log_files().items():
        if _size(path) > before.get(name, 0):
            try:
                with open(path, "rb") as f:
                    f.seek(before.get(name, 0))
                    new[name] = f.read().decode(errors="replace")
            except FileNotFoundError:
                pass
    return new
