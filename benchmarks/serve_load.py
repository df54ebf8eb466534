"""Serving under load: the deployed detection graph over HTTP against the same model called in-process.

In one run:
- ``in_process``: the detector's ``candidates`` + per-class NMS called directly on ready tensors at
  batch sizes 1..16, with the Serve replica's torch thread count (read from it; the graph idles
  meanwhile); the best rate is the limit;
- ``serve``: the Serve graph (ingress -> preprocess -> batched detector -> NMS stage -> postprocess)
  on loopback, a bounded number of JPEG requests at concurrency 1, 8 and 32 (aiohttp): throughput,
  p50/p99 latency, the mean batch the detector ran, the ratio to the in-process limit;
- the NMS stage's own cost per request (p50 of its ``Server-Timing`` entry), separately.
Writes ``benchmarks/results/serve_load.json``.

    .venv/bin/python -m benchmarks.serve_load [--arch ssdlite_mobilenet_v3] [--size 128] [--requests 16]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def _jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def in_process(arch: str, size: int, threads: int, batch_sizes: list[int], images: int) -> dict:
    """Images/s of candidates + NMS called directly, per batch size (same model, same thread count)."""
    import torch

    from vision.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(arch, 3).eval()
    x = [torch.rand(3, size, size) for _ in range(max(batch_sizes))]
    rates = {}
    with torch.inference_mode():
        model.candidates(x[:1])  # warm-up
        for b in batch_sizes:
            n_batches = max(1, images // b)
            start = time.perf_counter()
            for _ in range(n_batches):
                [c.postprocess(0.5, 0.05, 100) for c in model.candidates(x[:b])]
            rates[b] = n_batches * b / (time.perf_counter() - start)
            print(f"  in-process batch {b:>2}: {rates[b]:.2f} images/s", flush=True)
    return rates


async def _load(url: str, bodies: list[bytes], concurrency: int, n: int) -> dict:
    import aiohttp

    latencies, nms_ms, model_ms, codes = [], [], [], {}
    counter = iter(range(n))
    timing = re.compile(r"(\w+);dur=([\d.]+)")

    async def worker(session):
        for i in counter:
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/detect", data=bodies[i % len(bodies)],
                                    headers={"content-type": "image/jpeg"}) as r:
                await r.read()
                codes[r.status] = codes.get(r.status, 0) + 1
                if r.status == 200:
                    latencies.append(time.perf_counter() - t0)
                    parts = dict(timing.findall(r.headers.get("server-timing", "")))
                    nms_ms.append(float(parts.get("nms", "nan")))
                    model_ms.append(float(parts.get("model", "nan")))

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {"concurrency": concurrency, "requests": n, "status": codes, "seconds": round(wall, 2),
            "throughput": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "nms_p50_ms": float(np.nanpercentile(nms_ms, 50)),
            "model_p50_ms": float(np.nanpercentile(model_ms, 50))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ssdlite_mobilenet_v3", help="registry detector (random weights)")
    p.add_argument("--size", type=int, default=128, help="side of the JPEGs sent and of the model input")
    p.add_argument("--requests", type=int, default=16, help="requests per unit of concurrency (at least 16)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-batch", type=int, default=8, help="the detector's @serve.batch max_batch_size")
    p.add_argument("--detector-cpus", type=int, default=1, help="CPUs (= torch threads) of the detector replica")
    p.add_argument("--port", type=int, default=8471)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray

    from pipelines.serve import deploy, shutdown

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    serve_args = {
        "models": [{"name": "det", "task": "detection", "arch": args.arch, "num_classes": 3, "random_weights": True,
                    "image_size": args.size,
                    "batching": {"max_batch_size": args.max_batch, "batch_wait_timeout_s": 0.01},
                    "model": {"num_cpus": args.detector_cpus, "max_ongoing_requests": max(args.max_batch, 32)}}],
        "nms_stage": {"num_cpus": 0.1}, "preprocess": {"num_cpus": 0.2}, "postprocess": {"num_cpus": 0.1},
        "ingress": {"num_cpus": 0.1},
    }
    rows = []
    try:
        url = deploy(serve_args, port=args.port)
        from ray import serve

        detector = serve.get_deployment_handle("Detector_det", app_name="visionflow")
        # The in-process limit runs with the replica's own torch thread count, while the graph is idle.
        threads = detector.describe.remote().result()["torch_threads"]
        print(f"in-process limit: {args.arch}, {args.size}px, {threads} thread(s) like the replica", flush=True)
        rates = in_process(args.arch, args.size, threads, [1, 2, 4, 8, 16], images=32)
        best_batch, limit = max(rates.items(), key=lambda kv: kv[1])
        bodies = _jpegs(16, args.size)
        asyncio.run(_load(url, bodies, 4, 8))  # warm-up: every stage has run once
        for c in levels:
            before = len(detector.recent_batch_sizes.remote().result())
            row = asyncio.run(_load(url, bodies, c, max(16, args.requests * c // 4 if c > 1 else args.requests)))
            sizes = detector.recent_batch_sizes.remote().result()[before:]
            row["mean_batch"] = float(np.mean(sizes)) if sizes else 0.0
            row["vs_in_process"] = row["throughput"] / limit
            rows.append(row)
            print(f"  serve concurrency {c:>2}: {row['throughput']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, "
                  f"p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}", flush=True)
    finally:
        shutdown()
        ray.shutdown()

    by_c = {r["concurrency"]: r for r in rows}
    summary = {
        "arch": args.arch, "size": args.size, "detector_cpus": args.detector_cpus, "torch_threads": threads,
        "max_batch_size": args.max_batch,
        "in_process_images_per_s": {str(k): v for k, v in rates.items()},
        "in_process_limit": limit, "in_process_best_batch": best_batch,
        "serve": rows,
        "ratio_at_max_concurrency": by_c[max(by_c)]["vs_in_process"],
        "batching_gain": by_c[max(by_c)]["throughput"] / by_c[min(by_c)]["throughput"],
        "nms_stage_p50_ms": float(np.median([r["nms_p50_ms"] for r in rows])),
        "cpu_count": os.cpu_count(),
        "note": "shared 2-core machine: other processes load the CPU too",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(summary, indent=2))

    print(f"\n{'mode':<22}{'req/s':>9}{'x limit':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'NMS p50 ms':>12}")
    print(f"{'in-process (batch ' + str(best_batch) + ')':<22}{limit:>9.2f}{1.0:>9.2f}{'-':>9}{'-':>9}{best_batch:>7}{'-':>12}")
    for r in rows:
        print(f"{'serve, concurrency ' + str(r['concurrency']):<22}{r['throughput']:>9.2f}{r['vs_in_process']:>9.2f}"
              f"{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['mean_batch']:>7.1f}{r['nms_p50_ms']:>12.2f}")
    print(f"throughput at concurrency {max(by_c)} / in-process limit: {summary['ratio_at_max_concurrency']:.2f} "
          f"(target >= 0.7); concurrency {max(by_c)} / concurrency {min(by_c)}: {summary['batching_gain']:.2f}x")
    print(f"wrote {RESULTS / 'serve_load.json'}")


if __name__ == "__main__":
    main()
