"""The GPU paths on a machine with one (or more) GPUs, in one run of a few minutes: ``make gpu-check``.

Each check runs side by side with its baseline in the same process and records ratios:

- ``nms``: ``vision.ops.batched_nms`` on the GPU against torchvision's ``batched_nms`` (10,000 boxes, 3
  classes): p50 times, the kept indices equal; and against the same op on the CPU.
- ``amp``: ResNet-18 training steps with AMP (float16 autocast + GradScaler) and without, same seed and
  batches: the speed-up, and the two loss curves side by side (they must stay close).
- ``faster_rcnn``: Faster R-CNN (ResNet-18 FPN) training steps per second, AMP off and on.
- ``alexnet2012``: the two-tower AlexNet with both towers on one GPU (and on two GPUs where there are two):
  a training step's time.
- ``ddp``: visionflow's Ray Train fit with 2 workers sharing the GPU (``gpus_per_worker: 0.5``) over NCCL:
  whether it runs (NCCL refuses two ranks on one device on some versions: recorded as it happens) and its
  images/s against 1 worker.
- ``serve``: the Serve detection graph with the detector and the NMS stage on the GPU: the NMS stage's
  p50 for 10,000 boxes, and end-to-end images/s at concurrency 16 (after one untimed round of requests;
  answered images only, the other status codes counted apart) against the detector called in-process.

Without a GPU it prints one line naming what it skipped and exits 0. ``--cpu-smoke`` runs every check
at a tiny size on the CPU instead (to test this script; its figures are not written).
Results: ``benchmarks/results/gpu_check.json`` (with the command, date, load and cores). A run in which a
check failed writes ``gpu_check.failed.json`` beside it instead and exits 1: the last good figures stay.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results"
CHECKS = ("nms", "amp", "faster_rcnn", "alexnet2012", "ddp", "serve")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _p50(fn, device: torch.device, runs: int) -> float:
    fn()  # warm-up (kernels, caches)
    _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _boxes(n: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 512
    wh = torch.rand(n, 2, generator=g) * 64 + 4
    boxes = torch.cat([xy, xy + wh], dim=1)
    return boxes.to(device), torch.rand(n, generator=g).to(device), torch.randint(0, 3, (n,), generator=g).to(device)


def check_nms(device: torch.device, small: bool) -> dict:
    import torchvision

    from vision.ops import batched_nms

    n = 1000 if small else 10_000
    boxes, scores, labels = _boxes(n, device)
    ours = _p50(lambda: batched_nms(boxes, scores, labels, 0.5), device, 5 if small else 50)
    theirs = _p50(lambda: torchvision.ops.batched_nms(boxes, scores, labels, 0.5), device, 5 if small else 50)
    cpu = _boxes(n, torch.device("cpu"))
    on_cpu = _p50(lambda: batched_nms(*cpu, 0.5), torch.device("cpu"), 3 if small else 10)
    same = torch.equal(batched_nms(boxes, scores, labels, 0.5).cpu(),
                       torchvision.ops.batched_nms(boxes, scores, labels, 0.5).cpu())
    return {"boxes": n, "ours_p50_ms": ours * 1e3, "torchvision_p50_ms": theirs * 1e3, "cpu_p50_ms": on_cpu * 1e3,
            "ours_vs_torchvision": theirs / ours, "gpu_vs_cpu": on_cpu / ours, "kept_equal": same}


def _train_steps(model, make_batch, device, steps: int, amp: bool, detection: bool = False):
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    losses = []
    batches = [make_batch(i) for i in range(steps + 1)]
    _sync(device)
    t0 = None
    for i, batch in enumerate(batches):
        if i == 1:  # the first step (cuDNN autotuning, allocations) is not timed
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            if detection:
                images, targets = batch
                loss = sum(model(images, targets).values())
            else:
                x, y = batch
                loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    _sync(device)
    return steps / (time.perf_counter() - t0), losses


def check_amp(device: torch.device, small: bool) -> dict:
    from vision.models import create_model

    size, batch, steps = (32, 8, 4) if small else (128, 64, 60)

    def make_batch(i):
        g = torch.Generator().manual_seed(i)
        x = torch.rand(batch, 3, size, size, generator=g)
        return x.to(device), (x.mean(dim=(1, 2, 3)) * 10).long().clamp(0, 9).to(device)

    out = {}
    for amp in (False, True):
        torch.manual_seed(0)
        rate, losses = _train_steps(create_model("resnet18", 10), make_batch, device, steps, amp)
        out["amp" if amp else "fp32"] = {"steps_per_s": rate, "losses": losses[:: max(1, steps // 10)]}
    fp32, amp = out["fp32"]["losses"], out["amp"]["losses"]
    out["speedup"] = out["amp"]["steps_per_s"] / out["fp32"]["steps_per_s"]
    out["max_loss_gap"] = max(abs(a - b) for a, b in zip(fp32, amp))
    out["image_size"], out["batch"] = size, batch
    return out


def check_faster_rcnn(device: torch.device, small: bool) -> dict:
    from vision.models import create_model

    size, batch, steps = (64, 2, 2) if small else (256, 8, 20)

    def make_batch(i):
        g = torch.Generator().manual_seed(i)
        images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
        targets = [{"boxes": torch.tensor([[8.0, 8.0, size / 2, size / 2]], device=device),
                    "labels": torch.tensor([1], device=device)} for _ in range(batch)]
        return images, targets

    out = {"image_size": size, "batch": batch}
    for amp in (False, True):
        torch.manual_seed(0)
        model = create_model("fasterrcnn_resnet18_fpn", 3, min_size=size, max_size=size)
        rate, _ = _train_steps(model, make_batch, device, steps, amp, detection=True)
        out["amp_steps_per_s" if amp else "fp32_steps_per_s"] = rate
    out["amp_speedup"] = out["amp_steps_per_s"] / out["fp32_steps_per_s"]
    return out


def check_alexnet2012(device: torch.device, small: bool) -> dict:
    from vision.models import create_model

    size, batch, steps = (64, 4, 2) if small else (224, 64, 20)
    layouts = {"one_device": (device, device)}
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        layouts["two_gpus"] = (torch.device("cuda:0"), torch.device("cuda:1"))
    out = {"image_size": size, "batch": batch}
    for name, devices in layouts.items():
        model = create_model("alexnet2012", 10, devices=devices)
        first = devices[0]

        def make_batch(i, first=first):
            g = torch.Generator().manual_seed(i)
            return torch.rand(batch, 3, size, size, generator=g).to(first), torch.randint(0, 10, (batch,), generator=g).to(first)

        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        batches = [make_batch(i) for i in range(steps + 1)]
        for i, (x, y) in enumerate(batches):
            if i == 1:
                for d in set(devices):
                    _sync(d)
                t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for d in set(devices):
            _sync(d)
        out[f"{name}_steps_per_s"] = steps / (time.perf_counter() - t0)
    return out


def _tiny_data(root: Path, images: int, size: int) -> Path:
    from pipelines.data import ingest
    from vision.data.synth import write_synth

    write_synth(root / "coco", images=images, size=size, seed=0)
    for split in ("train", "val"):
        ingest(root / "coco" / "annotations" / f"instances_{split}.json", root / "coco" / split, root / "data" / split)
    return root / "data"


def check_ddp(device: torch.device, small: bool, work: Path) -> dict:
    from pipelines.train import TrainConfig, fit

    data = _tiny_data(work / "ddp", 24 if small else 400, 64)
    gpu = 0.5 if device.type == "cuda" else 0
    out = {}
    for workers in (1, 2):
        cfg = TrainConfig(arch="resnet18", data=str(data), out=str(work / f"ddp_run_{workers}"), workers=workers,
                          gpus_per_worker=gpu if workers == 2 else (1 if gpu else 0), cpus_per_worker=1,
                          epochs=1 if small else 3, batch_size=16 if small else 64, image_size=32 if small else 64)
        try:
            result = fit(cfg)
            out[f"workers_{workers}"] = {"images_per_s": result["metrics"].get("train_images_per_s"),
                                         "epochs": result["epochs_run"]}
        except Exception as e:  # noqa: BLE001 -- e.g. NCCL refusing two ranks on one device: recorded
            out[f"workers_{workers}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return out


def check_serve(device: torch.device, small: bool) -> dict:
    import asyncio
    import io

    import numpy as np
    from PIL import Image

    from pipelines.serve import deploy, shutdown

    size, requests, concurrency = (64, 8, 4) if small else (320, 200, 16)
    gpu = device.type == "cuda"
    args = {"models": [{"name": "det", "task": "detection", "arch": "fasterrcnn_mobilenet_v3_fpn", "num_classes": 3,
                        "random_weights": True, "image_size": size,
                        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
                        "model": {"num_cpus": 1, "num_gpus": 0.5 if gpu else 0, "max_ongoing_requests": 32}}],
            "nms": {"score_threshold": 0.0}, "nms_stage": {"num_cpus": 0.25, "num_gpus": 0.25 if gpu else 0}}
    url = deploy(args, port=8471)
    try:
        from ray import serve

        nms = serve.get_deployment_handle("NmsStage", app_name="visionflow")
        from vision.structures import Detections

        boxes, scores, labels = _boxes(1000 if small else 10_000, torch.device("cpu"))
        item = {"dets": Detections(boxes, scores, labels + 1), "iou_threshold": 0.5, "score_threshold": 0.0,
                "max_detections": 100}
        times = []
        for _ in range(5 if small else 30):
            t0 = time.perf_counter()
            nms.remote([item]).result()
            times.append(time.perf_counter() - t0)
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8")).save(buf, "JPEG")
        body = buf.getvalue()

        async def load():
            import aiohttp

            sem = asyncio.Semaphore(concurrency)
            async with aiohttp.ClientSession() as session:
                async def one():
                    async with sem, session.post(f"{url}/v1/detect", data=body,
                                                 headers={"Content-Type": "image/jpeg"}) as r:
                        await r.read()
                        return r.status
                # One untimed round at the same concurrency: the replicas' first batches (CUDA context,
                # kernels, allocations) and the HTTP connections are not part of the rate.
                await asyncio.gather(*[one() for _ in range(concurrency)])
                t0 = time.perf_counter()
                codes = await asyncio.gather(*[one() for _ in range(requests)])
                return time.perf_counter() - t0, codes

        took, codes = asyncio.run(load())
    finally:
        shutdown()
    from pipelines.serve.config import ModelSpec
    from pipelines.serve.images import decode_image, to_tensor
    from pipelines.serve.models import load_served_model, run_candidates

    model, _ = load_served_model(ModelSpec.model_validate(args["models"][0]))
    model.to(device)
    tensor = to_tensor(decode_image(body, 2**30), size, False)[0].to(device)
    per_image = _p50(lambda: run_candidates(model, [tensor]), device, 5 if small else 30)
    return serve_rates(codes, took, per_image) | {"nms_stage_p50_ms": statistics.median(times) * 1e3,
                                                  "nms_boxes": len(boxes), "concurrency": concurrency}


def serve_rates(codes: list[int], took: float, per_image: float) -> dict:
    """The graph's rate from the answered (200) requests only, against the in-process model's; a refusal or
    a timeout is counted, never a served image. Raises when no request was answered."""
    answered = sum(c == 200 for c in codes)
    refused = {str(c): codes.count(c) for c in sorted(set(codes)) if c != 200}
    if not answered:
        raise RuntimeError(f"no request of {len(codes)} was answered 200 ({refused})")
    graph = answered / took
    return {"graph_images_per_s": graph, "in_process_images_per_s": 1 / per_image,
            "graph_vs_in_process": graph * per_image, "answered": answered, "not_answered": refused}


def failed_checks(result: dict) -> list[str]:
    """The checks of ``result`` that ended in an error (``ddp``'s workers may record NCCL's refusal as a
    finding: that is not a failed check)."""
    return [name for name, res in result["checks"].items() if "error" in res]


def results_path(out: str, result: dict) -> Path:
    """Where a run's file goes: ``out``, or ``<out stem>.failed.json`` beside it when a check failed, so that
    a failed run never replaces the last good figures."""
    out = Path(out)
    return out.with_name(f"{out.stem}.failed{out.suffix}") if failed_checks(result) else out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run every check tiny on the CPU (tests this script)")
    ap.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    ap.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    provenance.add_arguments(ap)
    args = ap.parse_args(argv)
    start = provenance.begin(args)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"gpu-check: no CUDA GPU on this machine; skipped {', '.join(args.checks)} (nothing written)")
        return 0
    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    small = args.cpu_smoke
    import tempfile

    from pipelines.ray_runtime import LOCAL, connect

    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "checks": {}}
    work = Path(tempfile.mkdtemp(prefix="vf_gpu_check_"))
    for name in args.checks:
        t0 = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            if name in ("ddp", "serve"):
                connect(LOCAL, num_cpus=8, num_gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
                        dashboard=False, log_to_driver=False)
            fn = {"nms": check_nms, "amp": check_amp, "faster_rcnn": check_faster_rcnn,
                  "alexnet2012": check_alexnet2012, "serve": check_serve}.get(name)
            res = check_ddp(device, small, work) if name == "ddp" else fn(device, small)
        except Exception as e:  # noqa: BLE001 -- one failing check does not hide the others
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        result["checks"][name] = res
        print(f"gpu-check: {name}: {res}", flush=True)
    failed = failed_checks(result)
    if args.cpu_smoke:
        print("gpu-check: --cpu-smoke: figures not written")
        return 1 if failed else 0
    path = results_path(args.out, result)
    if provenance.write(path, result, start):
        print(f"gpu-check: wrote {path}" + (f" (failed: {', '.join(failed)}; {args.out} kept as it was)"
                                            if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
