"""`visionflow ingest`: COCO -> validated Parquet shards + ``_manifest.json``."""
from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="COCO instances JSON (local path or s3://...)")
    parser.add_argument("--images", required=True, help="directory holding the images the JSON names")
    parser.add_argument("--out", required=True, help="output directory for the shards and _manifest.json")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")


def main(args: argparse.Namespace) -> int:
    import ray

    from pipelines.data import ingest

    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False)
    try:
        manifest = ingest(args.annotations, args.images, args.out)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"visionflow ingest: {e}")
        return 2
    print(json.dumps({
        "out": args.out, "num_images": manifest["num_images"], "num_instances": manifest["num_instances"],
        "categories": len(manifest["categories"]), "quarantined": len(manifest["quarantined"]),
        "dropped": len(manifest["dropped"]), "num_clipped_boxes": manifest["num_clipped_boxes"],
        "shards": len(manifest["shards"]),
    }))
    for q in manifest["quarantined"][:10]:
        print(f"  quarantined {q['file_name']} (image {q['image_id']}): {q['reason']}")
    return 0
