"""Replacing an ingested split so that a kill at any moment leaves a readable one: the old, or the new.

The manifest is the commit point: ``_manifest.json`` only ever lists shards that exist, whole.

- Local filesystem: shards are written into a temporary folder inside it, ``<out>/.tmp-<id>`` (one filesystem
  with ``out`` whatever is mounted where: a sibling failed with EXDEV after the whole ingest where ``out`` was
  a mount point or a link to another disk; Arrow's readers skip dot-folders). At the end each new
  shard is renamed into ``out`` (new names never collide with the old: they carry a random id), then the
  new manifest replaces the old in one ``os.replace``, then the old shards and the sibling are deleted.
  Until that rename ``out`` is the old split, whole (the new shards beside it are listed nowhere); after
  it, the new one. No moment leaves ``out`` without a manifest that matches its files.
- Object stores (``s3://`` ...): shards are written into ``out`` next to the old ones (an object appears
  only once its upload completes), the manifest last, then the old shards are deleted.

A killed run leaves a ``.tmp-*`` folder (or, from earlier versions, a ``<out>.tmp-*`` sibling) or unlisted
shards in ``out``; the next ingest into ``out`` removes them before it starts. Only files named as ingest
names its shards (``part-NNNNN-<8 hex>.parquet``) are ever removed: other Parquet files in ``out`` (a Spark
job's ``part-00000-<uuid>.snappy.parquet``) are left alone. One ingest per ``out`` at a time.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid

import pyarrow.fs as pafs

from pipelines.storage import join, read_bytes

MANIFEST = "_manifest.json"
STAGE_MARK = ".tmp-"
SHARD_NAME = re.compile(r"part-\d{5}-[0-9a-f]{8}\.parquet")  # shard_sink's names


def _local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _listed_shards(fs: pafs.FileSystem, root: str) -> set[str]:
    try:
        return set(json.loads(read_bytes(fs, join(root, MANIFEST))).get("shards") or [])
    except (FileNotFoundError, IsADirectoryError, ValueError, AttributeError):
        return set()


def _remove_unlisted_shards(fs: pafs.FileSystem, root: str, keep: set[str]) -> None:
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = info.base_name
        if SHARD_NAME.fullmatch(name) and name not in keep:
            fs.delete_file(info.path)


def begin(fs: pafs.FileSystem, out_root: str) -> str:
    """Clear what killed runs left and return the directory to write the new shards into."""
    if not _local(fs):
        fs.create_dir(out_root, recursive=True)
        _remove_unlisted_shards(fs, out_root, _listed_shards(fs, out_root))
        return out_root
    leftovers = glob.glob(glob.escape(out_root) + STAGE_MARK + "*")  # siblings of earlier versions
    leftovers += glob.glob(os.path.join(glob.escape(out_root), STAGE_MARK + "*"))
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    if os.path.isdir(out_root):
        _remove_unlisted_shards(fs, out_root, _listed_shards(fs, out_root))
    stage = os.path.join(out_root, f"{STAGE_MARK}{uuid.uuid4().hex[:12]}")
    os.makedirs(stage)
    return stage


def commit(fs: pafs.FileSystem, out_root: str, stage: str, manifest: dict) -> None:
    """Make ``manifest`` (whose ``shards`` lie in ``stage``) the split at ``out_root``."""
    data = json.dumps(manifest, indent=1).encode()
    new = set(manifest["shards"])
    if stage == out_root:  # an object store: the shards are in place; the manifest is the commit
        with fs.open_output_stream(join(out_root, MANIFEST)) as f:
            f.write(data)
    else:
        os.makedirs(out_root, exist_ok=True)
        for name in sorted(new):
            os.replace(os.path.join(stage, name), os.path.join(out_root, name))
        staged = os.path.join(stage, MANIFEST)
        with open(staged, "wb") as f:
            f.write(data)
        os.replace(staged, os.path.join(out_root, MANIFEST))  # the commit: atomic on one filesystem
    _remove_unlisted_shards(fs, out_root, new)
    abandon(fs, out_root, stage)


def abandon(fs: pafs.FileSystem, out_root: str, stage: str) -> None:
    """Remove the temporary folder (after a commit, or when the run failed before it)."""
    if stage != out_root:
        shutil.rmtree(stage, ignore_errors=True)
