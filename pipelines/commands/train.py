"""`visionflow train`: one architecture on Ray Train (rerun the same command to resume)."""
from __future__ import annotations

import argparse
import json
import os
import typing

SKIP = {"categories", "chaos"}  # filled from the data / test-only


def _flag_type(annotation):
    base = annotation
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        base = next(a for a in typing.get_args(annotation) if a is not type(None))  # Optional[X] -> X
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
        help_text = f"{field.description or name.replace('_', ' ')} (default: {default!r})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind, choices = _flag_type(field.annotation)
        parser.add_argument(flag, type=kind, choices=choices, default=None, required=name in required,
                            help=help_text, metavar=None if choices else name.upper())
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of a locally started Ray cluster (default: enough for the workers)")


def _local_cpus(cfg) -> int:
    # Train workers hold their CPUs for the whole run; Ray Data's augmentation tasks need some left over.
    return max(os.cpu_count() or 1, int(cfg.workers * cfg.cpus_per_worker + 2 * cfg.augment_cpus + 1))


def main(args: argparse.Namespace) -> int:
    import ray
    from pydantic import ValidationError

    from pipelines.ray_runtime import start_local
    from pipelines.train import fit
    from pipelines.train.config import TrainConfig

    values = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    try:
        cfg = TrainConfig.model_validate(values)
    except (ValidationError, KeyError, ValueError) as e:
        print(f"visionflow train: {e}")
        return 2
    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, include_dashboard=False)
        else:
            start_local(args.num_cpus or _local_cpus(cfg))
    try:
        result = fit(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"visionflow train: {e}")
        return 2
    print(json.dumps({"run_dir": result["run_dir"], "checkpoint": result["checkpoint"],
                      "epochs": result["epochs_run"], "final": result["metrics"]}, default=str))
    return 0
