"""NMS cost: ``vision.ops.batched_nms`` against torchvision's own ``batched_nms`` (the same kernel, so the
ratio shows our checks' overhead: ~1 expected), and vectorized ``soft_nms`` against the paper's
algorithm written as a plain Python loop, in one run, on the same random boxes (80 classes).
Kept indices are checked equal. Writes ``benchmarks/results/nms.json``.

    .venv/bin/python -m benchmarks.nms [--sizes 1000 10000 100000] [--soft-sizes 200 1000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torchvision

from vision.ops import batched_nms, soft_nms

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results"


def random_boxes(n: int, seed: int = 0, size: float = 1000.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 10 + 2
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g), torch.randint(0, 80, (n,), generator=g)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, calls interleaved so that load drift hits both alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def python_soft_nms(boxes, scores, iou_threshold=0.3, sigma=0.5, score_threshold=0.001, method="gaussian"):
    """Soft-NMS one box at a time in plain Python (the reference the vectorized version replaces)."""
    b, s = boxes.tolist(), scores.tolist()
    remaining = [i for i in range(len(b)) if s[i] > score_threshold]
    keep = []
    while remaining:
        m = max(remaining, key=lambda i: s[i])
        keep.append(m)
        remaining.remove(m)
        p = b[m]
        for i in remaining:
            q = b[i]
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            o = inter / union if union > 0 else 0.0
            s[i] *= math.exp(-(o * o) / sigma) if method == "gaussian" else ((1 - o) if o > iou_threshold else 1.0)
        remaining = [i for i in remaining if s[i] > score_threshold]
    return keep


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--soft-sizes", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iou", type=float, default=0.5)
    provenance.add_arguments(ap)
    args = ap.parse_args(argv)
    start = provenance.begin(args)
    rows = []
    for n in args.sizes:
        boxes, scores, labels = random_boxes(n)
        ours = batched_nms(boxes, scores, labels, args.iou)
        ref = torchvision.ops.batched_nms(boxes, scores, labels, args.iou)
        assert torch.equal(ours, ref), f"kept indices differ at n={n}"
        reps = max(args.repeats, 100_000 // n)  # small inputs are quick: more calls, steadier medians
        t_ours, t_ref = timed_pair(lambda: batched_nms(boxes, scores, labels, args.iou),
                                   lambda: torchvision.ops.batched_nms(boxes, scores, labels, args.iou), reps)
        rows.append({"op": "batched_nms", "boxes": n, "ours_ms": t_ours * 1e3, "baseline": "torchvision.ops.batched_nms",
                     "baseline_ms": t_ref * 1e3, "ratio": t_ours / t_ref, "kept": len(ours)})
    for n in args.soft_sizes:
        boxes, scores, _ = random_boxes(n, seed=1, size=200.0)  # dense: many overlaps to decay
        keep, _ = soft_nms(boxes.double(), scores.double())
        ref = python_soft_nms(boxes.double(), scores.double())
        assert keep.tolist() == ref, f"soft-NMS order differs at n={n}"
        t_ours = timed(lambda: soft_nms(boxes, scores), args.repeats)
        t_ref = timed(lambda: python_soft_nms(boxes, scores), max(1, args.repeats // 5))
        rows.append({"op": "soft_nms (gaussian)", "boxes": n, "ours_ms": t_ours * 1e3, "baseline": "Python loop",
                     "baseline_ms": t_ref * 1e3, "ratio": t_ours / t_ref, "kept": len(keep)})
    result = {"benchmark": "nms", "threads": torch.get_num_threads(), "iou_threshold": args.iou, "rows": rows,
              "note": "shared 2-core machine; ratio = ours / baseline (lower is faster)"}
    provenance.write(RESULTS / "nms.json", result, start)
    print(f"{'op':<22}{'boxes':>8}{'ours ms':>11}{'baseline':>30}{'base ms':>11}{'ratio':>8}")
    for r in rows:
        print(f"{r['op']:<22}{r['boxes']:>8}{r['ours_ms']:>11.2f}{r['baseline']:>30}{r['baseline_ms']:>11.2f}"
              f"{r['ratio']:>8.3f}")
    return result


if __name__ == "__main__":
    main()
