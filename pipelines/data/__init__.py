"""Ray Data for visionflow: COCO ingestion into Parquet shards, loading, augmentation, task views."""
from pipelines.data.ingest import ingest, load_split, read_coco, read_manifest

__all__ = ["ingest", "load_split", "read_coco", "read_manifest"]
