"""`visionflow models`: the registry with parameters and GFLOPs measured by torch's FLOP counter."""
from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None, choices=["classification", "localization", "detection",
                                                         "segmentation"], help="only this task's models")
    parser.add_argument("--image-size", type=int, default=224,
                        help="input side for the FLOP count (default 224; a detector resizes it to its own "
                             "min_size first, R-CNN warps regions: the table says what each model's first convolution saw)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def format_table(rows: list[dict], image_size: int) -> str:
    """Markdown table of ``vision.models.flops.profile_all`` rows."""
    lines = [f"| name | task | params (M) | GFLOPs | computed at (given {image_size}) |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['task']} | error | {r['error']} | |")
        else:
            h, w = r["input_hw"]
            lines.append(f"| {r['name']} | {r['task']} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {h}x{w} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from pipelines.console import Progress
    from vision.models import list_models
    from vision.models.flops import profile_all

    # On stderr: stdout keeps the table (or the JSON) alone.
    with Progress(len(list_models(args.task)), "models", unit="model") as bar:
        bar.update(0)  # shown at once: the first detector takes seconds
        rows = profile_all(args.task, image_size=args.image_size,
                           progress=lambda row, total: bar.update(1, measured=row["name"]))
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows, args.image_size))
        print("\nFLOPs count a multiply-add as 2 (torch.utils.flop_counter); params: layers used at inference.")
    return 0
