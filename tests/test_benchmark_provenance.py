"""Every benchmark's results file says how it was measured, and a loaded machine's figures are refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import provenance

ROOT = Path(__file__).resolve().parents[1]


def _state(load: float, cores: int = 2, allow: bool = False) -> dict:
    return {"command": "python -m benchmarks.nms", "date": "2026-11-30T00:00:00+0000", "load_average": load,
            "cores": cores, "allow_load": allow}


def test_figures_from_a_loaded_machine_are_not_written(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert provenance.write(path, {"x": 1}, _state(load=1.5)) is False
    assert not path.exists()
    assert "load average 1.5 > half of 2 cores" in capsys.readouterr().err


def test_allow_load_writes_them_marked(tmp_path):
    path = tmp_path / "r.json"
    assert provenance.write(path, {"x": 1}, _state(load=3.0, allow=True))
    doc = json.loads(path.read_text())
    assert doc["allow_load"] is True and doc["load_average"] == 3.0


def test_an_idle_runs_file_records_command_date_load_and_cores(tmp_path):
    path = tmp_path / "r.json"
    assert provenance.write(path, {"x": 1}, _state(load=0.3))
    doc = json.loads(path.read_text())
    assert doc == {"x": 1, "command": "python -m benchmarks.nms", "date": "2026-11-30T00:00:00+0000",
                   "load_average": 0.3, "cores": 2}


def test_begin_names_the_module_command_it_runs_as():
    code = "from benchmarks import provenance; import json; print(json.dumps(provenance.begin()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["cores"] >= 1 and isinstance(state["load_average"], float) and state["date"][:2] == "20"


def test_every_benchmark_that_writes_results_goes_through_provenance():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        if "results" in text and ".json" in text and path.name not in ("report.py", "provenance.py", "run_all.py"):
            assert "provenance" in text, f"{path.name} writes results without recording how they were measured"


def test_a_run_keyed_file_keeps_the_other_runs_and_refuses_a_loaded_one(tmp_path):
    path = tmp_path / "r.json"
    assert provenance.write_run(path, "data_throughput", "1000 images", {"x": 1}, _state(load=0.3))
    assert provenance.write_run(path, "data_throughput", "4000 images", {"x": 4}, _state(load=0.4))
    assert provenance.write_run(path, "data_throughput", "1000 images", {"x": 2}, _state(load=0.2))
    assert provenance.write_run(path, "data_throughput", "4000 images", {"x": 9}, _state(load=1.5)) is False
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "data_throughput" and list(doc["runs"]) == ["1000 images", "4000 images"]
    assert doc["runs"]["1000 images"] == {"x": 2, "command": "python -m benchmarks.nms",
                                          "date": "2026-11-30T00:00:00+0000", "load_average": 0.2, "cores": 2}
    assert doc["runs"]["4000 images"]["x"] == 4  # the loaded run replaced nothing


def test_make_bench_lists_every_benchmark_and_refuses_an_unknown_name():
    """`make bench` ran every module in-process: the fourth (a tool that needs arguments) exited and stopped
    the rest. Each named benchmark now runs as its own process; a new benchmark must be listed."""
    from benchmarks import run_all

    with_main = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if "\ndef main(" in p.read_text()}
    tools = {"gpu_check", "stage_profile", "detection_diagnosis", "report", "run_all"}
    assert set(run_all.BENCHMARKS) == with_main - tools
    r = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "nms", "nsm"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown benchmark(s) nsm" in r.stderr and "===" not in r.stdout
