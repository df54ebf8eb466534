"""benchmarks/data_throughput.py's memory mode runs end to end at a tiny size (its own local Ray cluster,
in a process of its own) and writes its figures with their provenance."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ingest_memory_mode_writes_its_run(tmp_path):
    out = tmp_path / "mem.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data_throughput", "--ingest-memory", "16", "--size", "64",
                           "--cpus", "2", "--allow-load", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(out.read_text())["runs"]["16 images"]
    assert run["num_images"] == 16 and run["command"].endswith(f"--out {out}")
    assert run["ingest_seconds"] > 0 and run["driver_peak_rss_mib"] >= run["imports_rss_mib"] > 0
    assert run["ray_processes_peak_rss_mib"] > 100  # the cluster's processes, found below the driver
