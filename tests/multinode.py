"""A real multi-node Ray cluster on one machine: a head started with ``ray start --head`` (token auth on)
and worker nodes started with ``ray start --address``, each a separate raylet with its own logical CPUs and
a custom resource naming it (``{"node_head": 1}``, ``{"node_w1": 1}``, ...).

Every node runs in its own session (``start_new_session``): ``kill_node`` is ``kill -9`` of every process
of that session, the way a machine is lost: the ``ray start --block`` process, its raylet and the raylet's
agents (one process group), and the raylet's worker processes (Ray 2.60 puts each worker in a process group
of its own, ``RAY_process_group_cleanup_enabled``, so a group kill alone would leave them; they keep the
node's session). ``shutdown`` stops every session this harness started, then any process left that names
the cluster's own temp folder on its command line, also when a test failed. Nothing else on the machine is
touched: ``ray stop`` would stop every Ray cluster here.

The nodes of one cluster share one ``--temp-dir`` (what Ray's own ``cluster_utils`` does on one machine:
a node that joins takes the head's temp folder; its sockets get unique names in the shared session
folder). Worker nodes run no log monitor (the head's reads the shared logs folder, as in ``cluster_utils``),
and take random worker ports (``--min-worker-port 0``), so clusters on one machine never collide.

Used by ``tests/test_multinode.py`` (the ``multinode`` fixture) and by people: ``make cluster-demo`` (=
``python tests/multinode.py``) starts a head and two worker nodes, prints how to reach them and how to kill
one, and stops everything on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None
from pipelines.ray_runtime import RAY_START_ENV  # noqa: E402

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 200 * 2**20  # per node: the tests move a few MiB


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port this process has not handed out before: the kernel can give the same free port to two
    binds in a row, and `ray start` refuses two of its components on one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@dataclass
class Node:
    """One ``ray start`` process group: ``name`` ("head", "w1", ...), its resource ``node_<name>``."""

    name: str
    proc: subprocess.Popen
    log: Path
    cpus: float
    env: dict = field(default_factory=dict)  # what this node's processes see beyond the cluster's env
    node_id: str | None = None  # Ray's node id, once registered
    killed_at: float | None = None

    @property
    def pgid(self) -> int:
        """The ``ray start`` process's group, also the node's session id."""
        return self.proc.pid

    @property
    def resource(self) -> str:
        return f"node_{self.name}"

    def alive(self) -> bool:
        return self.proc.poll() is None or session_pids(self.pgid) != []


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: a node's processes, its workers included."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(proc.name))
    return found


def _kill_session(sid: int, sig: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _pids_naming(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (this cluster's own temp folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(int(proc.name))
    return found


class Cluster:
    """A head and worker nodes on this machine. ``env`` is what a client needs (token auth, the address):
    pass it to ``subprocess`` for ``visionflow ... --address``, ``ray job submit``, ``python -c``."""

    def __init__(self, root: str | Path | None = None, *, object_store_bytes: int = OBJECT_STORE_BYTES,
                 system_env: dict | None = None):
        # Short: Ray's socket paths have a length limit.
        self.root = Path(tempfile.mkdtemp(prefix="vfmn-", dir=root or "/tmp"))
        self.temp_dir = self.root / "r"
        self.token = uuid.uuid4().hex
        (self.root / "token").write_text(self.token)
        self.object_store_bytes = object_store_bytes
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not another cluster's
        base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.root / "token"),
                    PATH=f"{BIN}:{base.get('PATH', '')}", PYTHONUNBUFFERED="1", **RAY_START_ENV,
                    **(system_env or {}))
        self.nodes: dict[str, Node] = {}
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # The State API (Ray Train's placement-group cleaner asks it every second) at this cluster's dashboard,
        # not at the address file of the machine's last `ray start` (in Ray's default temp folder, not ours).
        base["RAY_API_SERVER_ADDRESS"] = self.dashboard
        self.node_env = base  # what every `ray start` runs with

    # --- what clients use ---------------------------------------------------------------------

    @property
    def env(self) -> dict:
        """A client's environment: token auth and RAY_ADDRESS naming this cluster."""
        return {**{k: v for k, v in self.node_env.items() if k not in RAY_START_ENV}, "RAY_ADDRESS": self.address}

    def api(self, path: str, timeout: float = 10) -> dict:
        """GET a dashboard endpoint (State API, Serve REST API) with the token."""
        req = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def node_table(self) -> list[dict]:
        """Every node the GCS knows, alive or dead: ``node_id``, ``state``, ``resources_total``, ..."""
        body = self.api("/api/v0/nodes?limit=1000&detail=true")
        return body["data"]["result"]["result"]

    def node_names(self) -> dict[str, str]:
        """``{node id: name}`` of every node this harness started (dead ones included)."""
        out = {}
        for n in self.node_table():
            for key in n.get("resources_total", {}):
                if key.startswith("node_") and key[5:] in self.nodes:
                    out[n["node_id"]] = key[5:]
        return out

    def node_id(self, name: str) -> str:
        node = self.nodes[name]
        if node.node_id is None:
            node.node_id = self._wait_registered(node)
        return node.node_id

    # --- starting, killing, stopping ----------------------------------------------------------

    def _ray_start(self, name: str, args: list[str], cpus: float, resources: dict | None, env: dict | None) -> Node:
        log = self.root / f"{name}.log"
        res = {f"node_{name}": 1, **(resources or {})}
        cmd = [str(BIN / "ray"), "start", "--block", "--num-cpus", f"{cpus:g}", "--resources", json.dumps(res),
               "--temp-dir", str(self.temp_dir), "--object-store-memory", str(self.object_store_bytes),
               "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats",
               "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
               "--metrics-export-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               *args]
        # Its own session: kill_node kills this group, never another node's or another cluster's processes.
        proc = subprocess.Popen(cmd, env={**self.node_env, **(env or {})}, cwd=self.root, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, log, cpus, dict(env or {}))
        self.nodes[name] = node
        return node

    def start_head(self, cpus: float = 1, resources: dict | None = None, env: dict | None = None,
                   timeout: float = 180, attempts: int = 3) -> Node:
        args = ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                str(self.dashboard_port), "--ray-client-server-port", str(free_port())]

        def started(node: Node) -> None:
            deadline = time.monotonic() + timeout
            while True:
                self._check_running(node)
                try:
                    self.api("/api/version", timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the head's dashboard did not answer within {timeout}s:\n{self._tail(node)}")
                    time.sleep(0.5)
            node.node_id = self._wait_registered(node, deadline - time.monotonic())

        return self._start_with_retries("head", args, cpus, resources, env, started, attempts)

    def add_node(self, name: str, cpus: float = 1, resources: dict | None = None, env: dict | None = None,
                 wait: bool = True, timeout: float = 180, attempts: int = 3) -> Node:
        """A worker node joining the head (``ray start --address``); ``env`` for its processes only (e.g.
        ``RAY_SERVE_WORKER_PROXY_HTTP_PORT``: Serve's proxy on this node binds that port)."""
        if name in self.nodes and self.nodes[name].alive():
            raise ValueError(f"node {name!r} is running")

        def started(node: Node) -> None:
            if wait:
                node.node_id = self._wait_registered(node, timeout)

        # One log monitor per machine: the head's reads the shared logs folder.
        return self._start_with_retries(name, ["--address", self.address, "--include-log-monitor", "false"], cpus,
                                        resources, env, started, attempts)

    def _start_with_retries(self, name: str, args: list[str], cpus: float, resources: dict | None,
                            env: dict | None, started, attempts: int) -> Node:
        """``ray start`` until ``started(node)`` returns; on a loaded machine a raylet can give up waiting
        for its agents ("timed out during startup", as ``pipelines.ray_runtime.connect`` knows): that node is
        stopped and started again, up to ``attempts`` times."""
        for attempt in range(attempts):
            node = self._ray_start(name, args, cpus, resources, env)
            try:
                started(node)
                return node
            except RuntimeError as e:
                if attempt == attempts - 1 or "timed out during startup" not in str(e):
                    raise
                print(f"multinode: node {name} timed out during startup; starting it again", file=sys.stderr,
                      flush=True)
                _killpg(node.pgid, signal.SIGKILL)
                _kill_session(node.pgid, signal.SIGKILL)
                node.proc.wait(30)
        raise AssertionError("unreachable")

    def _wait_registered(self, node: Node, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while True:
            self._check_running(node)
            try:
                for n in self.node_table():
                    if n.get("state") == "ALIVE" and node.resource in n.get("resources_total", {}):
                        return n["node_id"]
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.name} did not register within {timeout:.0f}s:\n{self._tail(node)}")
            time.sleep(0.5)

    def _check_running(self, node: Node) -> None:
        if node.proc.poll() is not None:
            raise RuntimeError(f"ray start for node {node.name} exited with {node.proc.returncode}:\n{self._tail(node)}")

    @staticmethod
    def _tail(node: Node, n: int = 3000) -> str:
        try:
            return node.log.read_text()[-n:]
        except OSError:
            return ""

    def kill_node(self, name: str, wait_dead: bool = False, timeout: float = 120) -> float:
        """``kill -9`` every process of the node's session (raylet, agents, workers), as losing the machine
        does. Returns the time of the kill (``time.time()``). ``wait_dead``: also wait until the GCS marks it
        DEAD."""
        node = self.nodes[name]
        node_id = node.node_id
        node.killed_at = time.time()
        _killpg(node.pgid, signal.SIGKILL)  # the raylet first: it would start new workers
        _kill_session(node.pgid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while session_pids(node.pgid) and time.monotonic() < deadline:
            _kill_session(node.pgid, signal.SIGKILL)
            time.sleep(0.2)
        try:
            node.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        if wait_dead and node_id:
            self.wait_dead(node_id, timeout)
        return node.killed_at

    def wait_dead(self, node_id: str, timeout: float = 120) -> float:
        """Wait until the GCS reports ``node_id`` DEAD; returns when (``time.time()``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                states = {n["node_id"]: n.get("state") for n in self.node_table()}
                if states.get(node_id) == "DEAD":
                    return time.time()
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"node {node_id} was not marked dead within {timeout}s")

    def shutdown(self, grace_s: float = 3) -> None:
        """Stop every node this harness started: SIGTERM to each ``ray start`` group (it stops its node's
        processes), SIGKILL to whatever of the node's session is left after ``grace_s``; then anything left
        that names this cluster's temp folder. Removes the temp folder."""
        order = [n for n in self.nodes.values() if n.name != "head"] + [n for n in self.nodes.values() if n.name == "head"]
        for node in order:
            if node.proc.poll() is None:
                _killpg(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in order:
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(node.pgid, signal.SIGKILL)
            _kill_session(node.pgid, signal.SIGKILL)  # the workers, each in a process group of its own
        for _ in range(3):
            left = _pids_naming(str(self.temp_dir)) + _pids_naming(str(self.root))
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start(head_cpus: float = 1, workers: dict[str, float] | None = None, *, head_env: dict | None = None,
          worker_env: dict[str, dict] | None = None, **kwargs) -> Cluster:
    """A cluster with a head of ``head_cpus`` and one worker node per ``{name: cpus}``; on any failure
    what was started is stopped again."""
    cluster = Cluster(**kwargs)
    try:
        cluster.start_head(head_cpus, env=head_env)
        for name, cpus in (workers or {}).items():
            cluster.add_node(name, cpus, env=(worker_env or {}).get(name))
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


try:  # the pytest fixture (this module is also run by people, without pytest)
    import pytest

    @pytest.fixture
    def multinode(request):
        """A started cluster: ``@pytest.mark.parametrize("multinode", [{"head_cpus": 1, "workers":
        {"w1": 2}}], indirect=True)`` (default: a 1-CPU head and one 2-CPU worker node). Every process it
        started is stopped at the end, also when the test failed."""
        spec = dict(getattr(request, "param", None) or {"head_cpus": 1, "workers": {"w1": 2}})
        cluster = start(**spec)
        try:
            yield cluster
        finally:
            cluster.shutdown()
except ImportError:  # pragma: no cover
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start a head and worker nodes on this machine until Ctrl-C.")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--head-cpus", type=float, default=1)
    p.add_argument("--cpus", type=float, default=2, help="logical CPUs per worker node (default 2)")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    cluster = start(a.head_cpus, {f"w{i + 1}": a.cpus for i in range(a.workers)})
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    try:
        print(f"multi-node Ray cluster up in {time.monotonic() - t0:.0f}s (temp dir {cluster.temp_dir})")
        for name, node in cluster.nodes.items():
            print(f"  {name:5s} node {node.node_id}  {node.cpus:g} CPU  resource {node.resource}  "
                  f"kill it: pkill -9 -s {node.pgid}")
        print(f"dashboard {cluster.dashboard} (token in {cluster.root / 'token'})\nin another shell:\n"
              f"  export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.root / 'token'}\n"
              f"  visionflow synth --out /tmp/vfdemo/coco --images 48 --size 48\n"
              f"  visionflow ingest --annotations /tmp/vfdemo/coco/annotations/instances_train.json "
              f"--images /tmp/vfdemo/coco/train --out /tmp/vfdemo/shards/train   (and the same for val)\n"
              f"  visionflow train --arch resnet18 --data /tmp/vfdemo/shards --out /tmp/vfdemo/run --workers 2 "
              f"--placement spread --epochs 4 --max-failures 3 --image-size 32 --batch-size 8\n"
              "Ctrl-C stops every node.", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
            for name, node in list(cluster.nodes.items()):
                if node.killed_at is None and node.proc.poll() is not None:
                    node.killed_at = time.time()
                    print(f"node {name} is gone", flush=True)
    finally:
        cluster.shutdown()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
