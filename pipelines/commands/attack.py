"""`visionflow attack`: robustness report of one or more classifier checkpoints (clean, adversarially
trained, distilled): accuracy against epsilon per attack as Markdown/JSON, a PNG curve and PNG examples."""
from __future__ import annotations

import argparse
import sys

from pipelines.reports.robustness import DEFAULT_ATTACKS, DEFAULT_EPSILONS, robustness_report

__all__ = ["configure", "main", "robustness_report"]


def configure(parser: argparse.ArgumentParser) -> None:
    from vision.adversarial import ATTACKS

    parser.add_argument("--checkpoint", required=True, action="append",
                        help="run directory, checkpoint directory or checkpoint.pt; repeat to compare models")
    parser.add_argument("--data", required=True, help="data directory (DIR/val from `visionflow ingest`)")
    parser.add_argument("--out", default="robustness", help="directory for the report (default: ./robustness)")
    parser.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPSILONS),
                        help="epsilons in pixel units of [0, 1] (default: 0 1/255 2/255 4/255 8/255 16/255)")
    parser.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS), choices=sorted(ATTACKS),
                        help=f"attacks (default: {' '.join(DEFAULT_ATTACKS)})")
    parser.add_argument("--images", type=int, default=256, help="crops to attack (default: 256)")
    parser.add_argument("--split", default="val", help="split of the data directory (default: val)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fpr", type=float, default=0.05,
                        help="false-positive rate on clean crops that sets each detector's threshold")
    parser.add_argument("--no-detect", action="store_true", help="skip the adversarial-input detectors")
    parser.add_argument("--examples", type=int, default=6, help="rows of the examples grid (0: none)")
    parser.add_argument("--visualize", action="store_true", help="also write layer visualizations")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is one)")
    from pipelines.ray_runtime import add_arguments

    add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import connect_for

    if "://" in args.out:  # pathlib made s3://b/x a local folder "s3:/b/x" and the command said it wrote there
        print(f"visionflow attack: --out {args.out}: the report is written to a local folder; copy it to "
              f"object storage afterwards", file=sys.stderr)
        return 2
    if not connect_for("attack", args, num_cpus=2):
        return 1
    from pipelines.data import quiet_data_console

    quiet_data_console()  # the command prints its own progress; Ray Data's lines go to its log file
    try:
        result = robustness_report(args.checkpoint, args.data, args.out, epsilons=args.eps, attacks=args.attacks,
                                   images=args.images, split=args.split, batch_size=args.batch_size,
                                   detect=not args.no_detect, fpr=args.fpr, examples=args.examples,
                                   visualize=args.visualize, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"visionflow attack: {e}", file=sys.stderr)
        return 2
    with open(result["markdown"]) as f:
        print(f.read())
    print(f"wrote {result['json']}, {result['markdown']}, {result['curves']}"
          + "".join(f", {p}" for p in result["examples"]))
    return 0
