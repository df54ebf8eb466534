"""`make gpu-check` on a machine without a GPU says what it skipped and exits 0; its checks' code runs (tiny,
on the CPU) so that the day a GPU is lent the script works."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check measures it")
def test_without_a_gpu_it_skips_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "ddp" in lines[0] and "serve" in lines[0]
    assert not out.exists()


def test_the_checks_run_tiny_on_the_cpu():
    from benchmarks import gpu_check

    assert gpu_check.main(["--cpu-smoke", "--checks", "nms", "amp", "alexnet2012"]) == 0


def test_the_graph_rate_counts_answered_images_and_a_failed_run_keeps_the_last_good_file(tmp_path):
    from benchmarks.gpu_check import results_path, serve_rates

    rates = serve_rates([200, 200, 503, 200, 408], took=2.0, per_image=0.5)
    assert rates["graph_images_per_s"] == 1.5 and rates["answered"] == 3  # 3 answered in 2 s, not 5
    assert rates["not_answered"] == {"408": 1, "503": 1} and rates["graph_vs_in_process"] == 0.75
    with pytest.raises(RuntimeError, match="no request of 2 was answered 200"):
        serve_rates([503, 503], took=1.0, per_image=0.5)
    out = str(tmp_path / "gpu_check.json")
    good = {"checks": {"nms": {"boxes": 10}, "ddp": {"workers_2": {"error": "NCCL: refused"}}}}
    assert results_path(out, good) == tmp_path / "gpu_check.json"  # a recorded NCCL refusal is a finding
    failed = {"checks": {"nms": {"boxes": 10}, "serve": {"error": "RuntimeError: no request answered"}}}
    assert results_path(out, failed) == tmp_path / "gpu_check.failed.json"
