"""`visionflow synth`: write the built-in shapes dataset in COCO layout."""
from __future__ import annotations

import argparse
import sys
import json


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:  # numpy's own message ("expected non-negative integer") did not name the flag
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


_seed.__name__ = "integer"  # argparse's "invalid integer value" for non-numbers


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (gets annotations/, train/, val/)")
    parser.add_argument("--images", type=int, default=200, help="number of images, train + val (default 200)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed >= 0; same seed, same dataset")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images in val (default 0.2)")


def main(args: argparse.Namespace) -> int:
    from vision.data.synth import write_synth

    step = max(args.images // 10, 1)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            print(f"synth: {done}/{total} images", flush=True)

    try:
        counts = write_synth(args.out, images=args.images, size=args.size, seed=args.seed,
                             val_fraction=args.val_fraction, progress=progress)
    except ValueError as e:
        print(f"visionflow synth: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **counts}))
    return 0
