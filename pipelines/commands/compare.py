"""`visionflow compare RUN_DIR...`: the overall comparison (Markdown table + PNG chart) of training runs."""
from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories of `visionflow train` (or holding failed.json)")
    parser.add_argument("--out", default="comparison", help="where comparison.{md,png,json} and curves.png go (default ./comparison)")


def main(args: argparse.Namespace) -> int:
    from pipelines import storage
    from pipelines.reports.compare import compare

    missing = [d for d in args.run_dirs if not storage.exists(d)]
    if missing:  # a misspelt path is the user's input, not a failed run
        print(f"visionflow compare: no such run directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    from pipelines.reports.compare import _train_dir

    mine = [d for d in args.run_dirs if storage.same_place(args.out, d) or storage.same_place(args.out, _train_dir(d))]
    if mine:  # its curves.png is the run's own, redrawn by every epoch
        print(f"visionflow compare: --out {args.out} is the run directory {mine[0]}, whose curves.png the comparison "
              "would overwrite; give another folder", file=sys.stderr)
        return 2
    result = compare(args.run_dirs, args.out)
    print(result["markdown"])
    print(f"table: {result['table']}\nchart: {result['chart']}\ncurves: {result['curves']}")
    return 0 if all(r["status"] == "done" for r in result["rows"]) else 1
