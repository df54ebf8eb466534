"""`visionflow predict`: a checkpoint on your own images, no server: drawn overlays and a COCO results JSON."""
from __future__ import annotations

import argparse
import json
import sys


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value
    parse.__name__ = "integer"  # argparse's "invalid integer value" for non-numbers
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively) or globs; local paths or storage URIs")
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory of `visionflow train`, a checkpoint directory or a .pt file")
    parser.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--annotations", default=None,
                        help="a COCO JSON listing these images: its image ids go into the results (default: 1..N)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="detections below it are dropped (0.3)")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="NMS IoU threshold (0.5)")
    parser.add_argument("--max-detections", type=_at_least(1), default=100, help="per image (100)")
    parser.add_argument("--top-k", type=_at_least(1), default=5, help="classes per image for classifiers (5)")
    parser.add_argument("--batch-size", type=_at_least(1), default=8, help="images per model call (8)")
    parser.add_argument("--in-process-max", type=_at_least(0), default=16,
                        help="up to this many images run in this process; more run on Ray Data (16)")
    parser.add_argument("--actors", type=_at_least(1), default=2, help="Ray Data actors, each with a copy of the model (2)")
    parser.add_argument("--no-overlays", action="store_true", help="write the JSON only")
    from pipelines.ray_runtime import add_arguments

    add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from pipelines.predict import list_inputs, predict

    for name in ("score_threshold", "iou_threshold"):
        if not 0 <= getattr(args, name) <= 1:
            print(f"visionflow predict: --{name.replace('_', '-')} must be in [0, 1]", file=sys.stderr)
            return 2
    try:
        paths = list_inputs(args.inputs, exclude=args.out)
        if len(paths) > args.in_process_max:
            from pipelines.ray_runtime import connect_for

            if not connect_for("predict", args, num_cpus=max(2, args.actors + 1)):
                return 1
        result = predict(args.checkpoint, args.inputs, args.out, annotations=args.annotations,
                         score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                         max_detections=args.max_detections, top_k=args.top_k, batch_size=args.batch_size,
                         in_process_max=args.in_process_max, actors=args.actors, draw=not args.no_overlays)
    except (FileNotFoundError, ValueError) as e:
        print(f"visionflow predict: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("task", "engine", "images", "predictions", "images_json")}
                     | {"overlays": len(result["overlays"]), "errors": len(result["errors"]),
                        "overlay_errors": len(result["overlay_errors"])}))
    for err in result["errors"][:10]:
        print(f"  skipped {err['file_name']}: {err['error']}", file=sys.stderr)
    for err in result["overlay_errors"][:10]:
        print(f"  no overlay for {err['file_name']} (its predictions are in the JSON): {err['error']}", file=sys.stderr)
    return 0
