"""`visionflow visualize`: what a classifier's layers learned, as PNG grids (ZFNet's deconvnet on
ZFNet/AlexNet, guided backpropagation on the others): the strongest feature maps, the projections of
their top-9 activations and the image patches that caused them."""
from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or checkpoint.pt")
    parser.add_argument("--data", required=True, help="data directory (DIR/val from `visionflow ingest`)")
    parser.add_argument("--layer", required=True, action="append",
                        help="layer to show: convK (K-th convolution) or a module name; repeat for several")
    parser.add_argument("--out", default="visualizations", help="directory for the grids (default: ./visualizations)")
    parser.add_argument("--images", type=int, default=128, help="crops searched for top activations (default: 128)")
    parser.add_argument("--maps", type=int, default=9, help="strongest feature maps per layer (default: 9)")
    parser.add_argument("--top", type=int, default=9, help="top activating crops per map (default: 9)")
    parser.add_argument("--method", default="auto", choices=["auto", "deconvnet", "guided", "gradient"],
                        help="auto: deconvnet for ZFNet/AlexNet, guided backpropagation otherwise")
    parser.add_argument("--split", default="val", help="split of the data directory (default: val)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is one)")
    from pipelines.ray_runtime import add_arguments

    add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import connect_for
    from pipelines.reports.visualize import visualize_checkpoint

    for name in ("images", "maps", "top"):
        if getattr(args, name) < 1:
            print(f"visionflow visualize: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if "://" in args.out:  # pathlib made s3://b/x a local folder "s3:/b/x"
        print(f"visionflow visualize: --out {args.out}: the grids are written to a local folder; copy them to "
              f"object storage afterwards", file=sys.stderr)
        return 2
    if not connect_for("visualize", args, num_cpus=2):
        return 1
    from pipelines.data import quiet_data_console

    quiet_data_console()  # the command prints its own progress; Ray Data's lines go to its log file
    try:
        result = visualize_checkpoint(args.checkpoint, args.data, args.out, args.layer, images=args.images,
                                      maps=args.maps, top=args.top, method=args.method, split=args.split,
                                      device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"visionflow visualize: {e}", file=sys.stderr)
        return 2
    print(f"{result['method']}: " + ", ".join(v["png"] for v in result["layers"].values()))
    return 0
