"""The images of decode tasks whose worker process died: decoded again one at a time, in isolation.

A native crash in a decoder (or a worker killed for memory) takes its whole Ray Data task down, and Ray
retries it a few times on the same images. ``ingest`` lets such a block fail (``max_errored_blocks``),
then hands its images here: each is decoded in its own task with ``max_retries=0``, so a crash costs
only the image that causes it, which is quarantined as ``decoder crashed``. The rest are written as one
more shard, through the same sink, without their bytes passing through the driver.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.data.decode import decode_batch
from pipelines.data.shard_sink import ShardSink, empty_summary

CRASHED = "decoder crashed"


def _decode_alone(meta: pa.Table, kwargs: dict):
    return True, decode_batch(meta, **kwargs)


def recover_crashed(meta_refs: list, image_ids: set, decode_kwargs: dict, fs, root: str, *,
                    num_cpus: float = 1.0) -> dict:
    """Decode the images ``image_ids`` (found in the metadata tables ``meta_refs``) one per task and
    write the good ones as shards under ``root``; returns the sink's summary, with every image whose
    task died quarantined as ``decoder crashed``. An ordinary exception in a task is raised."""
    wanted = pa.array(sorted(image_ids), pa.int64())
    rows = []
    for ref in meta_refs:
        table = ray.get(ref)
        table = table.filter(pc.is_in(table["image_id"], value_set=wanted))
        rows += [table.slice(i, 1) for i in range(table.num_rows)]
    task = ray.remote(_decode_alone).options(max_retries=0, num_returns=2, num_cpus=num_cpus)
    pending = [(row, *task.remote(row, decode_kwargs)) for row in rows]
    good, crashed = [], []
    for row, ok, decoded in pending:
        try:
            ray.get(ok)
        except ray.exceptions.RayTaskError:
            raise
        except ray.exceptions.RayError as e:  # the worker died: WorkerCrashedError, OutOfMemoryError, ...
            meta = row.to_pylist()[0]
            crashed.append({"file_name": meta["file_name"], "image_id": meta["image_id"],
                            "reason": f"{CRASHED}: its worker process died decoding it ({type(e).__name__})"})
            continue
        good.append(decoded)
    summary = empty_summary()
    if good:
        sink = ShardSink(fs, root)
        ray.data.from_arrow_refs(good).write_datasink(sink)
        summary = sink.summary or summary
    summary["quarantined"] += crashed
    summary["image_ids"] += [q["image_id"] for q in crashed]
    return summary
