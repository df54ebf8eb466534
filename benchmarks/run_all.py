"""Run every benchmark in this folder, one after another (`make bench`).

Each benchmark is a module with a ``main()``; it prints its table and writes
``benchmarks/results/<name>.json``. Pass names to run a subset: ``python -m benchmarks.run_all nms serve_load``.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name not in {"run_all", "common"} and not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    wanted = list(argv if argv is not None else sys.argv[1:]) or names()
    failed = []
    for name in wanted:
        print(f"=== benchmarks.{name}", flush=True)
        start = time.perf_counter()
        try:
            sys.argv = [f"benchmarks.{name}"]  # each benchmark runs at its default size
            importlib.import_module(f"benchmarks.{name}").main()
        except Exception as exc:  # one benchmark failing must not hide the others' figures
            failed.append(name)
            print(f"benchmarks.{name} failed: {exc!r}", flush=True)
        print(f"=== benchmarks.{name}: {time.perf_counter() - start:.0f}s", flush=True)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
