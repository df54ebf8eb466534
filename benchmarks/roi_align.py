"""R-CNN training steps on the CPU with visionflow's RoI pools (``vision/ops/roi_align.py``: RoIAlign's
training pass as a sparse matrix product) against the same networks with torchvision's
``MultiScaleRoIAlign``, in one run: same weights, same batch of 4 synthetic images (3 boxes and masks
each), AdamW steps of the two sides interleaved in rounds so that load drift hits both alike. Before
timing, the pools' outputs and feature gradients are checked equal on the networks' own first batch.
Writes ``benchmarks/results/roi_align.json``.

    .venv/bin/python -m benchmarks.roi_align [--cases fasterrcnn_resnet18_fpn:96 ...] [--rounds 5] [--steps 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torchvision.ops import MultiScaleRoIAlign as TorchvisionPool

from benchmarks import provenance
from vision.models.detection.faster_rcnn import _LEVELS as LEVELS

RESULTS = Path(__file__).parent / "results"
CASES = ["fasterrcnn_resnet18_fpn:96", "maskrcnn_resnet18_fpn:96", "fasterrcnn_resnet18_fpn:128",
         "maskrcnn_resnet18_fpn:128", "fasterrcnn_mobilenet_v3_fpn:128"]


def batch(size: int, masks: bool, seed: int = 0) -> tuple[list, list]:
    """4 random images with 3 square objects each (12-28 px), their boxes, labels and (for Mask R-CNN) masks."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(4):
        images.append(torch.rand(3, size, size, generator=g))
        boxes = []
        for j in range(3):
            x, y = torch.randint(0, size - 40, (2,), generator=g).tolist()
            boxes.append([x, y, x + 12 + 8 * j, y + 12 + 8 * j])
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1, 2, 3])}
        if masks:
            m = torch.zeros(3, size, size, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes):
                m[j, y1:y2, x1:x2] = 1
            t["masks"] = m
        targets.append(t)
    return images, targets


def networks(arch: str, size: int) -> dict[str, torch.nn.Module]:
    """The registry's network (visionflow's pools) and the same one with torchvision's, same weights."""
    from vision.models.registry import create_model

    masks = arch.startswith("maskrcnn")
    ours = create_model(arch, 5, min_size=size, max_size=size).net
    pools = {"box_roi_pool": TorchvisionPool(LEVELS, 7, 2)}
    if masks:
        pools["mask_roi_pool"] = TorchvisionPool(LEVELS, 14, 2)
    theirs = create_model(arch, 5, min_size=size, max_size=size, **pools).net
    theirs.load_state_dict(ours.state_dict())
    return {"torchvision": theirs.train(), "visionflow": ours.train()}


def pools_agree(nets: dict, images: list, targets: list) -> float:
    """Largest difference between the two box pools' outputs and feature gradients on the network's own
    features and proposals of ``images``, relative to each tensor's largest magnitude (at least 1)."""
    net = nets["visionflow"]
    with torch.no_grad():
        image_list, _ = net.transform(images, [dict(t) for t in targets])
        features = net.backbone(image_list.tensors)
        proposals, _ = net.rpn.eval()(image_list, features)
        net.rpn.train()
    outs, grads = {}, {}
    for name, pool in (("visionflow", net.roi_heads.box_roi_pool), ("torchvision", TorchvisionPool(LEVELS, 7, 2))):
        feats = {k: v.clone().requires_grad_(True) for k, v in features.items()}
        out = pool(feats, proposals, image_list.image_sizes)
        g = torch.autograd.grad(out, [feats[k] for k in LEVELS if k in feats], torch.ones_like(out), allow_unused=True,
                                materialize_grads=True)
        outs[name], grads[name] = out, g
    pairs = [(outs["visionflow"].detach(), outs["torchvision"].detach()), *zip(grads["visionflow"], grads["torchvision"])]
    # relative to the largest value of each tensor (a gradient of ones sums many RoIs into one pixel)
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1.0)) for a, b in pairs)


def step_times(nets: dict, images: list, targets: list, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per training step of each side: ``rounds`` rounds of ``steps`` steps, sides alternating."""
    optimizers = {k: torch.optim.AdamW(n.parameters(), 1e-3) for k, n in nets.items()}

    def step(k):
        loss = sum(nets[k](images, targets).values())
        optimizers[k].zero_grad()
        loss.backward()
        optimizers[k].step()

    for k in nets:  # warm-up: first-call allocations, the pools' scales
        step(k)
    times = {k: [] for k in nets}
    for r in range(rounds):
        for k in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
            t = time.perf_counter()
            for _ in range(steps):
                step(k)
            times[k].append((time.perf_counter() - t) / steps)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=CASES, help="ARCH:SIZE, e.g. maskrcnn_resnet18_fpn:96")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per round and side")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=str(RESULTS / "roi_align.json"))
    provenance.add_arguments(ap)
    args = ap.parse_args(argv)
    start = provenance.begin(args)
    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases:
        arch, size = case.split(":")
        size = int(size)
        torch.manual_seed(0)
        nets = networks(arch, size)
        images, targets = batch(size, arch.startswith("maskrcnn"))
        diff = pools_agree(nets, images, targets)
        if diff > 1e-3:
            raise AssertionError(f"{case}: the pools differ by {diff:.2e}")
        times = step_times(nets, images, targets, args.rounds, args.steps)
        ours, theirs = statistics.median(times["visionflow"]), statistics.median(times["torchvision"])
        rows.append({"case": f"{arch} {size}px", "visionflow_ms": ours * 1e3, "torchvision_ms": theirs * 1e3,
                     "speedup": theirs / ours, "max_relative_difference": diff})
        print(f"{case}: {ours * 1e3:.0f} ms/step with visionflow's pools, {theirs * 1e3:.0f} with torchvision's: "
              f"{theirs / ours:.2f}x (pools differ by at most {diff:.1e}, relative)", flush=True)
    result = {"benchmark": "roi_align", "threads": args.threads, "batch": 4, "rounds": args.rounds,
              "steps_per_round": args.steps, "rows": rows,
              "note": "median seconds per training step of each side; speedup = torchvision's / visionflow's"}
    provenance.write(Path(args.out), result, start)
    return result


if __name__ == "__main__":
    main()
