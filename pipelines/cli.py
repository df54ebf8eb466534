"""`visionflow` command line: one entry point, one module per command in ``pipelines/commands/``.

Each command module has ``configure(parser)`` (adds its arguments) and ``main(args) -> int``.
Modules are imported only when their command runs, so ``visionflow synth`` does not import torch models
or Ray Serve.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "synth": "write the built-in shapes dataset in COCO layout",
    "ingest": "COCO -> validated Parquet shards + _manifest.json",
    "train": "train an architecture with Ray Train",
    "eval": "evaluate a checkpoint, write the metrics JSON",
    "models": "print the model registry (name, task, parameters, GFLOPs)",
    "compare": "the overall comparison table and chart of several runs",
    "predict": "run a checkpoint on image files or folders: overlays + COCO results JSON",
    "serve": "deploy the Serve applications over HTTP",
    "run": "the whole pipeline as a resumable DAG",
    "attack": "robustness report: accuracy against epsilon per attack",
    "visualize": "deconvnet / guided-backprop visualizations of a layer",
}


def _module(name: str):
    return importlib.import_module(f"pipelines.commands.{name}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (and so its heavy dependencies).
        if name == wanted:
            _module(name).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(_module(args.command).main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
