"""`visionflow train`: one architecture on Ray Train (rerun the same command to resume; ``--restart`` to start
the run directory over). Exit codes: 0 trained, 1 training failed or diverged, or ``--pretrained`` weights
could not be downloaded (one line), 2 bad input (an ``--init-from`` file that does not load or match) or a
run directory of other data or another model (one line)."""
from __future__ import annotations

import argparse
import json
import sys
import os
import typing

SKIP = {"categories", "chaos"}  # filled from the data / test-only


def _flag_type(annotation):
    base = annotation
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) > 1:  # e.g. workers: N or MIN-MAX; the config's validator parses the text
            return str, None
        base = kinds[0]  # Optional[X] -> X
    if typing.get_origin(base) is typing.Literal:
        return str, list(typing.get_args(base))
    if base is dict:
        return json.loads, None
    return (base if base in (int, float, str) else str), None


def configure(parser: argparse.ArgumentParser) -> None:
    from pipelines.train.config import TrainConfig

    # One flag per TrainConfig field (--batch-size for batch_size), so that new fields need no CLI edit.
    required = {"arch", "data", "out"}
    for name, field in TrainConfig.model_fields.items():
        if name in SKIP:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        what = field.description or name.replace("_", " ")
        help_text = f"{what} (required)" if field.is_required() else f"{what} (default: {default!r})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind, choices = _flag_type(field.annotation)
        parser.add_argument(flag, type=kind, choices=choices, default=None, required=name in required,
                            help=help_text, metavar=None if choices else name.upper())
    from pipelines.ray_runtime import add_arguments

    add_arguments(parser)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of a locally started Ray cluster (default: enough for the workers)")
    parser.add_argument("--restart", action="store_true",
                        help="delete the checkpoints and metrics in --out and train from scratch (a rerun "
                             "without it resumes, and is refused when the data or the model differ)")


def _local_cpus(cfg) -> int:
    # Train workers hold their CPUs for the whole run; Ray Data's augmentation tasks need some left over.
    return max(os.cpu_count() or 1, int(cfg.max_workers * cfg.cpus_per_worker + 2 * cfg.augment_cpus + 1))


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipelines.ray_runtime import connect_for
    from pipelines.train import TrainingDiverged, WeightsUnavailable, fit
    from pipelines.train.config import TrainConfig

    values = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    try:
        cfg = TrainConfig.model_validate(values)
    except ValidationError as e:  # one line per refused field, the flag named as the user typed it
        # A check across settings has no field of its own: its message names them.
        why = "; ".join((f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: " if err["loc"] else "")
                        + err["msg"] for err in e.errors())
        print(f"visionflow train: {why}", file=sys.stderr)
        return 2
    except (KeyError, ValueError) as e:
        print(f"visionflow train: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if not connect_for("train", args, num_cpus=args.num_cpus or _local_cpus(cfg)):
        return 1
    from pipelines.ray_runtime import local_cluster_env
    from pipelines.train.trainer import cluster_shortfall

    short = cluster_shortfall(cfg)
    if short and local_cluster_env() is not None:  # a cluster of this command's own never grows
        print(f"visionflow train: {short}", file=sys.stderr)
        return 2
    if short:  # a joined cluster may (its autoscaler): say what Ray Train waits for
        print(f"visionflow train: {short}; Ray Train waits for it (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        result = fit(cfg, restart=args.restart)
    except (FileNotFoundError, ValueError) as e:
        print(f"visionflow train: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (TrainingDiverged, WeightsUnavailable) as e:  # --pretrained offline: one line, try --init-from
        print(f"visionflow train: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps({"run_dir": result["run_dir"], "checkpoint": result["checkpoint"],
                      "epochs": result["epochs_run"], "final": result["metrics"], "phases": result.get("phases")},
                     default=str))
    return 0
