"""A Ray Data sink that writes good rows as Parquet shards and reports the quarantined ones.

Each write task streams its blocks into one Parquet file and returns a small summary (counts and the
quarantined items); ``on_write_complete`` runs on the driver and combines them into the manifest.
"""
from __future__ import annotations

import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink

from pipelines.storage import join
from pipelines.data.schema import CONVERTED, QUARANTINE, SHARD_SCHEMA


def empty_summary() -> dict:
    """What a sink reports: shard names, counts, quarantined items, conversion notes, and the ids of
    every image it saw (good or quarantined), by which ``ingest`` finds the images of tasks that died;
    ``shard_nodes``: ``{shard name: id of the Ray node whose task wrote it}``."""
    return {"files": [], "num_images": 0, "num_instances": 0, "quarantined": [], "converted": {}, "image_ids": [],
            "shard_nodes": {}}


def merge_summaries(total: dict, part: dict) -> dict:
    """Add ``part`` into ``total`` (both as from :func:`empty_summary`); returns ``total``."""
    for key in ("files", "quarantined", "image_ids"):
        total[key] += part[key]
    total["num_images"] += part["num_images"]
    total["num_instances"] += part["num_instances"]
    for k, v in part["converted"].items():
        total["converted"][k] = total["converted"].get(k, 0) + v
    total.setdefault("shard_nodes", {}).update(part.get("shard_nodes", {}))
    total["files"].sort()
    return total


class ShardSink(Datasink):
    """Writes ``part-*.parquet`` under ``root`` on ``filesystem``; ``self.summary`` holds the totals."""

    def __init__(self, filesystem, root: str):
        self.filesystem = filesystem
        self.root = root
        self.summary: dict | None = None

    def write(self, blocks: Iterable, ctx) -> dict:
        result = empty_summary()
        writer = None
        path = join(self.root, f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet")
        try:
            for block in blocks:
                table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
                result["image_ids"] += table["image_id"].to_pylist()
                bad = pc.is_valid(table[QUARANTINE])
                for row in table.filter(bad).select(["file_name", "image_id", QUARANTINE]).to_pylist():
                    result["quarantined"].append({"file_name": row["file_name"], "image_id": row["image_id"],
                                                  "reason": row[QUARANTINE]})
                for note in table[CONVERTED].drop_null().to_pylist():
                    result["converted"][note] = result["converted"].get(note, 0) + 1
                good = table.filter(pc.invert(bad)).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
                if good.num_rows == 0:
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(path, SHARD_SCHEMA, filesystem=self.filesystem)
                    result["files"].append(path.rsplit("/", 1)[-1])
                    # The decode is fused into this write task: the node that decoded the shard's images.
                    result["shard_nodes"][result["files"][-1]] = ray.get_runtime_context().get_node_id()
                writer.write_table(good, row_group_size=64)
                result["num_images"] += good.num_rows
                result["num_instances"] += int(pc.sum(pc.list_value_length(good["labels"])).as_py() or 0)
        finally:
            if writer is not None:
                writer.close()
        return result

    def on_write_complete(self, write_result) -> None:
        total = empty_summary()
        for r in write_result.write_returns:
            merge_summaries(total, r)
        self.summary = total
