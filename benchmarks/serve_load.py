"""Serving under load: the deployed detection graph over HTTP against the same model called in-process.

In one run:
- ``in_process``: the detector's ``candidates`` + per-class NMS called directly on ready tensors at
  batch sizes 1..16 (two interleaved passes of 32 images each, before the Serve runs and again after
  them; a size's rate is the harmonic mean of the two), with the Serve replica's torch thread count (read
  from it; the graph idles meanwhile); the best rate is the limit;
- ``serve``: the Serve graph (ingress -> preprocess -> batched detector -> NMS stage -> postprocess)
  on loopback, behind HAProxy (``--proxy python``: Serve's Python proxy), a bounded number of JPEG requests
  at concurrency 1, 8 and 32 (aiohttp): throughput, p50/p99 latency, the mean batch the detector ran, the
  ratio to the in-process limit;
- the NMS stage's own cost per request (p50 of its ``Server-Timing`` entry), separately;
- where a lone request's time goes (concurrency 1, from ``Server-Timing``): the HTTP hop (client ->
  proxy -> Ingress and back: latency less the Ingress's ``total``), the two handle hops inside the graph
  (Ingress -> detector -> NMS stage: ``total`` less preprocess, model, NMS and postprocess) and the
  stages' own work; and the cost of one hop with no work on either side: ``GET /healthz`` (HTTP hop)
  and an empty call of the NMS stage's handle from the driver (handle hop), p50 of ``--probes`` each;
- the CPU every process used during each concurrency's run (``benchmarks.process_cpu``), by role: each
  deployment's replica, the HTTP proxy, the client (this process) and the rest ("other": Ray's daemons,
  the Serve controller), in cores and in ms a request: which process limits the graph;
- with ``--hostile``: a segmentation model joins the graph and, at ``--hostile-concurrency`` (32), the
  same good requests run twice: alone (clean), then mixed with hostile ones (10% bad: not an image,
  truncated, wrong type, parameters out of range; 5% big: a 4096 x 4096 image to /v1/segment asking for
  every mask). It reports every status per kind, the 5xx other than 503 (must be 0) and the good
  requests' throughput against the clean run (target >= 0.8x).
Writes ``benchmarks/results/serve_load.json`` (``--out`` elsewhere, e.g. for a smoke run).

    .venv/bin/python -m benchmarks.serve_load [--arch ssdlite_mobilenet_v3] [--size 128] [--requests 16]
    .venv/bin/python -m benchmarks.serve_load --hostile [--hostile-requests 128]
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

from benchmarks import process_cpu, provenance

RESULTS = Path(__file__).parent / "results"


def _ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (no request of the baseline answered)."""
    return a / b if b else float("nan")


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


def in_process(arch: str, size: int, threads: int, batch_sizes: list[int], images: int, rounds: int = 3) -> dict:
    """Images/s of candidates + NMS called directly, per batch size (same model, same thread count): the
    mean over ``rounds`` interleaved passes of about ``images`` images per size."""
    import torch

    from vision.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(arch, 3).eval()
    x = [torch.rand(3, size, size) for _ in range(max(batch_sizes))]
    seconds, done = {b: 0.0 for b in batch_sizes}, {b: 0 for b in batch_sizes}
    with torch.inference_mode():
        for b in batch_sizes:
            model.candidates(x[:b])  # warm-up at each size
        for _ in range(rounds):  # interleaved: a slow moment of the machine hits every size, not one
            for b in batch_sizes:
                n_batches = max(1, images // b)
                start = time.perf_counter()
                for _ in range(n_batches):
                    [c.postprocess(0.5, 0.05, 100) for c in model.candidates(x[:b])]
                seconds[b] += time.perf_counter() - start
                done[b] += n_batches * b
    rates = {b: done[b] / seconds[b] for b in batch_sizes}
    for b, r in rates.items():
        print(f"  in-process batch {b:>2}: {r:.2f} images/s ({done[b]} images in {rounds} rounds)", flush=True)
    return rates


def _big_jpeg(side: int = 4096) -> bytes:
    """A smooth side x side JPEG (small on the wire, side * side pixels once decoded)."""
    from PIL import Image

    yy, xx = np.mgrid[0:side, 0:side]
    arr = np.stack([xx * 255 // (side - 1), yy * 255 // (side - 1), (xx + yy) * 127 // (side - 1)], -1)
    arr[side // 4: side // 2, side // 3: side * 2 // 3] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def hostile_schedule(good: list[bytes], n_good: int, big: bytes | None) -> list[dict]:
    """``n_good`` good detect requests, and with ``big`` the hostile ones mixed in: per 20 requests, 2 bad
    (10%) and 1 big segment request (5%). Each item: ``kind``, ``path``, ``data``, ``ctype``, ``params``."""
    jpeg = good[0]
    bad = [(b"this is not an image", "image/jpeg", {}), (jpeg[: len(jpeg) // 3], "image/jpeg", {}),
           (jpeg, "text/plain", {}), (jpeg, "image/jpeg", {"score_threshold": "2"}),
           (jpeg, "image/jpeg", {"max_detections": "0"}), (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png", {})]
    out, g, i = [], 0, 0
    while g < n_good:
        slot = i % 20
        if big is not None and slot in (3, 13):
            data, ctype, params = bad[(i // 10) % len(bad)]
            out.append({"kind": "bad", "path": "/v1/detect", "data": data, "ctype": ctype, "params": params})
        elif big is not None and slot == 8:
            out.append({"kind": "big", "path": "/v1/segment", "data": big, "ctype": "image/jpeg",
                        "params": {"score_threshold": "0", "iou_threshold": "1", "max_detections": "100"}})
        else:
            out.append({"kind": "good", "path": "/v1/detect", "data": good[g % len(good)], "ctype": "image/jpeg",
                        "params": {}})
            g += 1
        i += 1
    return out


async def _mixed(url: str, schedule: list[dict], concurrency: int) -> dict:
    """Run ``schedule`` at ``concurrency``: statuses per kind, the good requests' throughput and latency."""
    import aiohttp

    statuses: dict[str, dict[int, int]] = {}
    good_lat: list[float] = []
    counter = iter(schedule)

    async def worker(session):
        for item in counter:
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}{item['path']}", data=item["data"], params=item["params"],
                                        headers={"content-type": item["ctype"]}) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status = 0  # connection dropped: counted, never hidden
            per = statuses.setdefault(item["kind"], {})
            per[status] = per.get(status, 0) + 1
            if item["kind"] == "good" and status == 200:
                good_lat.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(good_lat or [float("nan")]) * 1e3
    unexpected = sum(n for per in statuses.values() for code, n in per.items() if code >= 500 and code != 503)
    return {"concurrency": concurrency, "requests": len(schedule), "seconds": round(wall, 2),
            "status": {k: {str(c): n for c, n in sorted(v.items())} for k, v in sorted(statuses.items())},
            "good_ok": len(good_lat), "good_throughput": len(good_lat) / wall,
            "good_p50_ms": float(np.percentile(lat, 50)), "good_p99_ms": float(np.percentile(lat, 99)),
            "unexpected_5xx": unexpected, "dropped": sum(per.get(0, 0) for per in statuses.values())}


async def _load(url: str, bodies: list[bytes], concurrency: int, n: int) -> dict:
    import aiohttp

    latencies, codes = [], {}
    stages: dict[str, list[float]] = {k: [] for k in ("preprocess", "model", "nms", "postprocess", "total")}
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
                    for k, v in stages.items():
                        v.append(float(parts.get(k, "nan")))

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    if not len(lat):  # every request refused (a full queue at this concurrency): NaN, not a crash after minutes
        lat = np.array([np.nan])
    st = {k: np.array(v) if len(v) else np.array([np.nan]) for k, v in stages.items()}
    work = st["preprocess"] + st["model"] + st["nms"] + st["postprocess"]
    return {"concurrency": concurrency, "requests": n, "status": codes, "seconds": round(wall, 2),
            "throughput": len(latencies) / wall, "p50_ms": float(np.nanpercentile(lat, 50)),
            "p99_ms": float(np.nanpercentile(lat, 99)), "nms_p50_ms": float(np.nanpercentile(st["nms"], 50)),
            "model_p50_ms": float(np.nanpercentile(st["model"], 50)),
            # Per request, then the median: where a request's time went besides the model.
            "stages_p50_ms": {k: float(np.nanpercentile(v, 50)) for k, v in st.items()},
            "http_hop_p50_ms": float(np.nanpercentile(lat - st["total"], 50)),
            "handle_hops_p50_ms": float(np.nanpercentile(st["total"] - work, 50))}


def _cpu_row(seconds: dict[str, float], row: dict) -> dict:
    """CPU seconds by role during one load run -> cores (of the run's wall time) and ms a request, with the
    whole machine's total first ("all")."""
    n, wall = max(row["requests"], 1), max(row["seconds"], 1e-9)
    seconds = {"all": sum(seconds.values()), **seconds}
    return {k: {"cores": round(v / wall, 3), "ms_per_request": round(v / n * 1e3, 2)} for k, v in seconds.items()}


def probe_hops(url: str, nms_handle, n: int) -> dict:
    """p50 ms of one hop with no work on either side: ``GET /healthz`` (client -> proxy -> Ingress) and an
    empty call of the NMS stage (driver -> replica through a handle, its batcher included)."""
    import requests

    def p50(call) -> float:
        call()  # warm
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return float(np.percentile(times, 50) * 1e3)

    with requests.Session() as http:
        return {"healthz_p50_ms": p50(lambda: http.get(f"{url}/healthz", timeout=30).raise_for_status()),
                "empty_handle_call_p50_ms": p50(lambda: nms_handle.remote([]).result())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ssdlite_mobilenet_v3", help="registry detector (random weights)")
    p.add_argument("--size", type=int, default=128, help="side of the JPEGs sent and of the model input")
    p.add_argument("--requests", type=int, default=16, help="requests per unit of concurrency (at least 16)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-batch", type=int, default=8, help="the detector's batching.max_batch_size")
    p.add_argument("--calibrate", action="store_true",
                   help="the detector's replica calibrates its batch cap at start (batching.calibrate)")
    p.add_argument("--detector-cpus", type=int, default=1, help="CPUs (= torch threads) of the detector replica")
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--probes", type=int, default=50, help="no-work calls per hop probe")
    p.add_argument("--proxy", choices=("haproxy", "python"), default="haproxy",
                   help="Serve's HTTP ingress: HAProxy (a local cluster's default where installed) or its Python proxy")
    p.add_argument("--split-stages", action="store_true",
                   help="preprocess and postprocess as their own deployments (stages_in_ingress: false)")
    p.add_argument("--hostile", action="store_true",
                   help="also run the hostile mix (10%% bad, 5%% big segment requests) against a clean run")
    p.add_argument("--hostile-concurrency", type=int, default=32)
    p.add_argument("--hostile-requests", type=int, default=128, help="good requests in each of the two runs")
    p.add_argument("--out", default=str(RESULTS / "serve_load.json"),
                   help="where to write the results (a smoke run: somewhere outside benchmarks/results)")
    provenance.add_arguments(p)
    args = p.parse_args()
    start = provenance.begin(args)
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray

    from pipelines import ray_private
    from pipelines.ray_runtime import LOCAL, connect
    from pipelines.serve import deploy, shutdown

    if args.proxy == "haproxy" and not ray_private.serve_haproxy_env():
        p.error("--proxy haproxy: no HAProxy here (ray[serve] bundles one on Linux, where it runs); use --proxy python")
    os.environ[ray_private.HAPROXY_ENV] = "1" if args.proxy == "haproxy" else "0"  # the new cluster's Serve
    connect(LOCAL, num_cpus=max(4, os.cpu_count() or 1), dashboard=False, log_to_driver=False)
    serve_args = {
        "models": [{"name": "det", "task": "detection", "arch": args.arch, "num_classes": 3, "random_weights": True,
                    "image_size": args.size,
                    "batching": {"max_batch_size": args.max_batch, "calibrate": args.calibrate},
                    "model": {"num_cpus": args.detector_cpus, "max_ongoing_requests": max(args.max_batch, 32)}}],
        "nms_stage": {"num_cpus": 0.1}, "preprocess": {"num_cpus": 0.2}, "postprocess": {"num_cpus": 0.1},
        "ingress": {"num_cpus": 0.1}, "stages_in_ingress": not args.split_stages,
    }
    if args.hostile:
        serve_args["models"].append({
            "name": "seg", "task": "segmentation", "arch": "maskrcnn_resnet18_fpn", "num_classes": 3,
            "random_weights": True, "image_size": args.size,
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01},
            "model": {"num_cpus": 0.5, "max_ongoing_requests": 8}})
    rows, hostile = [], None
    try:
        url = deploy(serve_args, port=args.port)
        from ray import serve

        detector = serve.get_deployment_handle("Detector_det", app_name="visionflow")
        # The in-process limit runs with the replica's own torch thread count, while the graph is idle.
        described = detector.describe.remote().result()
        threads, cap = described["torch_threads"], described["batch_size_cap"]
        print(f"detector replica: batches capped at {cap} of {args.max_batch} (images/s by batch at its start: "
              f"{described['batch_rates'] or 'not calibrated'})", flush=True)
        print(f"in-process limit: {args.arch}, {args.size}px, {threads} thread(s) like the replica", flush=True)
        sweep = [1, 2, 4, 8, 16]
        first = in_process(args.arch, args.size, threads, sweep, images=32, rounds=2)
        bodies = _jpegs(16, args.size)
        asyncio.run(_load(url, bodies, 4, 8))  # warm-up: every stage has run once
        hops = probe_hops(url, serve.get_deployment_handle("NmsStage", app_name="visionflow"), args.probes)
        print(f"  one hop, no work: HTTP (GET /healthz) {hops['healthz_p50_ms']:.1f} ms, "
              f"handle (empty NMS call) {hops['empty_handle_call_p50_ms']:.1f} ms", flush=True)
        role = process_cpu.serve_role(os.getpid())
        for c in levels:
            before = len(detector.recent_batch_sizes.remote().result())
            cpu0 = process_cpu.snapshot()
            row = asyncio.run(_load(url, bodies, c, max(16, args.requests * c // 4 if c > 1 else args.requests)))
            row["cpu"] = _cpu_row(process_cpu.by_role(cpu0, process_cpu.snapshot(), role), row)
            sizes = detector.recent_batch_sizes.remote().result()[before:]
            row["mean_batch"] = float(np.mean(sizes)) if sizes else 0.0
            rows.append(row)
            print(f"  serve concurrency {c:>2}: {row['throughput']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, "
                  f"p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}", flush=True)
            print("    CPU (cores, ms a request): " + ", ".join(
                f"{k} {v['cores']:.2f} ({v['ms_per_request']:.1f})" for k, v in row["cpu"].items()), flush=True)
        # The limit brackets the Serve runs: sweeps before and after them (the machine's speed drifts by
        # 20-40% over minutes), the same images each, so each size's rate is their harmonic mean.
        print("in-process limit, again after the Serve runs", flush=True)
        second = in_process(args.arch, args.size, threads, sweep, images=32, rounds=2)
        rates = {b: 2 / (1 / first[b] + 1 / second[b]) for b in sweep}
        best_batch, limit = max(rates.items(), key=lambda kv: kv[1])
        for row in rows:
            row["vs_in_process"] = row["throughput"] / limit
        if args.hostile:
            c, n = args.hostile_concurrency, args.hostile_requests
            big = _big_jpeg()
            clean = asyncio.run(_mixed(url, hostile_schedule(bodies, n, None), c))
            mixed = asyncio.run(_mixed(url, hostile_schedule(bodies, n, big), c))
            hostile = {"clean": clean, "hostile": mixed,
                       "good_throughput_ratio": _ratio(mixed["good_throughput"], clean["good_throughput"]),
                       "unexpected_5xx": mixed["unexpected_5xx"] + clean["unexpected_5xx"]}
            for name, r in (("clean", clean), ("hostile", mixed)):
                print(f"  {name:<8} concurrency {c}: good {r['good_throughput']:.2f} req/s "
                      f"(p50 {r['good_p50_ms']:.0f} ms), statuses {r['status']}", flush=True)
    finally:
        shutdown()
        ray.shutdown()

    by_c = {r["concurrency"]: r for r in rows}
    summary = {
        "arch": args.arch, "size": args.size, "detector_cpus": args.detector_cpus, "torch_threads": threads,
        "stages_in_ingress": not args.split_stages, "proxy": args.proxy,
        "max_batch_size": args.max_batch, "calibrate": args.calibrate,
        # The replica's own calibration at start: the batch cap it chose and the images/s it measured.
        "batch_size_cap": cap, "replica_batch_rates": described["batch_rates"],
        "in_process_images_per_s": {str(k): v for k, v in rates.items()},
        "in_process_before_after": {str(k): [first[k], second[k]] for k in sweep},
        "in_process_limit": limit, "in_process_best_batch": best_batch,
        "serve": rows,
        "ratio_at_max_concurrency": by_c[max(by_c)]["vs_in_process"],
        "batching_gain": _ratio(by_c[max(by_c)]["throughput"], by_c[min(by_c)]["throughput"]),
        "nms_stage_p50_ms": float(np.median([r["nms_p50_ms"] for r in rows])),
        # What the graph adds to a lone request: its p50 latency less the model's own p50.
        "overhead_at_lowest_concurrency_ms": by_c[min(by_c)]["p50_ms"] - by_c[min(by_c)]["model_p50_ms"],
        # ... split: the HTTP hop, the two handle hops, the stages' work besides the model (p50s of a lone request).
        "lone_request_ms": {"http_hop": by_c[min(by_c)]["http_hop_p50_ms"],
                            "handle_hops": by_c[min(by_c)]["handle_hops_p50_ms"],
                            **{k: v for k, v in by_c[min(by_c)]["stages_p50_ms"].items() if k != "total"}},
        "hop_without_work_ms": hops,
        # Where the machine's CPU went at the highest concurrency: the detector replica's share against the rest.
        "cpu_at_max_concurrency": by_c[max(by_c)]["cpu"],
        "cpu_count": os.cpu_count(),
        "note": "shared 2-core machine: other processes load the CPU too",
    }
    if hostile is not None:
        summary["hostile"] = hostile
    out = Path(args.out)
    written = provenance.write(out, summary, start)

    print(f"\n{'mode':<22}{'req/s':>9}{'x limit':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'NMS p50 ms':>12}")
    print(f"{'in-process (batch ' + str(best_batch) + ')':<22}{limit:>9.2f}{1.0:>9.2f}{'-':>9}{'-':>9}{best_batch:>7}{'-':>12}")
    for r in rows:
        print(f"{'serve, concurrency ' + str(r['concurrency']):<22}{r['throughput']:>9.2f}{r['vs_in_process']:>9.2f}"
              f"{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['mean_batch']:>7.1f}{r['nms_p50_ms']:>12.2f}")
    print(f"throughput at concurrency {max(by_c)} / in-process limit: {summary['ratio_at_max_concurrency']:.2f} "
          f"(target >= 1.0); concurrency {max(by_c)} / concurrency {min(by_c)}: {summary['batching_gain']:.2f}x; "
          f"graph overhead at concurrency {min(by_c)}: {summary['overhead_at_lowest_concurrency_ms']:.0f} ms")
    lone = summary["lone_request_ms"]
    print(f"a lone request (p50 ms): " + ", ".join(f"{k} {v:.1f}" for k, v in lone.items())
          + f"; one hop without work: HTTP {hops['healthz_p50_ms']:.1f}, handle {hops['empty_handle_call_p50_ms']:.1f}")
    if hostile is not None:
        print(f"hostile mix at concurrency {args.hostile_concurrency}: good throughput "
              f"{hostile['good_throughput_ratio']:.2f}x the clean run (target >= 0.8); 5xx other than 503: "
              f"{hostile['unexpected_5xx']} (must be 0)")
    if written:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
