"""`visionflow ingest`: COCO -> validated Parquet shards + ``_manifest.json``."""
from __future__ import annotations

import argparse
import sys
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="COCO instances JSON (local path or s3://...)")
    parser.add_argument("--images", required=True, help="directory holding the images the JSON names")
    parser.add_argument("--out", required=True, help="output directory for the shards and _manifest.json")
    parser.add_argument("--max-image-bytes", type=int, default=64 << 20,
                        help="quarantine image files larger than this many bytes (default: 64 MiB)")
    parser.add_argument("--max-image-pixels", type=int, default=8192 * 8192,
                        help="quarantine images with more pixels than this, from their header (default: 8192^2)")
    from pipelines.ray_runtime import add_arguments

    add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from pipelines.data import ingest
    from pipelines.ray_runtime import connect_for

    if not connect_for("ingest", args):
        return 1
    try:
        manifest = ingest(args.annotations, args.images, args.out, max_image_bytes=args.max_image_bytes,
                          max_pixels=args.max_image_pixels)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"visionflow ingest: {e}", file=sys.stderr)
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
