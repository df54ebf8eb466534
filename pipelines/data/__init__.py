"""Ray Data for visionflow: COCO ingestion into Parquet shards, loading, augmentation, task views.

Names load on first use (PEP 562): a process that only unpickles a dataset plan (Ray Data's split
coordinator, a read task) imports the module it needs, not torch and torchvision with all of them.
"""
from importlib import import_module

_HOME = {"ingest": "ingest", "load_split": "ingest", "read_coco": "ingest", "read_manifest": "ingest",
         "save_preview": "preview", "TASKS": "views", "augment": "views", "collate_detection": "views"}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'pipelines.data' has no attribute {name!r}")
    value = getattr(import_module(f"pipelines.data.{_HOME[name]}"), name)
    globals()[name] = value
    return value
