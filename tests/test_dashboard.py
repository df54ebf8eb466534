"""The Ray dashboard of a local cluster that ``visionflow train`` starts: on by default, its URL (and how to sign
in) printed, and Ray Train's and Ray Data's own views showing this run while it trains."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.timeout(600)


def _token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def test_train_prints_the_dashboard_and_its_train_and_data_views_show_the_run(data_dir, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_STATE_TRACKING")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "train", "--task", "classification", "--arch", "resnet18",
         "--data", str(data_dir), "--out", str(out), "--epochs", "6", "--batch-size", "8", "--image-size", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[1])
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline, url = time.time() + 180, None
        while url is None and time.time() < deadline and proc.poll() is None:
            found = [m for l in list(err) if (m := re.search(r"Ray dashboard: (http://\S+)(.*)", l))]
            url = found[0].group(1) if found else None
            time.sleep(0.5)
        assert url, "no dashboard URL printed:\n" + "".join(err[-20:])
        token = _token()
        if token:  # Ray's token auth: the printed line says where the token is
            assert "sign in with" in found[0].group(2), found[0].group(0)
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        seen_run = seen_dataset = None
        while (seen_run is None or seen_dataset is None) and proc.poll() is None and time.time() < deadline + 240:
            try:
                runs = requests.get(f"{url}/api/train/v2/runs/v1", headers=headers, timeout=10)  # Train V2 runs
                if runs.ok and runs.json().get("train_runs"):
                    seen_run = runs.json()["train_runs"][0]
                jobs = requests.get(f"{url}/api/jobs/", headers=headers, timeout=10).json()
                driver = [j["job_id"] for j in jobs if j.get("type") == "DRIVER" and j["status"] == "RUNNING"]
                if driver:
                    data = requests.get(f"{url}/api/data/datasets/{driver[0]}", headers=headers, timeout=10).json()
                    if data.get("datasets"):
                        seen_dataset = data["datasets"][0]
            except requests.RequestException:
                pass
            time.sleep(1)
        assert seen_run is not None, "Ray Train's view never showed the run"
        assert seen_dataset is not None, "Ray Data's view never showed the training dataset"
        # The Train view knows the run's workers; the Data view the pipeline's operators and rows.
        assert seen_run.get("name") and seen_run.get("status"), seen_run
        operators = [op["name"] for op in seen_dataset["operators"]]
        assert any("_read_shards" in name for name in operators), operators
        # Seen while it trained: Ctrl-C ends the training (and its local cluster) without waiting for its epochs.
        assert proc.poll() is None, "the training ended before its views were checked"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
