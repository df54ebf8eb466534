"""What running under Ray costs the training steps themselves on a small machine: the same Faster R-CNN
ResNet-18 FPN steps (AdamW, 8 synthetic 128 px images of 3 boxes, ``--threads`` torch threads) timed in
four places, each in a process of its own, one after another:

- ``plain``: a Python process, no Ray (what ``benchmarks.detection_vs_reference``'s reference loop is);
- ``ray_cluster``: the same process after starting a local Ray cluster (GCS, raylet, agents, idle workers);
- ``ray_train_beside``: the same, with a Ray Train run beside it whose worker waits (the controller,
  placement-group cleaner, synchronization actor and worker of a fit, all idle);
- ``ray_train_worker``: inside a Ray Train worker (``TorchTrainer``, one worker of ``--threads`` CPUs),
  where visionflow's ``fit`` runs its steps;

then ``plain`` again (``plain_after``: the machine's drift over the run). Reported: median seconds per
step of each, its ratio to ``plain`` and the CPU the machine's other processes used meanwhile (in cores:
Ray's daemons and actors). Writes ``benchmarks/results/ray_step_overhead.json``.

    .venv/bin/python -m benchmarks.ray_step_overhead [--rounds 4] [--steps 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import process_cpu, provenance

RESULTS = Path(__file__).parent / "results"
CASES = ["plain", "ray_cluster", "ray_train_beside", "ray_train_worker", "plain"]


def _cpu_seconds(skip: int) -> float:
    """CPU seconds (user + system) used so far by every process of the machine but ``skip`` itself: each
    live process's own, and its ended children's once it has reaped them (so a process that ends within
    a window still counts, under its parent)."""
    total = 0.0
    for pid in process_cpu.pids():
        stat = process_cpu.read_stat(pid)
        if stat is not None:
            total += stat[2] + (0 if pid == skip else stat[1])
    return total


def time_steps(rounds: int, steps: int, threads: int) -> dict:
    """Seconds per step of each round (after 3 warm-up steps) and the cores the machine's other processes
    used meanwhile."""
    import torch

    from vision.models.detection.faster_rcnn import fasterrcnn_resnet18_fpn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = fasterrcnn_resnet18_fpn(3, min_size=128, max_size=128).net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(5):
        xy = [torch.rand(3, 2, generator=g) * 80 for _ in range(8)]
        batches.append(([torch.rand(3, 128, 128, generator=g) for _ in range(8)],
                        [{"boxes": torch.cat([p, p + 16 + torch.rand(3, 2, generator=g) * 40], 1),
                          "labels": torch.randint(1, 4, (3,), generator=g)} for p in xy]))

    def step(i: int) -> None:
        images, targets = batches[i % len(batches)]
        loss = sum(net(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    net.train()
    for i in range(3):
        step(i)
    others, wall, per_step = _cpu_seconds(os.getpid()), time.perf_counter(), []
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(steps):
            step(i)
        per_step.append((time.perf_counter() - t) / steps)
    wall = time.perf_counter() - wall
    return {"seconds_per_step": per_step, "other_processes_cores": (_cpu_seconds(os.getpid()) - others) / wall}


def _train_fn(config: dict) -> None:
    """A Ray Train worker's loop: time the steps (``config["time"]``, written to ``config["out"]``: a local
    cluster's worker shares the driver's disk) or wait for ``config["until"]``."""
    if config.get("time"):
        Path(config["out"]).write_text(json.dumps(time_steps(*config["time"])))
        return
    while not os.path.exists(config["until"]):
        time.sleep(0.2)


def _trainer(config: dict, threads: int, storage: str):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(_train_fn, train_loop_config=config,
                        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                        run_config=RunConfig(name="ray_step_overhead", storage_path=storage))


def run_case(case: str, rounds: int, steps: int, threads: int) -> dict:
    """One case in this process (see the module's docstring)."""
    if case == "plain":
        return time_steps(rounds, steps, threads)
    import ray

    from pipelines.ray_runtime import LOCAL, connect

    connect(LOCAL, num_cpus=threads + 2, dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if case == "ray_train_worker":
                out = os.path.join(tmp, "steps.json")
                result = _trainer({"time": [rounds, steps, threads], "out": out}, threads, tmp).fit()
                if result.error is not None:
                    raise RuntimeError(f"the Ray Train run failed: {result.error}")
                return json.loads(Path(out).read_text())
            if case == "ray_cluster":
                time.sleep(5)  # the cluster's start is over
                return time_steps(rounds, steps, threads)
            until = os.path.join(tmp, "done")
            beside = threading.Thread(target=lambda: _trainer({"until": until}, threads, tmp).fit(), daemon=True)
            beside.start()
            time.sleep(15)  # its controller and worker are up, its worker waits
            try:
                return time_steps(rounds, steps, threads)
            finally:
                Path(until).touch()
                beside.join(timeout=60)
    finally:
        ray.shutdown()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=15, help="training steps per round")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and the Ray Train worker's CPUs)")
    ap.add_argument("--case", choices=sorted(set(CASES)), help=argparse.SUPPRESS)  # one case, in a child process
    ap.add_argument("--out", default=str(RESULTS / "ray_step_overhead.json"))
    provenance.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.rounds, args.steps, args.threads)), flush=True)
        return {}
    start = provenance.begin(args)
    rows, plain = [], None
    for i, case in enumerate(CASES):
        name = "plain_after" if case == "plain" and i > 0 else case
        out = subprocess.run([sys.executable, "-m", "benchmarks.ray_step_overhead", "--case", case,
                              "--rounds", str(args.rounds), "--steps", str(args.steps), "--threads", str(args.threads)],
                             capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        seconds = statistics.median(got["seconds_per_step"])
        plain = seconds if plain is None else plain
        rows.append({"case": name, "seconds_per_step": seconds, "ratio_to_plain": seconds / plain,
                     "other_processes_cores": got["other_processes_cores"],
                     "rounds_seconds_per_step": got["seconds_per_step"]})
        print(f"{name}: {seconds * 1e3:.0f} ms/step, {seconds / plain:.3f}x plain, other processes "
              f"{got['other_processes_cores']:.2f} cores", flush=True)
    result = {"benchmark": "ray_step_overhead", "arch": "fasterrcnn_resnet18_fpn", "size": 128, "batch": 8,
              "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps, "rows": rows,
              "note": "median seconds per training step of each case, each in its own process, in this order; "
                      "ratio_to_plain against the first plain case"}
    provenance.write(Path(args.out), result, start)
    return result


if __name__ == "__main__":
    main()
