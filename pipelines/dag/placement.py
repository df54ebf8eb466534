"""Fitting a run to the cluster it runs on: how many architectures train at once, or a refusal.

A training holds its Ray Train workers' CPUs/GPUs for its whole run and its Ray Data pipeline (the shard
reads and the augmentation, ``augment_cpus`` a task) needs CPUs beside them, as Ray Train's docs describe
for Train + Data; an evaluation holds ``eval.num_cpus`` and reads the val split through Ray Data too. A
lane trains one architecture and then evaluates it, so one lane needs the larger of the two. Without this
a 2-CPU cluster ran two trainings whose workers held every CPU while their data pipelines waited forever.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from pipelines.dag.config import RunConfig

DATA_CPUS = 1.0  # a Ray Data read task asks for one CPU


class ClusterTooSmall(ValueError):
    """Even one training (or evaluation) of the run cannot be placed on the cluster."""


@dataclass
class Placement:
    lanes: int  # architectures trained (and evaluated) at once
    lane_cpus: float  # what the largest lane asks for
    lane_gpus: float
    cluster_cpus: float
    cluster_gpus: float

    def line(self) -> str:
        gpus = f", {self.lane_gpus:g} GPU" if self.lane_gpus else ""
        return (f"{self.lanes} at once (each up to {self.lane_cpus:g} CPU{gpus}; cluster {self.cluster_cpus:g} CPU"
                + (f", {self.cluster_gpus:g} GPU" if self.cluster_gpus else "") + ")")


def lane_needs(cfg: RunConfig, arch: str) -> tuple[float, float]:
    """``(CPUs, GPUs)`` one lane holds while it trains and then evaluates ``arch``."""
    from pipelines.train.config import TrainConfig

    t = TrainConfig.model_validate({**cfg.train_settings(arch), "data": "-", "out": "-"})
    cpus = t.max_workers * t.cpus_per_worker + max(DATA_CPUS, t.augment_cpus)
    gpus = t.max_workers * t.gpus_per_worker
    if cfg.eval.enabled:
        cpus = max(cpus, cfg.eval.num_cpus + DATA_CPUS)
        gpus = max(gpus, cfg.eval.num_gpus)
    return cpus, gpus


def local_cpus(cfg: RunConfig, cores: int) -> int:
    """Logical CPUs of a local cluster started for ``cfg``: ``num_cpus`` when set, else enough for its
    largest lane (and at least the cores)."""
    if cfg.num_cpus:
        return cfg.num_cpus
    need = max((lane_needs(cfg, a)[0] for a in cfg.archs()), default=1.0)
    return max(cores, math.ceil(need))


def plan(cfg: RunConfig, cpus: float, gpus: float = 0.0) -> Placement:
    """How many lanes fit ``cpus``/``gpus`` (at most ``train.max_parallel``); ClusterTooSmall, naming the
    architecture and what to change, when not even one does."""
    needs = {a: lane_needs(cfg, a) for a in cfg.archs()}
    arch, (cpu_need, _) = max(needs.items(), key=lambda kv: kv[1][0])
    gpu_arch, (_, gpu_need) = max(needs.items(), key=lambda kv: kv[1][1])
    if cpu_need > cpus + 1e-9:
        raise ClusterTooSmall(
            f"train/{arch} needs {cpu_need:g} CPUs (workers x cpus_per_worker, plus {DATA_CPUS:g} for its Ray Data "
            f"pipeline) but the cluster has {cpus:g}: lower train.defaults.workers / cpus_per_worker (or eval.num_cpus), "
            f"or add nodes")
    if gpu_need > gpus + 1e-9:
        raise ClusterTooSmall(f"train/{gpu_arch} needs {gpu_need:g} GPUs (workers x gpus_per_worker) but the cluster "
                              f"has {gpus:g}: set gpus_per_worker: 0 for a CPU run, or add GPU nodes")
    lanes = min(cfg.train.max_parallel, int((cpus + 1e-9) // cpu_need))
    if gpu_need:
        lanes = min(lanes, int((gpus + 1e-9) // gpu_need))
    return Placement(max(1, lanes), cpu_need, gpu_need, cpus, gpus)


def plan_on_cluster(cfg: RunConfig, wait_s: float = 0.0, out=None) -> Placement:
    """``plan`` against the connected cluster. When it is too small, ask the autoscaler for one lane's
    worth (``ray.autoscaler.sdk.request_resources``: a no-op on a fixed cluster) and wait up to ``wait_s``
    for the nodes; then plan or raise ClusterTooSmall."""
    import ray

    def resources():
        r = ray.cluster_resources()
        return float(r.get("CPU", 0)), float(r.get("GPU", 0))

    try:
        return plan(cfg, *resources())
    except ClusterTooSmall:
        if wait_s <= 0:
            raise
    from ray.autoscaler.sdk import request_resources

    needs = [lane_needs(cfg, a) for a in cfg.archs()]
    cpus, gpus = max(n[0] for n in needs), max(n[1] for n in needs)
    request_resources(bundles=[{"CPU": cpus, **({"GPU": gpus} if gpus else {})}])
    if out is not None:
        print(f"visionflow run: asked the autoscaler for {cpus:g} CPUs; waiting up to {wait_s:.0f}s", file=out,
              flush=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return plan(cfg, *resources())
        except ClusterTooSmall:
            if time.monotonic() >= deadline:
                raise
        time.sleep(5)
