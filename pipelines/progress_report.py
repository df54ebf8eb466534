"""Telling a run's progress board (``pipelines.dag.progress.RunBoard``) how a stage or a training stands."""
from __future__ import annotations


def tell(board, name: str, status: str, **info) -> None:
    """``board.update(name, status, **info)``, waiting until the board has it: a stage's result may reach
    the driver before a call still in flight, and the driver's last look at the board must show every
    stage. At most 5 s; errors are swallowed (progress is for people: a lost board never fails the work).
    ``board`` None tells no one."""
    if board is None:
        return
    import ray

    try:
        ray.get(board.update.remote(name, status, **info), timeout=5)
    except Exception:  # noqa: BLE001
        pass
