"""What every benchmark records with its figures, and its refusal to record figures from a loaded machine.

``begin(args)`` at the start of a run notes the command, the date, the 1-minute load average and the core
count; ``write(path, doc, start)`` adds them to the results file. A figure taken while other heavy work
runs is not a figure: when the load average at the start exceeds half the cores, ``write`` refuses (the
run still prints its figures) unless ``--allow-load`` was given, which the file then records.
``docs/benchmarks.md`` (``python -m benchmarks.report``) shows these fields beside every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-load", action="store_true",
                        help="write the results file even when the machine was loaded at the start "
                             "(load average above half the cores); the file records it")


def _command() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([prog, *sys.argv[1:]])


def begin(args: argparse.Namespace | None = None) -> dict:
    """The run's provenance, taken now (before the benchmark loads the machine itself)."""
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    state = {"command": _command(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average": round(load1, 2),
             "cores": cores, "allow_load": bool(getattr(args, "allow_load", False))}
    if load1 > load_limit(cores):
        print(f"warning: load average {load1:.2f} on {cores} cores at the start: the figures of this run will "
              f"not be written{' (--allow-load: they will, marked)' if state['allow_load'] else ''}",
              file=sys.stderr, flush=True)
    return state


def load_limit(cores: int | None = None) -> float:
    """The highest 1-minute load average a run may start at and still write its figures: half the cores."""
    return (cores or os.cpu_count() or 1) / 2


def loaded(state: dict) -> bool:
    return state["load_average"] > load_limit(state["cores"])


def _refused(path, state: dict) -> bool:
    """True (and says so) when the machine was loaded at the start and ``--allow-load`` was not given."""
    if loaded(state) and not state["allow_load"]:
        print(f"not writing {path}: load average {state['load_average']} > half of {state['cores']} cores at the "
              f"start (rerun on an idle machine, or pass --allow-load)", file=sys.stderr, flush=True)
        return True
    return False


def write(path: str | Path, doc: dict, state: dict, indent: int = 2) -> bool:
    """Write ``doc`` plus the provenance to ``path``; False (and nothing written) when the machine was
    loaded at the start and ``--allow-load`` was not given."""
    if _refused(path, state):
        return False
    write_atomic(Path(path), json.dumps({**doc, **{k: v for k, v in state.items() if k != "allow_load"},
                                     **({"allow_load": True} if state["allow_load"] and loaded(state) else {})},
                                    indent=indent, default=str) + "\n")
    return True


def write_atomic(path: Path, text: str) -> None:
    """``text`` as the whole of ``path``, written aside and renamed into place: a run killed while writing
    leaves the old file, never half of a new one (the report and the docs test read every file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    aside.write_text(text)
    os.replace(aside, path)


def write_run(path: str | Path, benchmark: str, key: str, doc: dict, state: dict) -> bool:
    """Put one run into ``path``'s ``runs`` under ``key`` (an architecture, an image count), with its own
    provenance, keeping the other keys' runs (each its own run of many minutes); refused like ``write``."""
    if _refused(path, state):
        return False
    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else {}
    runs = {k: v for k, v in old.get("runs", {}).items() if k != key}
    runs[key] = {**doc, **{k: v for k, v in state.items() if k != "allow_load" or v}}
    write_atomic(path, json.dumps({"benchmark": benchmark, "runs": dict(sorted(runs.items()))}, indent=2, default=str)
             + "\n")
    return True

