"""What robustness costs: attack, detector and deconvnet throughput against plain inference, same run.

On one registry classifier (default ZFNet at 64 px, random weights: the cost does not depend on them),
batch after batch of random images:
- ``inference``: eval-mode forward passes (the baseline, ratio 1);
- ``fgsm``, ``pgd10`` (L-infinity, 10 steps): adversarial images per second;
- ``gradient_detector``, ``squeeze_detector``: images scored per second;
- ``projection_gradient`` (plain backprop of one activation of conv2) against ``projection_deconvnet``
  (the same through the deconvnet's backward rules): what the rule costs on top of a backward pass.
Writes ``benchmarks/results/adversarial_cost.json``.

    .venv/bin/python -m benchmarks.adversarial_cost [--arch zfnet] [--size 64] [--batch 16] [--batches 3]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results"


def _rate(fn, batches: list[torch.Tensor], repeat: int) -> float:
    fn(batches[0])  # warm-up
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for b in batches:
            fn(b)
        best = max(best, sum(len(b) for b in batches) / (time.perf_counter() - start))
    return best


def main() -> None:
    from vision.adversarial import GradientDetector, SqueezeDetector, fgsm, pgd
    from vision.explain import project
    from vision.models import create_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="zfnet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2)
    provenance.add_arguments(p)
    args = p.parse_args()
    start = provenance.begin(args)

    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10).eval()
    batches = [torch.rand(args.batch, 3, args.size, args.size) for _ in range(args.batches)]
    labels = torch.randint(0, 10, (args.batch,))
    grad_det, squeeze_det = GradientDetector(model), SqueezeDetector(model)
    units = [(0, 1, 1)] * args.batch

    def infer(x):
        with torch.no_grad():
            model(x)

    cases = {
        "inference": infer,
        "fgsm": lambda x: fgsm(model, x, labels, 8 / 255),
        "pgd10": lambda x: pgd(model, x, labels, 8 / 255, steps=10),
        "gradient_detector": grad_det.score,
        "squeeze_detector": squeeze_det.score,
        "projection_gradient": lambda x: project(model, x, "conv2", units, method="gradient"),
        "projection_deconvnet": lambda x: project(model, x, "conv2", units, method="deconvnet"),
    }
    rates = {name: _rate(fn, batches, args.repeat) for name, fn in cases.items()}
    rows = [{"case": name, "images_per_s": r, "ratio_to_inference": r / rates["inference"]} for name, r in rates.items()]
    deconv_vs_grad = rates["projection_deconvnet"] / rates["projection_gradient"]
    result = {"arch": args.arch, "size": args.size, "batch": args.batch, "batches": args.batches,
              "threads": torch.get_num_threads(), "rows": rows, "deconvnet_over_gradient": deconv_vs_grad,
              "note": "shared 2-core machine; other processes load the CPU too"}
    provenance.write(RESULTS / "adversarial_cost.json", result, start)
    print(f"{args.arch} {args.size}px, batch {args.batch} x {args.batches}")
    print(f"{'case':<22}{'images/s':>10}{'vs inference':>14}")
    for r in rows:
        print(f"{r['case']:<22}{r['images_per_s']:>10.1f}{r['ratio_to_inference']:>14.3f}")
    print(f"deconvnet projection / plain-gradient projection throughput: {deconv_vs_grad:.2f}")


if __name__ == "__main__":
    main()
