"""Ray Data for visionflow: COCO ingestion into Parquet shards, loading, augmentation, task views."""
from pipelines.data.ingest import ingest, load_split, read_coco, read_manifest
from pipelines.data.preview import save_preview
from pipelines.data.views import TASKS, augment, collate_detection

__all__ = ["TASKS", "augment", "collate_detection", "ingest", "load_split", "read_coco", "read_manifest",
           "save_preview"]
