"""Starting a local Ray cluster the same way from every command, test and benchmark.

Ray kills idle worker processes above its soft limit (one per CPU) after one second. Every epoch of a
training run is its own Ray Data execution, so with that default each epoch started fresh processes that
imported torch and torchvision again (about 5 CPU-seconds each): on 2 cores that halved training
throughput. ``WORKER_POOL`` keeps idle workers for two minutes instead. On a cluster started with
``ray start`` the same setting is the environment variable in ``RAY_START_ENV`` (the ``cluster/`` YAMLs
set it).
"""
from __future__ import annotations

WORKER_POOL = {"idle_worker_killing_time_threshold_ms": 120_000}
RAY_START_ENV = {f"RAY_{k}": str(v) for k, v in WORKER_POOL.items()}


def start_local(num_cpus: float | None = None, attempts: int = 3, **kwargs):
    """``ray.init`` of a new local cluster with ``num_cpus`` logical CPUs (None: one per core) and the
    worker pool kept warm between Ray Data executions; other keyword arguments go to ``ray.init``.

    On a loaded machine the raylet can give up waiting for its agents (ray-project/ray#65983: "timed
    out during startup"); the next try usually starts, so that error is tried up to ``attempts`` times."""
    import ray

    kwargs.setdefault("include_dashboard", False)
    for attempt in range(attempts):
        try:
            return ray.init(num_cpus=num_cpus, _system_config=dict(WORKER_POOL), **kwargs)
        except Exception as e:  # noqa: BLE001 -- Ray raises a bare Exception when start-up times out
            if attempt == attempts - 1 or "timed out during startup" not in str(e):
                raise
            print(f"ray.init failed ({e}); retrying", flush=True)
            ray.shutdown()
