"""COCO -> Ray Dataset -> validated Parquet shards + ``_manifest.json``; and loading them back."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines.data import split_commit
from pipelines.data.coco_index import CocoIndex, build_index
from pipelines.data.console import quiet_execution
from pipelines.data.crash_recovery import recover_crashed
from pipelines.data.decode import DEFAULT_MAX_PIXELS, decode_batch
from pipelines.data.image_files import DEFAULT_MAX_IMAGE_BYTES
from pipelines.data.schema import QUARANTINE, SHARD_SCHEMA
from pipelines.data.shard_sink import ShardSink, empty_summary, merge_summaries
from pipelines.data.split_commit import MANIFEST
from pipelines.ray_private import map_batches_with_retries
from pipelines.storage import join, read_bytes, resolve

log = logging.getLogger(__name__)
# Images per decode batch: small enough that a block of encoded images stays a few MiB.
DECODE_BATCH = 32
# Ray's retries of a decode task whose worker died (Ray Data's default is forever). After them the
# task's images are decoded one at a time (``recover_crashed``).
DECODE_RETRIES = 2


@dataclass
class _Plan:
    ds: ray.data.Dataset | None
    index: CocoIndex
    meta: list = field(default_factory=list)  # ObjectRefs of the per-image metadata tables
    image_ids: set = field(default_factory=set)
    decode_kwargs: dict = field(default_factory=dict)
    task_args: dict = field(default_factory=dict)


def _decoded(annotations, images, *, num_cpus: float = 1.0, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> _Plan:
    """The dataset of decoded rows (incl. the transient ``_quarantine`` column) and what made it."""
    if not (max_image_bytes >= 1 and max_pixels >= 1):
        raise ValueError(f"max_image_bytes and max_pixels must be positive, got {max_image_bytes} and {max_pixels}")
    index = build_index(annotations, chunk_images=_chunk_size(annotations))
    fs, root = resolve(images)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"image directory not found: {images}")
    plan = _Plan(None, index, decode_kwargs={"images_root": root, "filesystem": fs,
                                             "max_image_bytes": int(max_image_bytes), "max_pixels": int(max_pixels)},
                 task_args={"num_cpus": num_cpus, "max_retries": DECODE_RETRIES})
    if not index.tables:
        return plan
    for table in index.tables:
        plan.image_ids.update(table["image_id"].to_pylist())
    plan.meta = [ray.put(t) for t in index.tables]
    index.tables = []  # the blocks now live in the object store
    plan.ds = map_batches_with_retries(
        ray.data.from_arrow_refs(plan.meta), decode_batch, batch_format="pyarrow", batch_size=DECODE_BATCH,
        fn_kwargs=plan.decode_kwargs, **plan.task_args)
    return plan


def _chunk_size(annotations) -> int:
    # Small files still get a few blocks so the decode runs in parallel; big ones get 256 images a block.
    fs, path = resolve(annotations)
    size = fs.get_file_info(path).size or 0
    return 256 if size > 4 << 20 else 16


def read_coco(annotations, images, *, num_cpus: float = 1.0, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> ray.data.Dataset:
    """A COCO split as a Ray Dataset, one row per usable image (schema: docs/contracts.md, "Dataset schema").

    Takes the annotation JSON and the image directory (local paths or URIs pyarrow understands, such
    as ``s3://``). The JSON is parsed on the driver; images are read and checked in Ray tasks.
    Quarantined images and dropped annotations are left out (``ingest`` records them in the manifest).
    An image that kills its worker process fails the dataset after ``DECODE_RETRIES`` (``ingest``
    quarantines it instead).
    """
    plan = _decoded(annotations, images, num_cpus=num_cpus, max_image_bytes=max_image_bytes,
                    max_pixels=max_pixels)
    index = plan.index
    if index.dropped or index.quarantined:
        log.warning("%s: %d annotations dropped, %d images quarantined before decoding; "
                    "run `visionflow ingest` for the full report", annotations, len(index.dropped),
                    len(index.quarantined))
    if plan.ds is None:
        return ray.data.from_arrow(SHARD_SCHEMA.empty_table())

    def keep_good(batch):
        return batch.filter(pc.is_null(batch[QUARANTINE])).select(SHARD_SCHEMA.names)

    return map_batches_with_retries(plan.ds, keep_good, batch_format="pyarrow", batch_size=None,
                                    zero_copy_batch=True, **plan.task_args)


def ingest(annotations, images, out, *, num_cpus: float = 1.0, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
           max_pixels: int = DEFAULT_MAX_PIXELS, quiet: bool = False) -> dict:
    """Validate one COCO split and write it as Parquet shards under ``out`` plus ``out/_manifest.json``.

    Takes the annotation JSON, the image directory and the output directory (local or URI). Returns
    the manifest: ``num_images``, ``num_instances``, ``categories`` ([{"id", "name", "label"}]),
    ``quarantined`` ([{"file_name", "image_id", "reason"}]), ``dropped``
    ([{"annotation_id", "image_id", "reason"}]), ``num_clipped_boxes``, ``converted_to_rgb``,
    ``shards``, ``annotations``, ``images``. Shards of an earlier ingest into ``out`` are replaced only
    once the new ones are complete (``split_commit``): a run killed at any moment leaves the old split
    readable. Image files over ``max_image_bytes`` or ``max_pixels``, or outside ``images``, are
    quarantined; so is one whose decoding kills its worker process. ``quiet``: its executions run without
    Ray Data's progress bars (``quiet_execution``), for a caller that says how far it is itself.
    """
    out_fs, out_root = resolve(out)
    info = out_fs.get_file_info(out_root)
    if info.type == pafs.FileType.File:
        raise NotADirectoryError(f"--out must be a directory, but {out} is a file")
    plan = _decoded(annotations, images, num_cpus=num_cpus, max_image_bytes=max_image_bytes,
                    max_pixels=max_pixels)
    if quiet and plan.ds is not None:
        quiet_execution(plan.ds)
    stage = split_commit.begin(out_fs, out_root)
    try:
        summary = _write_shards(plan, out_fs, stage)
        index = plan.index
        manifest = {
            "num_images": summary["num_images"],
            "num_instances": summary["num_instances"],
            "categories": index.categories,
            "quarantined": sorted(index.quarantined + summary["quarantined"],
                                  key=lambda q: (str(q["image_id"]), str(q["file_name"]))),
            "dropped": index.dropped,
            "num_clipped_boxes": index.num_clipped,
            "converted_to_rgb": summary["converted"],
            "shards": summary["files"],
            "shard_nodes": summary.get("shard_nodes", {}),
            "annotations": os.fspath(annotations),
            "images": os.fspath(images),
        }
        split_commit.commit(out_fs, out_root, stage, manifest)
    finally:
        split_commit.abandon(out_fs, out_root, stage)
    return manifest


def _write_shards(plan: _Plan, fs, root: str) -> dict:
    """Decode and write every image of ``plan`` into shards under ``root``; the sink's summary."""
    if plan.ds is None:
        return empty_summary()
    # A block whose task still dies after Ray's retries is left out here, and its images are decoded
    # one at a time below: only the image that kills its worker is lost.
    plan.ds.context.max_errored_blocks = -1
    sink = ShardSink(fs, root)
    plan.ds.write_datasink(sink, ray_remote_args=plan.task_args)
    summary = sink.summary or empty_summary()
    missing = plan.image_ids - set(summary["image_ids"])
    if missing:
        log.warning("%d images were in decode tasks whose worker died; decoding them one at a time",
                    len(missing))
        merge_summaries(summary, recover_crashed(plan.meta, missing, plan.decode_kwargs, fs, root,
                                                 num_cpus=plan.task_args["num_cpus"]))
    return summary


def read_manifest(split_dir) -> dict:
    """The ``_manifest.json`` of an ingested split directory (local or URI)."""
    fs, root = resolve(split_dir)
    try:
        return json.loads(read_bytes(fs, join(root, MANIFEST)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{split_dir} has no {MANIFEST}: expected a split written by "
                                "`visionflow ingest`") from None


def _split_manifest(data_dir, split: str, split_root: str) -> dict:
    # A URI keeps its scheme for read_manifest; a local path is the resolved one.
    return read_manifest(join(os.fspath(data_dir), split) if "://" in os.fspath(data_dir) else split_root)


def load_split(data_dir, split: str, *, num_cpus: float = 1.0, max_images: int | None = None,
               shuffle_seed: int | None = None) -> tuple[ray.data.Dataset, dict]:
    """``(dataset, manifest)`` of ``data_dir/split`` (``split`` is e.g. "train" or "val"). ``num_cpus``: of
    each read task; give the augmentation's (``augment(num_cpus=...)``) so that Ray Data fuses the read into
    it (maps with other resources run as separate tasks, each block passing through the object store).
    ``max_images``: only the split's first that many images, in the manifest's shard order (the same ones
    on every call; shards past them are not read). ``shuffle_seed``: read the shards in an order drawn
    from it (``split_shards`` and ``read_shards`` do the two halves, for several orders of one split)."""
    shards, manifest, fs = split_shards(data_dir, split, max_images=max_images)
    return read_shards(shards, fs, num_cpus=num_cpus, shuffle_seed=shuffle_seed,
                       shards_per_task=shards_per_read_task(manifest, len(shards))), manifest


# A read task (with a view's augmentation fused into it) takes about this many images. Measured on 2 cores
# (docs/data.md): tasks of ~500 images beat tasks of one 31-image shard by 20-30% (fewer, larger blocks for
# the consumer), and one task for a whole 16-shard split of 4,000 images used one core. A small split stays
# one task: two made the quickstart's views start a second process each (its `make run` 8:21, data start
# 52 s against 28-36 s).
READ_TASK_ROWS = 512


def shards_per_read_task(manifest: dict, num_shards: int) -> int:
    """How many of ``num_shards`` shards (those being read of the split ``manifest`` describes) one read task
    takes: about ``READ_TASK_ROWS`` images of the split's average shard (all of them for a smaller split)."""
    listed = len(manifest.get("shards") or [])
    average = (manifest.get("num_images") or 0) / listed if listed else 0
    by_rows = max(1, round(READ_TASK_ROWS / average)) if average > 0 else 1
    return max(1, min(by_rows, num_shards))


def split_shards(data_dir, split: str, *, max_images: int | None = None) -> tuple[list[dict], dict, object]:
    """``(shards, manifest, filesystem)`` of ``data_dir/split``: ``[{"path", "rows"}]`` in the manifest's
    order, ``rows`` how many of the shard's first rows to read (None: all)."""
    fs, root = resolve(data_dir)
    split_root = join(root, split)
    if fs.get_file_info(split_root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no split {split!r} under {data_dir}: expected {data_dir}/{split}/ "
                                "written by `visionflow ingest`")
    manifest = _split_manifest(data_dir, split, split_root)
    paths = [join(split_root, s) for s in manifest.get("shards") or []]
    shards = ([{"path": p, "rows": None} for p in paths] if max_images is None
              else first_images(fs, paths, max_images))
    return shards, manifest, fs


def read_shards(shards: list[dict] | ray.data.Dataset, filesystem, *, num_cpus: float = 1.0,
                shuffle_seed: int | None = None, shards_per_task: int = 1) -> ray.data.Dataset:
    """The lazy dataset of ``split_shards``' shards, in their order or in one drawn from ``shuffle_seed``
    (Ray Data's ``randomize_block_order`` over the shards' one-item blocks, before anything is read).
    ``shards``: the list, or ``shard_items(list)`` made once for several reads of it (``from_items`` puts
    a block per shard into the object store: 90 epochs of 236 shards took about 18 s, one 0.2 s).
    ``shards_per_task``: how many shards each read task takes, in that order (``shards_per_read_task``)."""
    if isinstance(shards, list):
        if not shards:
            return ray.data.from_arrow(SHARD_SCHEMA.empty_table())
        shards = shard_items(shards)
    if shuffle_seed is not None:
        shards = shards.randomize_block_order(seed=shuffle_seed)
    # One block per shard, from the manifest's list. read_parquet would list the files again every epoch
    # (seconds) and pack small shards into one read task, so the augmentation fused after it would run as
    # a single task on one CPU. Fused with an augmentation (same num_cpus; the view takes whole blocks), a
    # task takes ``shards_per_task`` shards: Ray Data bundles a fused task's input by the larger batch size
    # of the two maps, counted in shards.
    return shards.map_batches(_read_shards, batch_format="pyarrow", batch_size=max(1, int(shards_per_task)),
                              fn_kwargs={"filesystem": filesystem}, num_cpus=num_cpus)


def shard_items(shards: list[dict]) -> ray.data.Dataset:
    """``split_shards``' (non-empty) list as a dataset of one-item blocks, for ``read_shards``."""
    return ray.data.from_items(shards, override_num_blocks=len(shards))


def read_split_table(data_dir, split: str, columns: list[str] | None = None) -> tuple[pa.Table, dict]:
    """``(table, manifest)`` of ``data_dir/split`` read into this process (no Ray): the shards in the
    manifest's order, ``columns`` only when given. For evaluation and benchmarks on small splits."""
    fs, root = resolve(data_dir)
    split_root = join(root, split)
    manifest = _split_manifest(data_dir, split, split_root)
    if not manifest.get("shards"):
        empty = SHARD_SCHEMA.empty_table()
        return (empty.select(columns) if columns else empty), manifest
    paths = [join(split_root, s) for s in manifest["shards"]]
    return pq.read_table(paths, columns=columns, filesystem=fs, schema=SHARD_SCHEMA), manifest


def first_images(fs, paths: list[str], max_images: int) -> list[dict]:
    """``[{"path", "rows"}]``: the shards that hold the first ``max_images`` rows of ``paths`` (in order;
    row counts from the Parquet footers) and, for the last one, how many of its rows (None: all)."""
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    items, left = [], max_images
    for p in paths:
        if left <= 0:
            break
        rows = pq.read_metadata(p, filesystem=fs).num_rows
        items.append({"path": p, "rows": None if rows <= left else left})
        left -= rows
    return items


def _read_shards(batch, filesystem):
    rows = batch["rows"].to_pylist()
    tables = [pq.read_table(p, filesystem=filesystem, schema=SHARD_SCHEMA) for p in batch["path"].to_pylist()]
    return pa.concat_tables([t if n is None else t.slice(0, n) for t, n in zip(tables, rows)])
