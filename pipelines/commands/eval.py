"""`visionflow eval`: metrics of a checkpoint on a data directory's val split, written as JSON."""
from __future__ import annotations

import argparse
import sys
import json
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or checkpoint.pt")
    parser.add_argument("--data", required=True, help="data directory (DIR/val from `visionflow ingest`)")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--out", default=None, help="directory for metrics.json (default: CHECKPOINT/eval for a "
                                                    "run directory, else the current directory)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is one)")
    from pipelines.ray_runtime import add_arguments

    add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import connect_for
    from pipelines.train import evaluate_checkpoint

    out = args.out
    if out is None:
        out = os.path.join(args.checkpoint, "eval") if os.path.isdir(args.checkpoint) else "."
    from pipelines.train.checkpoint import checkpoint_file, load_payload

    if args.batch_size < 1:
        print(f"visionflow eval: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:  # a wrong path, a torn or foreign file: refused before Ray starts. A local file is mapped, not read
        # whole; a remote one (s3://) is only looked for here: reading it would download it twice.
        checkpoint_file(args.checkpoint) if "://" in args.checkpoint else load_payload(args.checkpoint, mmap=True)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"visionflow eval: {e}", file=sys.stderr)
        return 2
    if not connect_for("eval", args):
        return 1
    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.data, out, split=args.split,
                                      batch_size=args.batch_size, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"visionflow eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, default=str))
    return 0
