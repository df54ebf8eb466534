"""The cluster path on a real multi-node Ray cluster on this machine (``tests/multinode.py``): a head from
``ray start --head`` with token auth and worker nodes from ``ray start --address``, each its own raylet
and process group, so a node is lost the way a machine is: ``kill -9`` of its group.

Default suite (one 2-node cluster for the module): a 2-worker training spread over both nodes, submitted
with the CLI (``--address``); a request through Serve's proxy on the worker node, the detector's two
replicas on two nodes. ``-m slow``: a node lost mid-training (fixed and elastic worker groups), a node lost
under serving load, the whole pipeline as a ``ray job`` whose driver is killed and resubmitted, ingest
decoded on both worker nodes. The slow tests print what they measured (``-s`` shows it).

Every command runs in a subprocess against the cluster's address: this process is connected to the test
session's own local cluster (``conftest.ray_cluster``), which prepares the tiny datasets.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from multinode import Cluster, free_port, start

from pipelines import procfs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# resnet18 at 32 px, AdamW: a tiny training every node can hold.
TRAIN = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--optimizer", "adamw",
         "--augment-cpus", "0.25"]


# --- helpers --------------------------------------------------------------------------------------

class Command:
    """A command in its own process group, its output lines time-stamped as they arrive."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path = ROOT):
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    @property
    def out(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, text: str, after: float = 0.0) -> float | None:
        """When the first line containing ``text`` arrived (at or after ``after``), or None."""
        return next((t for t, line in self.lines if text in line and t >= after), None)

    def wait_for(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.first(text)
            if t is not None:
                return t
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line with {text!r} within {timeout}s (exit {self.proc.poll()}):\n{self.out[-4000:]}")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"still running after {timeout}s:\n{self.out[-4000:]}") from None
        self._reader.join(10)
        return rc

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> None:
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, s)
                self.proc.wait(timeout)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self._reader.join(10)


def _visionflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines", *args]


def _metrics(run: Path) -> list[dict]:
    """Every line of metrics.jsonl as written (re-appended epochs included)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _registered(run: Path, epoch: int) -> bool:
    """Whether Ray Train's controller registered ``epoch``'s checkpoint."""
    try:
        snap = json.loads((run / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return f"epoch_{epoch:04d}" in {r.get("checkpoint_dir_name") for r in snap.get("checkpoint_results", [])}


def _wait(pred, timeout: float, what: str, cmd: Command | None = None, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if cmd is not None and cmd.proc.poll() is not None:
            raise AssertionError(f"{what}: the command ended (exit {cmd.proc.returncode}):\n{cmd.out[-4000:]}")
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout}s" + (f":\n{cmd.out[-4000:]}" if cmd else ""))


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _report(name: str, figures: dict, *commands: Command) -> None:
    """What a slow test measured: printed (pytest -s) and appended to $VF_MULTINODE_FIGURES if set (the
    commands' time-stamped output next to it, ``<figures>.<n>.log``)."""
    doc = {"test": name, "load_avg_1_5_15": _load(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    print(f"\nFIGURES {json.dumps(doc)}", flush=True)
    target = os.environ.get("VF_MULTINODE_FIGURES")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps(doc) + "\n")
        for i, cmd in enumerate(commands):
            log = Path(f"{target}.{''.join(c if c.isalnum() else '_' for c in name)}.{i}.log")
            log.write_text("\n".join(f"{t - cmd.t0:8.1f} {line}" for t, line in cmd.lines) + "\n")


def _jpeg(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def _detect(base: str, body: bytes, timeout: float = 60) -> int:
    """POST one image to /v1/detect; the HTTP status (0: no answer within ``timeout``)."""
    req = urllib.request.Request(f"{base}/v1/detect", data=body, headers={"Content-Type": "image/jpeg"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            json.loads(r.read())
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _listener_sessions(port: int) -> set[int]:
    """Sessions of the processes listening on TCP ``port``: the node's."""
    sessions = set()
    for pid in procfs.listeners(port):
        try:
            sessions.add(os.getsid(pid))
        except ProcessLookupError:
            continue
    return sessions


def _serve_config(path: Path, port: int, detector_cpus: float = 0.5) -> Path:
    """The detection graph, ``proxy_location: EveryNode``: two detector replicas, at most one per node; the
    other stages on the head (``node_head``), so that losing a worker node loses a detector replica only."""
    on_head = {"num_cpus": 0.1, "resources": {"node_head": 0.01}}
    doc = {"proxy_location": "EveryNode",
           "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 60},
           "applications": [{"name": "visionflow", "route_prefix": "/", "import_path": "pipelines.serve.app:build_app",
                             "args": {"models": [{"name": "det", "task": "detection", "arch": "ssdlite_mobilenet_v3",
                                                  "num_classes": 3, "image_size": 64, "random_weights": True,
                                                  "batching": {"max_batch_size": 4},
                                                  "model": {"num_replicas": 2, "max_replicas_per_node": 1,
                                                            "num_cpus": detector_cpus, "max_ongoing_requests": 8}}],
                                      "nms": {"score_threshold": 0.0},
                                      "preprocess": on_head, "postprocess": on_head, "nms_stage": on_head,
                                      "ingress": {**on_head, "max_ongoing_requests": 256}}}]}
    path.write_text(yaml.safe_dump(doc))
    return path


def _detector_replicas(cluster: Cluster) -> list[dict]:
    """The detector's replicas from Serve's REST API: ``[{"node_id", "state", ...}]``."""
    apps = cluster.api("/api/serve/applications/").get("applications", {})
    deployments = apps.get("visionflow", {}).get("deployments", {})
    return next((d.get("replicas", []) for name, d in deployments.items() if name.endswith("_det")), [])


def _running_detector_nodes(cluster: Cluster) -> list[str]:
    try:
        return [r["node_id"] for r in _detector_replicas(cluster) if r.get("state") == "RUNNING"]
    except OSError:
        return []


# --- the default suite: one 2-node cluster --------------------------------------------------------

@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A 2-CPU head and one 2-CPU worker node ``w1``; Serve's proxy on w1 binds its own port. The detection
    graph starts deploying (``visionflow serve``, in the background) as soon as the cluster is up: its
    replicas start while the training test runs, which halves the wall time of the two tests on 2 cores."""
    proxy_port = free_port()
    cluster = start(2, {"w1": 2}, worker_env={"w1": {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(proxy_port)}})
    cluster.w1_proxy_port = proxy_port
    serving = None
    try:
        cfg = _serve_config(tmp_path_factory.mktemp("mn_serve") / "serve.yaml", free_port(), detector_cpus=0.25)
        serving = Command(_visionflow("serve", "--config", str(cfg), "--random-weights", "--address", cluster.address),
                          cluster.env)
        cluster.serving = serving
        yield cluster
    finally:
        if serving is not None:
            serving.stop()
        cluster.shutdown()


def test_training_spreads_its_two_workers_over_two_nodes(two_nodes, data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = Command(_visionflow("train", *TRAIN, "--data", str(data_dir), "--out", str(out), "--epochs", "1",
                              "--workers", "2", "--placement", "spread", "--cpus-per-worker", "0.5",
                              "--address", two_nodes.address), two_nodes.env)
    assert cmd.wait(300) == 0, cmd.out[-4000:]
    # The workers' own epoch line reaches the console; Ray Train's report of it and DDP's note on a 1x1
    # convolution's gradient strides (resnet18's downsampling) do not.
    assert "epoch 1/1 " in cmd.out and "Reporting training result" not in cmd.out, cmd.out[-4000:]
    assert "Grad strides do not match" not in cmd.out, cmd.out[-4000:]
    (record,) = _metrics(out)
    nodes = record["worker_nodes"]
    assert record["workers"] == 2 and len(nodes) == 2
    names = two_nodes.node_names()
    assert sorted(names[n] for n in nodes) == ["head", "w1"], (nodes, names)


def test_a_request_through_the_proxy_on_the_worker_node(two_nodes):
    """``proxy_location: EveryNode``, two detector replicas (at most one per node): one on each node, and a
    request answered by the proxy on w1 (a process of w1's, on the port w1's processes were given)."""
    serving = two_nodes.serving
    serving.wait_for("Ctrl-C to stop", 300)
    names = two_nodes.node_names()
    assert sorted(names[n] for n in _running_detector_nodes(two_nodes)) == ["head", "w1"]
    # The proxy on w1 comes up with the replica there.
    _wait(lambda: _listener_sessions(two_nodes.w1_proxy_port), 60, "a proxy listening on w1's port")
    assert _listener_sessions(two_nodes.w1_proxy_port) == {two_nodes.nodes["w1"].pgid}
    assert _detect(f"http://127.0.0.1:{two_nodes.w1_proxy_port}", _jpeg()) == 200
    serving.stop()
    assert "visionflow serve: stopped" in serving.out


# --- slow: nodes lost ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_data(ray_cluster, tmp_path_factory):
    """240 shapes images of 48 px ingested (train + val): epochs of several seconds."""
    from pipelines.data import ingest
    from vision.data.synth import write_synth

    coco = tmp_path_factory.mktemp("mn_coco")
    write_synth(coco, images=240, size=48, seed=1)
    out = tmp_path_factory.mktemp("mn_shards")
    for split in ("train", "val"):
        ingest(coco / "annotations" / f"instances_{split}.json", coco / split, out / split)
    return out


def _kill_mid_epoch(cluster: Cluster, cmd: Command, run: Path, epoch: int, epochs: int, arch: str = "resnet18") -> dict:
    """Kill (``kill -9``, every process of the node) a worker node holding a training worker in the middle of
    epoch ``epoch + 1`` (1-based): once epoch ``epoch``'s record is written and its checkpoint registered, and
    rank 0's progress bar of the next epoch has shown a step (``<arch> epoch N/E [...] step k``), 2 s later.
    Returns what happened."""
    _wait(lambda: len(_metrics(run)) >= epoch and _registered(run, epoch - 1), 1200, f"epoch {epoch} recorded", cmd)
    last = _metrics(run)[-1]
    started = _wait(lambda: cmd.first(f"{arch} epoch {epoch + 1}/{epochs} "), 600, f"epoch {epoch + 1} training", cmd)
    time.sleep(2)
    assert len(_metrics(run)) == epoch, "the epoch ended before the kill: epochs too short for this machine"
    names = cluster.node_names()
    victim = next(names[n] for n in last["worker_nodes"] if names[n] != "head")
    killed_at = cluster.kill_node(victim)
    return {"victim": victim, "victim_id": cluster.nodes[victim].node_id, "killed_at": killed_at,
            "into_epoch_s": killed_at - started, "epoch_seconds": last["train_seconds"] + last["val_seconds"]}


def _one_record_per_epoch(run: Path, epochs: int) -> list[dict]:
    records = _metrics(run)
    assert [r["epoch"] for r in records] == list(range(epochs)), [r["epoch"] for r in records]
    return records


@pytest.mark.slow
@pytest.mark.parametrize("cluster3", [{"head_cpus": 0, "workers": {"w1": 3, "w2": 3}}], indirect=True)
def test_a_node_lost_mid_training_resumes_from_its_last_checkpoint(cluster3, train_data, tmp_path):
    run = tmp_path / "run"
    cmd = Command(_visionflow("train", *TRAIN, "--data", str(train_data), "--out", str(run), "--epochs", "4",
                              "--workers", "2", "--placement", "spread", "--cpus-per-worker", "1",
                              "--max-failures", "3", "--address", cluster3.address), cluster3.env)
    try:
        kill = _kill_mid_epoch(cluster3, cmd, run, epoch=1, epochs=4)
        resumed = cmd.wait_for("resuming resnet18 from epoch 1/4", 600)
        _wait(lambda: len(_metrics(run)) >= 2, 600, "the interrupted epoch recorded", cmd)
        interrupted_done = time.time()
        assert cmd.wait(900) == 0, cmd.out[-4000:]
    finally:
        cmd.stop()
    records = _one_record_per_epoch(run, 4)
    assert records[0]["start_epoch"] == 0 and all(r["start_epoch"] == 1 for r in records[1:])
    assert all(kill["victim_id"] not in r["worker_nodes"] and r["workers"] == 2 for r in records[1:])
    later = [r["train_seconds"] + r["val_seconds"] for r in records[2:]]
    interrupted = interrupted_done - kill["killed_at"] + kill["into_epoch_s"]  # its first step to its record
    _report("node lost mid-training (2 workers)", {
        "killed": kill["victim"], "killed_into_epoch_s": round(kill["into_epoch_s"], 1),
        "kill_to_resumed_s": round(resumed - kill["killed_at"], 1),
        "interrupted_epoch_wall_s": round(interrupted, 1), "later_epochs_s": [round(x, 1) for x in later],
        # What the loss cost: the interrupted epoch's wall time beyond an epoch without a loss.
        "time_lost_s": round(interrupted - sum(later) / len(later), 1),
        "run_s": round(time.time() - cmd.t0, 1)}, cmd)


@pytest.mark.slow
@pytest.mark.parametrize("cluster3", [{"head_cpus": 1, "workers": {"w1": 2, "w2": 2}}], indirect=True)
def test_an_elastic_group_goes_on_with_one_worker_and_grows_when_a_node_joins(cluster3, train_data, tmp_path):
    """``--workers 1-2`` with 1.5 CPUs a worker: a 2-CPU node holds one worker, the 1-CPU head none (its CPU
    is for the data pipeline: with 0.5 CPU free per node and none elsewhere the shard reads never start).
    A worker node is lost in epoch 2: the group goes on with one worker; w3 joins: it grows to two again."""
    run = tmp_path / "run"
    epochs = 6
    cmd = Command(_visionflow("train", *TRAIN, "--data", str(train_data), "--out", str(run), "--epochs", str(epochs),
                              "--workers", "1-2", "--placement", "spread", "--cpus-per-worker", "1.5",
                              "--elastic-resize-interval-s", "10", "--max-failures", "6",
                              "--address", cluster3.address), cluster3.env)
    try:
        kill = _kill_mid_epoch(cluster3, cmd, run, epoch=1, epochs=epochs)
        # Going on with one worker: the next epoch recorded ran on w2 alone.
        _wait(lambda: len(_metrics(run)) >= 2, 600, "an epoch after the loss", cmd)
        alone = _metrics(run)[1]
        one_worker_at = time.time()
        cluster3.add_node("w3", 2)
        joined_at = time.time()
        grown = _wait(lambda: next((r for r in _metrics(run)[2:] if r["workers"] == 2), None), 900,
                      "an epoch with two workers again", cmd)
        assert cmd.wait(900) == 0, cmd.out[-4000:]
    finally:
        cmd.stop()
    records = _one_record_per_epoch(run, epochs)
    names = cluster3.node_names()
    assert records[0]["workers"] == 2
    survivor = ({"w1", "w2"} - {kill["victim"]}).pop()
    assert alone["workers"] == 1 and [names[n] for n in alone["worker_nodes"]] == [survivor]
    assert sorted(names[n] for n in grown["worker_nodes"]) == sorted([survivor, "w3"])
    # Each restart of the group (after the loss, after the join) prints where it resumes from.
    shrunk = cmd.first("resuming resnet18 from epoch", after=kill["killed_at"])
    regrown = cmd.first("resuming resnet18 from epoch", after=joined_at)
    _report("elastic 1-2 workers, node lost then joined", {
        "killed": kill["victim"], "killed_into_epoch_s": round(kill["into_epoch_s"], 1),
        "kill_to_resumed_with_one_s": round(shrunk - kill["killed_at"], 1),
        "kill_to_one_worker_epoch_recorded_s": round(one_worker_at - kill["killed_at"], 1),
        "node_join_s": round(joined_at - one_worker_at, 1),
        "joined_to_resumed_with_two_s": round(regrown - joined_at, 1),
        "workers_by_epoch": [r["workers"] for r in records],
        "grown_at_epoch": grown["epoch"] + 1, "run_s": round(time.time() - cmd.t0, 1)}, cmd)


@pytest.fixture
def cluster3(request):
    """A cluster per test (the tests kill its nodes): ``@pytest.mark.parametrize("cluster3", [spec], indirect=True)``."""
    spec = dict(request.param)
    cluster = start(spec.pop("head_cpus"), spec.pop("workers"), worker_env=spec.pop("worker_env", None), **spec)
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_serving_load_through_a_lost_node_gets_200_or_503_then_200(tmp_path):
    """Concurrency 8, a bounded number of requests to the head's proxy; the worker node holding a detector
    replica is killed: every answer is 200 or 503 (no other 5xx, none missing), Serve places a new replica
    on a node without one, and every request after that is answered 200."""
    ports = {"w1": free_port(), "w2": free_port()}
    cluster = start(2, {"w1": 1, "w2": 1},
                    worker_env={n: {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(p)} for n, p in ports.items()})
    port = free_port()
    serving = None
    try:
        serving = Command(_visionflow("serve", "--config", str(_serve_config(tmp_path / "serve.yaml", port)),
                                     "--random-weights", "--address", cluster.address), cluster.env)
        serving.wait_for("Ctrl-C to stop", 600)
        base, body = f"http://127.0.0.1:{port}", _jpeg()
        names = cluster.node_names()
        before = _running_detector_nodes(cluster)
        assert len(set(before)) == 2, before
        victim = next(names[n] for n in before if names[n] != "head")
        assert _detect(base, body) == 200

        results: list[tuple[float, float, int]] = []  # (sent, answered, status)
        total, warmup = 400, 40

        def one(_):
            t = time.time()
            status = _detect(base, body, timeout=90)
            results.append((t, time.time(), status))

        killed = {}

        def replaced() -> list[str] | None:
            nodes = _running_detector_nodes(cluster)
            return nodes if len(set(nodes)) == 2 and cluster.nodes[victim].node_id not in nodes else None

        def killer():
            _wait(lambda: len(results) >= warmup, 300, "warm-up requests")
            killed["at"] = cluster.kill_node(victim)
            # Serve places a new replica on a node that has none (max one per node).
            killed["replaced"] = _wait(replaced, 600, "a new detector replica", step=0.5)
            killed["replaced_at"] = time.time()

        k = threading.Thread(target=killer, daemon=True)
        k.start()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(total)))
        k.join(600)
        assert "at" in killed, "the node was not killed during the load: too few requests for this machine"
        assert "replaced" in killed, "no new detector replica"
        statuses = [s for _, _, s in results]
        assert len(statuses) == total and set(statuses) <= {200, 503}, sorted(set(statuses))
        after = [_detect(base, body) for _ in range(40)]  # once the new replica runs: every answer is 200
        assert after == [200] * 40, after
        bad = [u - killed["at"] for _, u, s in results if s != 200]  # when each 503 was answered, after the kill
        _report("node lost under serving load", {
            "killed": victim, "requests": total, "concurrency": 8, "answered_503": len(bad),
            "503s_answered_from_to_s_after_kill": [round(min(bad), 2), round(max(bad), 2)] if bad else None,
            "requests_sent_after_kill": sum(1 for t, _, _ in results if t >= killed["at"]),
            "load_went_on_after_kill_s": round(max(u for _, u, _ in results) - killed["at"], 1),
            "slowest_answer_s": round(max(u - t for t, u, _ in results), 2),
            "kill_to_replacement_running_s": round(killed["replaced_at"] - killed["at"], 1),
            "replicas_on": sorted(names.get(n, n) for n in killed["replaced"])}, serving)
    finally:
        if serving is not None:
            serving.stop()
        cluster.shutdown()


# --- slow: the pipeline as a job, ingest across nodes ----------------------------------------------

@pytest.fixture(scope="module")
def three_nodes():
    """A head with no CPUs (it runs job drivers and the dashboard) and two 2-CPU worker nodes: every task
    that needs a CPU runs on a worker node."""
    cluster = start(0, {"w1": 2, "w2": 2})
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_ingest_decodes_on_both_worker_nodes_into_shared_storage(three_nodes, tmp_path):
    from vision.data.synth import write_synth

    write_synth(tmp_path / "coco", images=128, size=48, seed=2)
    out = tmp_path / "shards" / "train"
    t0 = time.time()
    cmd = Command(_visionflow("ingest", "--annotations", str(tmp_path / "coco/annotations/instances_train.json"),
                              "--images", str(tmp_path / "coco/train"), "--out", str(out),
                              "--address", three_nodes.address), three_nodes.env)
    assert cmd.wait(600) == 0, cmd.out[-4000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    names = three_nodes.node_names()
    where = {shard: names[node] for shard, node in manifest["shard_nodes"].items()}
    assert set(where) == set(manifest["shards"]) and all((out / s).is_file() for s in manifest["shards"])
    assert set(where.values()) == {"w1", "w2"}, where
    _report("ingest on 2 worker nodes", {"images": manifest["num_images"], "shards_by_node": where,
                                         "ingest_s": round(time.time() - t0, 1)}, cmd)


@pytest.mark.slow
def test_the_pipeline_as_a_job_resumes_after_its_driver_is_killed(three_nodes, tmp_path):
    run = tmp_path / "run"
    archs = ["squeezenet1_1", "resnet18"]
    entry = ["visionflow", "run", "--config", "pipelines/configs/quickstart.yaml", "--run-dir", str(run),
             "--archs", ",".join(archs), "--no-deploy",
             "--set", "data.synth={images: 24, size: 48}", "--set", "train.max_parallel=1",
             "--set", "train.defaults={epochs: 1, batch_size: 8, cpus_per_worker: 0.5, augment_cpus: 0.25}",
             "--set", "train.per_task={classification: {image_size: 32}}"]
    submit = [str(BIN / "ray"), "job", "submit", "--address", three_nodes.dashboard, "--working-dir", "."]
    first = Command(submit + ["--submission-id", f"vf-first-{os.getpid()}", "--", *entry], three_nodes.env)
    try:
        # Stop the driver once the data stage and the first training have finished.
        _wait(lambda: (run / "data/_stage.json").exists() and (run / f"archs/{archs[0]}/train/_stage.json").exists(),
              900, "the first training finished", first)
        stopped_at = time.time()
        r = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", three_nodes.dashboard,
                            f"vf-first-{os.getpid()}"], env=three_nodes.env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        first.wait(300)
    finally:
        first.stop()
    assert not (run / "summary.json").exists(), "the first job finished before it was stopped"
    t0 = time.time()
    second = Command(submit + ["--", *entry], three_nodes.env)
    assert second.wait(1500) == 0, second.out[-4000:]
    resume_s = time.time() - t0
    out = second.out
    assert "data: skipped" in out and f"train/{archs[0]}: skipped" in out, out[-4000:]
    assert "everything finished" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == [] and len(summary["archs"]) == 2
    # Which node ran each stage: the head has no CPU, so every stage that takes one ran on a worker node.
    names = three_nodes.node_names()
    stages = {"data": run / "data", **{f"eval/{a}": run / f"archs/{a}/eval" for a in archs}, "compare": run / "compare"}
    ran_on = {s: names[json.loads((d / "_stage.json").read_text())["outputs"]["node_id"]] for s, d in stages.items()}
    assert set(ran_on.values()) <= {"w1", "w2"}, ran_on
    trained_on = {a: sorted({names[n] for r in _metrics(run / f"archs/{a}/train") for n in r["worker_nodes"]})
                  for a in archs}
    assert all(set(v) <= {"w1", "w2"} for v in trained_on.values()), trained_on
    skipped = sorted({line.split(":")[0].strip() for _, line in second.lines if line.endswith(": skipped")})
    train_stage_on = {a: names[json.loads((run / f"archs/{a}/train/_stage.json").read_text())["outputs"]["node_id"]]
                      for a in archs}  # the stage task only drives Ray Train (no CPU): it may run on the head
    _report("pipeline job: driver killed, resubmitted", {
        "stopped_after_s": round(stopped_at - first.t0, 1), "resumed_run_s": round(resume_s, 1),
        "skipped_on_resume": skipped, "stages_ran_on": ran_on, "train_stage_tasks_on": train_stage_on,
        "training_workers_on": trained_on}, first, second)
