"""Which architectures train in which lane: the longest first, each onto the lane with the least work.

A run trains its architectures in ``train.max_parallel`` lanes, each one after another (a lane of
single-worker trainings is one Ray Train run with one warm worker: ``pipelines.train.lane``). The lanes
are fixed when the graph is built, so the run lasts as long as its busiest lane. Dealt out in turn, one
quickstart lane got 431 s of work and the other 255 s in the profile of an afternoon run (the served
detector's 15 epochs and three of the four slowest 1-epoch trainings fell into one).

``assign`` balances them by estimated seconds (longest processing time first: the classic greedy bound is
4/3 of the best split). The estimate is ``epochs x`` a per-epoch cost measured for each registered
architecture at the quickstart's settings on a 2-core CPU (``lane_costs.json``, written by
``benchmarks/stage_profile.py --lane-costs``), scaled by the training's ``limit_train_images`` against the one
measured where both are set, plus its evaluation stage. Only the ratios between architectures matter;
other image sizes or devices shift them, which costs balance, not correctness. An architecture without a
measured cost counts as the median one.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from statistics import median

COSTS_FILE = Path(__file__).with_name("lane_costs.json")


@lru_cache(maxsize=1)
def _costs() -> dict:
    """The measured costs by architecture: entries with a number for ``epoch_s`` and ``eval_s`` (and, if any,
    for ``limit_train_images``); a hand-edited entry without them is left out (it stopped the run's planning
    with a bare KeyError), as is a file that does not parse."""
    try:
        archs = json.loads(COSTS_FILE.read_text())["archs"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    number = (int, float)
    return {a: c for a, c in (archs.items() if isinstance(archs, dict) else [])
            if isinstance(c, dict) and all(isinstance(c.get(k), number) for k in ("epoch_s", "eval_s"))
            and isinstance(c.get("limit_train_images", 0) or 0, number)}


def estimated_seconds(arch: str, settings: dict, evaluate: bool = True) -> float:
    """Estimated seconds of ``arch``'s training (``settings``: its TrainConfig fields) and, when
    ``evaluate``, its evaluation stage."""
    from pipelines.train.config import TrainConfig

    costs = _costs()
    cost = costs.get(arch)
    if cost is None:
        known = list(costs.values())
        cost = ({"epoch_s": median(c["epoch_s"] for c in known), "eval_s": median(c["eval_s"] for c in known)}
                if known else {"epoch_s": 1.0, "eval_s": 0.0})
    epochs = int(settings.get("epochs", TrainConfig.model_fields["epochs"].default))
    images, measured = settings.get("limit_train_images"), cost.get("limit_train_images")
    scale = images / measured if images and measured else 1.0
    return epochs * cost["epoch_s"] * scale + (cost["eval_s"] if evaluate else 0.0)


def assign(archs: list[str], seconds: dict[str, float], lanes: int) -> list[list[str]]:
    """``archs`` split into ``lanes`` lists: each architecture, longest estimate first (ties: the order of
    ``archs``), goes to the lane with the least estimated work so far (ties: the lower lane). Within a lane
    the architectures keep the order of ``archs``. Empty lanes are dropped."""
    load = [0.0] * max(1, lanes)
    members: list[list[str]] = [[] for _ in load]
    order = {a: i for i, a in enumerate(archs)}
    for arch in sorted(archs, key=lambda a: (-seconds[a], order[a])):
        lane = min(range(len(load)), key=lambda k: (load[k], k))
        load[lane] += seconds[arch]
        members[lane].append(arch)
    return [sorted(m, key=order.__getitem__) for m in members if m]
