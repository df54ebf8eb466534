"""Decode + flip + scale + batch throughput: Ray Data (``pipelines.data``) against a DataLoader baseline.

One run measures, on the same images:
- ``ray_data``: ``load_split`` -> ``augment(task="detection", train=True)`` -> ``iter_batches`` +
  ``collate_detection`` (images from the Parquet shards);
- ``dataloader``: ``torchvision.datasets.CocoDetection`` (wrapped for transforms v2) + ``DataLoader(num_workers=2)``
  with the same transforms (flip, scale jitter, sanitize, to float), images from the JPEG files (decoded by
  PIL, CocoDetection's loader);
- ``ray_data_read_only``: ``load_split`` -> ``iter_batches`` with nothing done to the rows, in Arrow batches:
  Ray Data's execution and hand-off with no work in them (an upper bound, lighter than the views in more
  than their work: ``ray_read_throughput``);
- ``ray_data_<M>mib`` (with ``--also-block-mib M``): ``ray_data`` with the views' blocks capped at M MiB
  instead of ``VIEW_BLOCK_BYTES``, alternated in the same rounds (a smaller cap hands the first block over
  sooner and puts more blocks through the object store);
- ``views_in_one_process``: the views' functions (``augment_table`` + ``collate_detection``) in this process on
  one core, without Ray: what the work itself costs;
- ``decode_ceiling``: JPEG decoding alone, with the views' decoder (TorchCodec's, the faster of the two), in
  a process pool over both cores (the limit either can reach).
Reported as images/s and ratios against the DataLoader, and each round's seconds to the first batch.
Writes ``benchmarks/results/data_throughput.json``: one entry per image count (``--images``), each its own run.

``--ingest-memory N`` instead measures the peak memory of writing and ingesting an N-image synth set:
the driver's peak RSS (``ru_maxrss``), the peak summed RSS of this cluster's Ray processes (raylet, GCS,
workers; shared object-store pages count in each process that touches them, so it over-counts) and the
peak object-store (plasma) use, sampled every 0.5 s.

    .venv/bin/python -m benchmarks.data_throughput [--images 4000] [--size 128] [--batch 16] [--repeat 3] [--cpus 4]
    .venv/bin/python -m benchmarks.data_throughput --images 4000 --decoder pil   # the views on PIL, kept apart
    .venv/bin/python -m benchmarks.data_throughput --ingest-memory 10000
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results"


def _decoder_process(ready) -> None:
    """Each ceiling process: the views' decoder loaded (``decoder_name`` loads TorchCodec's native library;
    importing ``vision.transforms`` alone does not) and one torch thread; then it waits until every process
    of the pool has done the same, so no import runs while the others are timed."""
    import torch

    from vision.transforms import decoder_name

    decoder_name()
    torch.set_num_threads(1)
    ready.wait()


def _decode(data: bytes) -> int:
    from vision.transforms import decode_image

    return decode_image(data).shape[-1]


def decode_ceiling(files: list[Path], processes: int) -> float:
    """Images/s of decoding alone (the task views' decoder) over ``processes`` processes (bytes read
    beforehand)."""
    blobs = [f.read_bytes() for f in files]
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes, initializer=_decoder_process, initargs=(ctx.Barrier(processes),)) as pool:
        pool.map(_decode, blobs[:processes * 2])  # warm the workers up
        start = time.perf_counter()
        pool.map(_decode, blobs, chunksize=16)
        return len(blobs) / (time.perf_counter() - start)


class _Transformed:
    """A map-style dataset with a joint (image, target) transform applied on access."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.transform(*self.dataset[i])


def _collate(batch):
    return tuple(zip(*batch))


class _WithEmptyTargets:
    """Background-only images come out of the v2 wrapper without boxes; give them empty ones."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, target):
        import torch
        from torchvision import tv_tensors

        if "boxes" not in target:
            w, h = image.size
            target = {**target, "boxes": tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY",
                                                                  canvas_size=(h, w)),
                      "labels": torch.zeros((0,), dtype=torch.int64)}
        return self.transform(image, target)


def dataloader_throughput(root: Path, size: int, batch: int, workers: int) -> tuple[float, float]:
    """(images/s, seconds to the first batch) of CocoDetection + DataLoader(num_workers) with flip, scale
    jitter, sanitize, to float."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2

    from vision.transforms import SCALE_RANGE

    tf = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(),
                     v2.ScaleJitter(target_size=(size, size), scale_range=SCALE_RANGE, antialias=True),
                     v2.SanitizeBoundingBoxes(), v2.ToDtype(torch.float32, scale=True)])
    ds = wrap_dataset_for_transforms_v2(
        CocoDetection(str(root / "train"), str(root / "annotations" / "instances_train.json")),
        target_keys=("image_id", "boxes", "labels"))
    ds = _Transformed(ds, _WithEmptyTargets(tf))
    # Forked workers, as Linux's default gives a user's training (the process this runs in was spawned, and
    # a spawned process's default is spawn: workers that import torch again before their first batch).
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=_collate,
                        persistent_workers=False, multiprocessing_context="fork" if workers else None)
    start, n, first = time.perf_counter(), 0, None
    for images, _targets in loader:
        first = time.perf_counter() - start if first is None else first
        n += len(images)
    return n / (time.perf_counter() - start), first


def ray_throughput(data_dir: Path, size: int, batch: int, epoch: int,
                   block_mib: float | None = None) -> tuple[float, float]:
    """(images/s, seconds to the first batch) of load_split -> augment(detection, train) -> iter_batches ->
    collate_detection; ``block_mib``: the view's block cap in MiB instead of ``VIEW_BLOCK_BYTES``."""
    from pipelines.data import augment, collate_detection, load_split

    start, n, first = time.perf_counter(), 0, None
    ds, _ = load_split(data_dir, "train")
    view = augment(ds, task="detection", size=size, train=True, seed=0, epoch=epoch)
    if block_mib is not None:
        view.context.target_max_block_size = int(block_mib * 2**20)
    for b in view.iter_batches(batch_size=batch, batch_format="numpy"):
        images, _targets = collate_detection(b)
        first = time.perf_counter() - start if first is None else first
        n += len(images)
    return n / (time.perf_counter() - start), first


def ray_read_throughput(data_dir: Path, batch: int) -> tuple[float, float]:
    """(images/s, seconds to the first batch) of ``load_split`` -> ``iter_batches`` alone, batches of the same
    size as ``ray_throughput``'s left as Arrow tables: Ray Data's execution and hand-off with no work in them.
    Lighter than the views in more than the work: the rows are the stored ones (encoded images, a fifth of
    the decoded bytes through the object store), no 4 MiB block cap, no numpy batches and no
    ``collate_detection``; the tasks take as many shards as a view's (``ingest.shards_per_read_task``). An
    upper bound for Ray Data on this machine, not the views' own ceiling."""
    from pipelines.data import load_split

    start, n, first = time.perf_counter(), 0, None
    ds, _ = load_split(data_dir, "train")
    for b in ds.iter_batches(batch_size=batch, batch_format="pyarrow"):
        first = time.perf_counter() - start if first is None else first
        n += b.num_rows
    return n / (time.perf_counter() - start), first


def one_process_throughput(data_dir: Path, size: int, epoch: int) -> float:
    """Images/s of the views' own work in this process on one core, without Ray: the split's rows read into
    memory first (not timed), then ``augment_table`` (decode, flip, scale jitter, sanitize) over batches of
    ``AUGMENT_BATCH`` rows and ``collate_detection``, as a view's task and the trainer do."""
    import torch

    from pipelines.data import augment_table, collate_detection, read_split_table
    from pipelines.data.views import AUGMENT_BATCH

    from vision.transforms import decoder_name

    table, _ = read_split_table(data_dir, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's own threads; the numpy and decoder calls are single-threaded here
    try:
        decoder_name()  # TorchCodec's native library loaded, and one batch done, before the clock starts
        augment_table(table.slice(0, AUGMENT_BATCH), task="detection", size=size, train=True, seed=0, epoch=epoch)
        start = time.perf_counter()
        for i in range(0, table.num_rows, AUGMENT_BATCH):
            collate_detection(augment_table(table.slice(i, AUGMENT_BATCH), task="detection", size=size, train=True,
                                            seed=0, epoch=epoch))
        return table.num_rows / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def throughput(args) -> dict:
    import ray

    from pipelines.data import ingest
    from pipelines.ray_runtime import LOCAL, connect
    from pipelines.data.views import VIEW_BLOCK_BYTES
    from vision.data.synth import write_synth
    from vision.transforms import decoder_name

    work = Path(tempfile.mkdtemp(prefix="vf_bench_data_"))
    write_synth(work / "coco", images=args.images, size=args.size, seed=0, val_fraction=0.0)
    files = sorted((work / "coco" / "train").glob("*.jpg"))
    ceiling = {p: decode_ceiling(files, p) for p in (1, args.cpus)}  # before Ray takes the cores
    # The DataLoader forks its workers; forked from this process once it drives a Ray cluster, they carry
    # copies of the driver's Ray state (object references they release on exit, the connections' sockets),
    # and an execution started after such a fork could wait forever for its tasks. Its epochs run in a
    # process of their own, started before Ray, where the DataLoader forks as a user's training would.
    baseline = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
    try:
        baseline.submit(os.getpid).result()  # its process started now, before Ray
        connect(LOCAL, num_cpus=args.cpus, dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ingest(work / "coco" / "annotations" / "instances_train.json", work / "coco" / "train",
               work / "shards" / "train")
        sides = ("dataloader", "ray_data", "ray_data_read_only")
        other_block = f"ray_data_{args.also_block_mib:g}mib" if args.also_block_mib else None
        if other_block:
            sides += (other_block,)
        runs, first = {k: [] for k in sides}, {k: [] for k in sides}
        one_process = []
        measures = {"dataloader": lambda r: baseline.submit(dataloader_throughput, work / "coco", args.size,
                                                            args.batch, args.workers).result(),
                    "ray_data": lambda r: ray_throughput(work / "shards", args.size, args.batch, epoch=r),
                    "ray_data_read_only": lambda r: ray_read_throughput(work / "shards", args.batch)}
        if other_block:
            measures[other_block] = lambda r: ray_throughput(work / "shards", args.size, args.batch, epoch=r,
                                                             block_mib=args.also_block_mib)
        for r in range(args.repeat):
            # Alternated, so background load hits every side alike, and in turn first, so no side always
            # follows another (round 1 starts Ray Data's processes: its first Ray side pays for their imports).
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                rate, first_s = measures[side](r)
                runs[side].append(rate)
                first[side].append(first_s)
            one_process.append(one_process_throughput(work / "shards", args.size, epoch=r))
            print(f"round {r + 1}: " + ", ".join(f"{k} {runs[k][-1]:.1f} img/s (first batch {first[k][-1]:.2f}s)"
                                                 for k in sides)
                  + f", views in one process {one_process[-1]:.1f} img/s", flush=True)
    finally:
        baseline.shutdown(wait=False, cancel_futures=True)
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    best = {k: max(v) for k, v in runs.items()}
    runs["views_in_one_process"] = one_process
    return {
        "config": {"images": len(files), "size": args.size, "batch": args.batch, "cpus": args.cpus,
                   "dataloader_workers": args.workers, "repeat": args.repeat, "cores": os.cpu_count(),
                   "decoder": decoder_name(), "view_block_mib": VIEW_BLOCK_BYTES / 2**20,
                   **({"also_block_mib": args.also_block_mib} if other_block else {})},
        "images_per_s": {**best, "views_in_one_process": max(one_process), "decode_ceiling_1proc": ceiling[1],
                         f"decode_ceiling_{args.cpus}proc": ceiling[args.cpus]},
        "all_runs": runs,
        # Ray Data's first round starts its augmentation processes (each imports torch and torchvision);
        # later rounds reuse them. The DataLoader forks its workers every round, from its own process
        # (started before Ray).
        "first_batch_s": first,
        "ratio_ray_vs_dataloader": best["ray_data"] / best["dataloader"],
        # Ray Data moving the stored rows and nothing else, over the DataLoader: an upper bound of what Ray
        # Data reaches on this machine (lighter than the views in more than their work: ray_read_throughput).
        "ratio_ray_read_only_vs_dataloader": best["ray_data_read_only"] / best["dataloader"],
        "ray_fraction_of_decode_ceiling": best["ray_data"] / ceiling[args.cpus],
        "dataloader_fraction_of_decode_ceiling": best["dataloader"] / ceiling[args.cpus],
        **({f"ratio_{other_block}_vs_dataloader": best[other_block] / best["dataloader"],
            f"ratio_{other_block}_vs_ray_data": best[other_block] / best["ray_data"]} if other_block else {}),
    }


def _descendants_rss(pid: int) -> int:
    """Summed resident memory (bytes) of every process below ``pid``."""
    from pipelines import procfs

    return sum(procfs.rss_bytes(p) for p in procfs.children(pid))


def _plasma_mib(summary: str) -> float:
    m = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB", summary)
    return float(m.group(1)) if m else 0.0


def ingest_memory(args) -> dict:
    """Peak memory of a synth + ingest of ``args.ingest_memory`` images (see the module docstring)."""
    import ray
    from pipelines.data import ingest
    from pipelines.ray_private import object_store_summary
    from pipelines.ray_runtime import LOCAL, connect
    from vision.data.synth import write_synth

    # What the imports alone (torch, Ray, pyarrow) take, so the figures below can be read against it.
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    work = Path(tempfile.mkdtemp(prefix="vf_bench_mem_"))
    t0 = time.perf_counter()
    write_synth(work / "coco", images=args.ingest_memory, size=args.size, seed=0, val_fraction=0.0)
    synth_s = time.perf_counter() - t0
    synth_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    connect(LOCAL, num_cpus=args.cpus, dashboard=False, log_to_driver=False)
    gcs = ray.get_runtime_context().gcs_address
    peaks = {"plasma_mib": 0.0, "ray_rss_mib": 0.0}
    stop = threading.Event()
    me = os.getpid()

    def sample():
        while not stop.is_set():
            try:
                peaks["plasma_mib"] = max(peaks["plasma_mib"], _plasma_mib(
                    object_store_summary(gcs)))
                # This cluster's processes only (raylet, GCS, workers descend from this driver), not
                # those of other Ray clusters on the same machine.
                rss = _descendants_rss(me)
                peaks["ray_rss_mib"] = max(peaks["ray_rss_mib"], rss / 2**20)
            except Exception:  # noqa: BLE001 -- a missed sample only lowers the resolution
                pass
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        t0 = time.perf_counter()
        manifest = ingest(work / "coco" / "annotations" / "instances_train.json", work / "coco" / "train",
                          work / "shards")
        ingest_s = time.perf_counter() - t0
        image_bytes = sum(f.stat().st_size for f in (work / "coco" / "train").glob("*.jpg"))
    finally:
        stop.set()
        thread.join()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "config": {"images": args.ingest_memory, "size": args.size, "cpus": args.cpus},
        "imports_rss_mib": imports_rss, "synth_seconds": synth_s, "synth_peak_rss_mib": synth_rss,
        "ingest_seconds": ingest_s, "num_images": manifest["num_images"],
        "num_instances": manifest["num_instances"],
        "jpeg_bytes_mib": image_bytes / 2**20,
        "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ray_processes_peak_rss_mib": peaks["ray_rss_mib"],
        "object_store_peak_mib": peaks["plasma_mib"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cpus", type=int, default=4, help="Ray logical CPUs and decode-ceiling processes (default 4)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--decoder", choices=("auto", "pil"), default="auto",
                   help="the views' image decoder: auto (TorchCodec where it loads) or pil; a run on PIL is "
                        "kept in the results file apart ('N images, PIL')")
    p.add_argument("--also-block-mib", type=float, default=None, metavar="M",
                   help="also time the Ray Data side with its view blocks capped at M MiB, in the same rounds")
    p.add_argument("--ingest-memory", type=int, default=0, metavar="N",
                   help="instead: measure the peak memory of synth + ingest of N images")
    p.add_argument("--out", default=None, help="results file (default: benchmarks/results/data_throughput.json, or "
                                              "data_ingest_memory.json with --ingest-memory)")
    provenance.add_arguments(p)
    args = p.parse_args(argv)
    if args.decoder == "pil":  # before the cluster's workers and the ceiling's processes start
        from vision.transforms import DECODER_ENV

        os.environ[DECODER_ENV] = "pil"
    start = provenance.begin(args)
    if args.ingest_memory:
        result = ingest_memory(args)
        provenance.write_run(args.out or RESULTS / "data_ingest_memory.json", "data_ingest_memory",
                             f"{args.ingest_memory} images", result, start)
        print(f"{'synth + ingest of':<28}{result['num_images']} images ({result['jpeg_bytes_mib']:.0f} MiB of JPEG)")
        for k in ("imports_rss_mib", "synth_seconds", "synth_peak_rss_mib", "ingest_seconds",
                  "driver_peak_rss_mib", "ray_processes_peak_rss_mib", "object_store_peak_mib"):
            print(f"{k:<28}{result[k]:.1f}")
        return result
    result = throughput(args)
    key = (f"{args.images} images" + (", PIL" if result["config"]["decoder"] == "PIL" else "")
           + (f", views of {args.also_block_mib:g} MiB too" if args.also_block_mib else ""))
    provenance.write_run(args.out or RESULTS / "data_throughput.json", "data_throughput", key, result, start)
    print(f"\n{'pipeline':<28}{'images/s':>10}{'ratio':>8}")
    base = result["images_per_s"]["dataloader"]
    for k, v in result["images_per_s"].items():
        print(f"{k:<28}{v:>10.1f}{v / base:>8.2f}")
    print(f"ray_data / dataloader = {result['ratio_ray_vs_dataloader']:.2f} "
          f"({result['config']['images']} images of {args.size} px, shared {os.cpu_count()}-core box)")
    return result


if __name__ == "__main__":
    main()
