"""`visionflow serve` end to end: a checkpoint written like the trainer's, a Serve YAML, the command
deploying it on the test cluster; dynamic batching at work, 503 JSON when the queue is full, and a
clean shutdown when the command is told to stop (its Ctrl-C)."""
from __future__ import annotations

import argparse
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from pipelines.commands import serve as serve_cmd

PORT = 8462
MAX_QUEUED = 2
CATEGORIES = [{"id": 11, "name": "disk", "label": 1}, {"id": 22, "name": "square", "label": 2},
              {"id": 33, "name": "triangle", "label": 3}]


def _write_checkpoint(run_dir):
    """A run directory as `visionflow train` leaves it: checkpoints/epoch_0000/checkpoint.pt."""
    from vision.models import create_model

    model = create_model("ssdlite_mobilenet_v3", 3)
    config = {"task": "detection", "arch": "ssdlite_mobilenet_v3", "num_classes": 3, "categories": CATEGORIES,
              "data": "unused", "out": str(run_dir), "image_size": 80}  # the YAML's 64 is another model's
    path = run_dir / "checkpoints" / "epoch_0000" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 0, "config": config}, path)
    return run_dir


def _config(path, checkpoint):
    # The detector holds at most 8 requests (one batch, waiting up to 2 s to fill); its caller queues MAX_QUEUED more.
    doc = {"http_options": {"host": "127.0.0.1", "port": PORT},
           "applications": [{"name": "visionflow", "route_prefix": "/", "import_path": "pipelines.serve.app:build_app",
                             "args": {"models": [{
                                 "name": "det", "checkpoint": str(checkpoint), "image_size": 64,
                                 "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 2.0},
                                 "model": {"num_cpus": 0.2, "max_ongoing_requests": 8, "max_queued_requests": MAX_QUEUED}}],
                                 "nms": {"score_threshold": 0.0},
                                 "preprocess": {"num_cpus": 0.1}, "postprocess": {"num_cpus": 0.1},
                                 "nms_stage": {"num_cpus": 0.1}, "ingress": {"num_cpus": 0.1}}}]}
    path.write_text(yaml.safe_dump(doc))
    return path


def _args(**kw):
    base = {"config": None, "checkpoint": None, "random_weights": False, "host": None, "port": None, "address": None}
    return argparse.Namespace(**{**base, **kw})


class _Lines(io.StringIO):
    pass


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_cli")
    run_dir = _write_checkpoint(tmp / "run")
    cfg = _config(tmp / "serve.yaml", tmp / "missing-run")  # --checkpoint replaces it
    stop, out, rc = threading.Event(), _Lines(), {}
    t = threading.Thread(target=lambda: rc.setdefault("rc", serve_cmd.serve_until(
        stop, _args(config=str(cfg), checkpoint=str(run_dir)), out)), daemon=True)
    t.start()
    url = f"http://127.0.0.1:{PORT}"
    for _ in range(600):
        if "Ctrl-C" in out.getvalue() or not t.is_alive():
            break
        t.join(0.5)
    assert "Ctrl-C" in out.getvalue(), out.getvalue()
    yield {"url": url, "stop": stop, "thread": t, "out": out, "rc": rc}
    stop.set()
    t.join(120)


def _jpeg(seed=0) -> bytes:
    arr = (np.random.default_rng(seed).random((48, 64, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def test_refuses_to_start_without_a_checkpoint(tmp_path):
    def refusal(args) -> str:
        """The one line on the error stream; nothing on the progress stream."""
        out, err = io.StringIO(), io.StringIO()
        assert serve_cmd.serve_until(threading.Event(), args, out, err) == 2
        lines = err.getvalue().splitlines()
        assert out.getvalue() == "" and len(lines) == 1 and lines[0].startswith("visionflow serve: "), (out, lines)
        return lines[0]

    line = refusal(_args())
    assert "--checkpoint" in line and "--random-weights" in line
    doc = {"applications": [{"name": "v", "import_path": "pipelines.serve.app:build_app",
                             "args": {"models": [{"name": "m", "task": "detection"}]}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    line = refusal(_args(config=str(tmp_path / "c.yaml")))
    assert "['m']" in line and "--checkpoint" in line
    assert "nope" in refusal(_args(checkpoint=str(tmp_path / "nope")))
    # A misspelt key: pydantic's four lines were printed on stdout.
    doc["applications"][0]["args"]["models"][0]["max_batch_sise"] = 4
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    assert "max_batch_sise" in refusal(_args(config=str(tmp_path / "c.yaml"), random_weights=True))


def test_serves_the_checkpoint_with_its_categories(served):
    models = requests.get(f"{served['url']}/v1/models", timeout=30).json()["models"]
    assert [(m["name"], m["task"], m["arch"]) for m in models] == [("det", "detection", "ssdlite_mobilenet_v3")]
    assert models[0]["image_size"] == 80  # --checkpoint: the checkpoint's size, not the YAML model's
    assert models[0]["source"].endswith("run")
    r = requests.post(f"{served['url']}/v1/detect", data=_jpeg(), headers={"content-type": "image/jpeg"},
                      params={"max_detections": 10}, timeout=60)
    assert r.status_code == 200, r.text
    dets = r.json()["detections"]
    assert dets and {d["category_id"] for d in dets} <= {11, 22, 33}
    assert {d["label"] for d in dets} <= {"disk", "square", "triangle"}
    # A detection-only deployment has no segmentation or classification model to offer, by name or not.
    for path, params in (("/v1/segment", {}), ("/v1/classify", {}), ("/v1/segment", {"model": "det"})):
        r = requests.post(f"{served['url']}{path}", data=_jpeg(), headers={"content-type": "image/jpeg"},
                          params=params, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_model", r.text


def test_batches_form_and_a_full_queue_answers_503_json(served):
    from ray import serve

    url = served["url"]

    def post(i):
        return requests.post(f"{url}/v1/detect", data=_jpeg(i), headers={"content-type": "image/jpeg"}, timeout=120)

    detector = serve.get_deployment_handle("Detector_det", app_name="visionflow")
    before = len(detector.recent_batch_sizes.remote().result())
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(post, range(24)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503}, codes
    # Every 503 came from a full queue, so MAX_QUEUED requests were queued then and are answered. More is timing:
    # Ray's router counts a request as queued until a replica takes it, so a burst can be refused while the
    # detector still has free slots (its own comment in serve/_private/router.py says so).
    assert codes.count(503) >= 1 and codes.count(200) >= MAX_QUEUED, codes
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded"
    sizes = detector.recent_batch_sizes.remote().result()[before:]
    assert max(sizes) > 1, sizes  # concurrent requests were run as one batch
    # Each answered request ran in a batch once; a refused one never reached the model.
    assert sum(sizes) == codes.count(200), (sizes, codes)
    # Still serving right after.
    assert post(99).status_code == 200


def test_stop_shuts_serve_down(served):
    import time

    t0 = time.monotonic()
    served["stop"].set()
    served["thread"].join(120)
    # Within seconds: an Ingress behind HAProxy held its 30 s drain for remote load balancers (ray_private).
    assert time.monotonic() - t0 < 15
    assert not served["thread"].is_alive() and served["rc"]["rc"] == 0
    assert "stopped" in served["out"].getvalue()
    # The command joined a cluster it did not start (the test session's): stopping removes its application
    # and leaves Serve (and any other application) running there. Its own cluster would go with it: see
    # tests/test_serve_lifecycle.py.
    from ray import serve

    assert "visionflow" not in serve.status().applications
    assert requests.get(f"{served['url']}/healthz", timeout=5).status_code == 404


@pytest.mark.slow
def test_the_command_stays_up_until_ctrl_c(tmp_path):
    """The real `visionflow serve` process (its own local Ray): serves, then SIGINT shuts it down cleanly. Its
    console holds the command's lines, not the INFO lines of its Serve's controller and proxies."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port = PORT + 1
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "serve", "--random-weights", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_DISABLE_DASHBOARD": "1"})
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or too slow to answer under load
                time.sleep(2)
            assert proc.poll() is None, proc.stdout.read()
        r = requests.post(f"http://127.0.0.1:{port}/v1/detect", data=_jpeg(), headers={"content-type": "image/jpeg"},
                          timeout=120)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0 and "stopped" in out, out
        assert "Ctrl-C to stop" in out, out
        quiet = ("Deploying new version", "Adding 1 replica", "Proxy starting", "HAProxy started", "Deleting app")
        assert not [line for line in out.splitlines() if any(q in line for q in quiet)], out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
