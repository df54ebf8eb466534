"""COCO -> Ray Dataset -> validated Parquet shards + ``_manifest.json``; and loading them back."""
from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines.data.coco_index import build_index
from pipelines.data.decode import decode_batch
from pipelines.data.fs import join, read_bytes, resolve
from pipelines.data.schema import QUARANTINE, SHARD_SCHEMA
from pipelines.data.shard_sink import ShardSink

log = logging.getLogger(__name__)
MANIFEST = "_manifest.json"
# Images per decode batch: small enough that a block of encoded images stays a few MiB.
DECODE_BATCH = 32


def _decoded(annotations, images, *, num_cpus: float = 1.0):
    """(dataset of decoded rows incl. the transient ``_quarantine`` column, CocoIndex)."""
    index = build_index(annotations, chunk_images=_chunk_size(annotations))
    fs, root = resolve(images)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"image directory not found: {images}")
    if not index.tables:
        return None, index
    meta = ray.data.from_arrow(index.tables)
    index.tables = []  # the blocks now live in the object store
    ds = meta.map_batches(decode_batch, batch_format="pyarrow", batch_size=DECODE_BATCH,
                          fn_kwargs={"images_root": root, "filesystem": fs}, num_cpus=num_cpus)
    return ds, index


def _chunk_size(annotations) -> int:
    # Small files still get a few blocks so the decode runs in parallel; big ones get 256 images a block.
    fs, path = resolve(annotations)
    size = fs.get_file_info(path).size or 0
    return 256 if size > 4 << 20 else 16


def read_coco(annotations, images, *, num_cpus: float = 1.0) -> ray.data.Dataset:
    """A COCO split as a Ray Dataset, one row per usable image (schema: DESIGN.md "Dataset rows").

    Takes the annotation JSON and the image directory (local paths or URIs pyarrow understands, such
    as ``s3://``). The JSON is parsed on the driver; images are read and checked in Ray tasks.
    Quarantined images and dropped annotations are left out (``ingest`` records them in the manifest).
    """
    ds, index = _decoded(annotations, images, num_cpus=num_cpus)
    if index.dropped or index.quarantined:
        log.warning("%s: %d annotations dropped, %d images quarantined before decoding; "
                    "run `visionflow ingest` for the full report", annotations, len(index.dropped),
                    len(index.quarantined))
    if ds is None:
        return ray.data.from_arrow(SHARD_SCHEMA.empty_table())

    def keep_good(batch):
        return batch.filter(pc.is_null(batch[QUARANTINE])).select(SHARD_SCHEMA.names)

    return ds.map_batches(keep_good, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def ingest(annotations, images, out, *, num_cpus: float = 1.0) -> dict:
    """Validate one COCO split and write it as Parquet shards under ``out`` plus ``out/_manifest.json``.

    Takes the annotation JSON, the image directory and the output directory (local or URI). Returns
    the manifest: ``num_images``, ``num_instances``, ``categories`` ([{"id", "name", "label"}]),
    ``quarantined`` ([{"file_name", "image_id", "reason"}]), ``dropped``
    ([{"annotation_id", "image_id", "reason"}]), ``num_clipped_boxes``, ``converted_to_rgb``,
    ``shards``, ``annotations``, ``images``. Shards of an earlier ingest into ``out`` are replaced.
    """
    out_fs, out_root = resolve(out)
    info = out_fs.get_file_info(out_root)
    if info.type == pafs.FileType.File:
        raise NotADirectoryError(f"--out must be a directory, but {out} is a file")
    ds, index = _decoded(annotations, images, num_cpus=num_cpus)
    out_fs.create_dir(out_root, recursive=True)
    for old in out_fs.get_file_info(pafs.FileSelector(out_root)):
        name = old.path.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet") or name == MANIFEST:
            out_fs.delete_file(old.path)
    summary = {"files": [], "num_images": 0, "num_instances": 0, "quarantined": [], "converted": {}}
    if ds is not None:
        sink = ShardSink(out_fs, out_root)
        ds.write_datasink(sink)
        summary = sink.summary
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
        "annotations": os.fspath(annotations),
        "images": os.fspath(images),
    }
    with out_fs.open_output_stream(join(out_root, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return manifest


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


def load_split(data_dir, split: str) -> tuple[ray.data.Dataset, dict]:
    """``(dataset, manifest)`` of ``data_dir/split`` (``split`` is e.g. "train" or "val")."""
    fs, root = resolve(data_dir)
    split_root = join(root, split)
    if fs.get_file_info(split_root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no split {split!r} under {data_dir}: expected {data_dir}/{split}/ "
                                "written by `visionflow ingest`")
    manifest = _split_manifest(data_dir, split, split_root)
    if not manifest.get("shards"):
        return ray.data.from_arrow(SHARD_SCHEMA.empty_table()), manifest
    paths = [join(split_root, s) for s in manifest["shards"]]
    # One read task per shard, from the manifest's list. read_parquet would list the files again every
    # epoch (seconds) and pack small shards into one read task, so the augmentation fused after it would
    # run as a single task on one CPU.
    shards = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    return shards.map_batches(_read_shards, batch_format="pyarrow", batch_size=1,
                              fn_kwargs={"filesystem": fs}), manifest


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


def _read_shards(batch, filesystem):
    return pa.concat_tables([pq.read_table(p, filesystem=filesystem, schema=SHARD_SCHEMA)
                             for p in batch["path"].to_pylist()])
