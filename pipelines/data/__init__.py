"""Ray Data for visionflow: COCO ingestion into Parquet shards, loading, augmentation, task views.

The augmentation names load on first use (PEP 562): a process that only unpickles a dataset plan (Ray
Data's split coordinator, a read task) imports what it runs, not torch and torchvision with it.
"""
from importlib import import_module

from pipelines.data.ingest import (ingest, load_split, read_coco, read_manifest, read_shards, read_split_table,
                                   shard_items, split_shards)
from pipelines.ray_private import read_data_limits_until_known

# Every process that runs a visionflow plan imports this package (a driver, Ray Data's split coordinator
# unpickling the plan): each execution's first second then uses every core it is given (ray_private).
read_data_limits_until_known()

_LAZY = {"save_preview": "preview", "TASKS": "views", "augment": "views", "augment_table": "views",
         "collate_detection": "views", "quiet_data_console": "console",
         "quiet_execution": "console"}

__all__ = ["TASKS", "augment", "augment_table", "collate_detection", "ingest", "load_split", "read_coco", "read_manifest",
           "quiet_data_console", "quiet_execution", "read_shards", "read_split_table", "save_preview", "shard_items",
           "split_shards"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pipelines.data' has no attribute {name!r}")
    value = getattr(import_module(f"pipelines.data.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
