"""The log reader the Ray-output tests stand on: a worker's log that Ray's log monitor moves into
``logs/old/`` (it does so for dead workers, on its own schedule) is the same file, not new output."""
from __future__ import annotations

import uuid

from ray_logs import log_sizes, logged_since, logs_dir


def test_a_log_moved_into_old_is_not_new_output_and_what_it_gets_after_the_move_is(ray_cluster):
    name = f"worker-{uuid.uuid4().hex}-01000000-1.out"
    path, new = logs_dir() / name, logs_dir() / f"worker-{uuid.uuid4().hex}-01000000-2.out"
    path.write_text(":actor_name:SplitCoordinator\nearlier output\n")
    try:
        before = log_sizes()
        old = logs_dir() / "old"
        old.mkdir(exist_ok=True)
        moved = old / name
        path.rename(moved)  # what the log monitor does with a dead worker's files
        assert name not in logged_since(before)
        with open(moved, "a") as f:
            f.write("later output\n")
        assert logged_since(before)[name] == "later output\n"
        new.write_text("a new worker\n")
        assert logged_since(before)[new.name] == "a new worker\n"
    finally:
        for p in (path, new, logs_dir() / "old" / name):
            p.unlink(missing_ok=True)
