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
    parser = argparse.ArgumentParser(prog="visionflow", description="The computer-vision canon, AlexNet to "
                                     "Mask R-CNN, as one distributed pipeline on Ray.")
    parser.add_argument("--version", action="version", version=f"visionflow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (and so its heavy dependencies).
        if name == wanted:
            _module(name).configure(p)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("visionflow")
    except PackageNotFoundError:  # run from a checkout that was not pip-installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Usage errors exit 2 (argparse's message); a command's refusal of its input is
    one line ``visionflow <cmd>: ...`` on stderr with exit 2, a failure one line with exit 1 (the
    traceback only with VISIONFLOW_DEBUG=1)."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(_module(args.command).main(args) or 0)
    except KeyboardInterrupt:
        print(f"visionflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as e:
        if os.environ.get("VISIONFLOW_DEBUG"):
            raise
        print(f"visionflow {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- one line for the user; VISIONFLOW_DEBUG=1 for the traceback
        if os.environ.get("VISIONFLOW_DEBUG"):
            raise
        print(f"visionflow {args.command}: {type(e).__name__}: {' '.join(str(e).split())[:500]} "
              f"(VISIONFLOW_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
