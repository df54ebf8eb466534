"""The run as a graph of Ray tasks: data -> train x N -> eval x N, then [robustness ->] compare beside
deploy -> smoke (both need only the evaluations), then finish.

``build_dag`` only describes the graph (``Node``s: a stage function, its arguments and its Ray options);
``submit`` starts it with plain ``ray.remote(...).remote()`` calls, dependencies first, each node's
upstream nodes passed as their ObjectRefs. As with any Ray task, a ref given directly as an argument is
resolved before the stage runs, while refs nested in a list are handed over as refs (so one crashed
branch cannot fail the stage that gathers the branches). ``plan_lines`` and ``plot_plan`` describe a
built graph (``visionflow run --plan``) without running anything.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from pipelines.dag import stages
from pipelines.dag.config import RunConfig
from pipelines.dag.lanes import assign as assign_lanes, estimated_seconds


AFTER = "after/"  # helper nodes that order a training lane; the plan shows their edges, not them


@dataclass(eq=False)
class Node:
    """One stage task of the graph: ``fn(*args)`` run as a Ray task named ``name`` with ``options``.
    Arguments that are ``Node``s (directly or inside a list) are its upstream stages."""

    name: str
    fn: Callable
    args: tuple = ()
    options: dict = field(default_factory=dict)

    def children(self) -> list["Node"]:
        """The upstream nodes, in the order the arguments name them (each once)."""
        out: list[Node] = []
        for a in self.args:
            for item in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(item, Node) and item not in out:
                    out.append(item)
        return out


def build_dag(cfg: RunConfig, board=None, runtime_env: dict | None = None, driver_node: str | None = None,
              lanes: int | None = None) -> Node:
    """Describe every stage of ``cfg`` as one graph whose output is the run's summary dict. ``runtime_env``
    is given to every stage task (and so to the Ray Train and Ray Data work it starts); ``driver_node``
    (a node id) is where deploy and smoke run: the node whose HTTP proxy the printed URL names. ``lanes``
    (default ``train.max_parallel``) is how many architectures train at once (``placement.plan``)."""
    on_driver = {}
    if driver_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        on_driver = {"scheduling_strategy": NodeAffinitySchedulingStrategy(driver_node, soft=False)}

    def _node(fn, name: str, **options) -> Callable[..., Node]:
        # Named after its stage, so the dashboard and the plan show stage names.
        if runtime_env:
            options["runtime_env"] = runtime_env
        return lambda *args: Node(name, fn, args, options)

    run = cfg.run_dir
    archs = cfg.archs()
    data = _node(stages.data_stage, "data", num_cpus=1)(run, cfg.data.model_dump(), board)
    # Lanes, each training and then evaluating its architectures one after another: a training is not
    # even scheduled (no process, no memory) until the branch before it in its lane has ended, however it
    # ended, so the lanes never ask for more than the cluster has (pipelines.dag.placement). Each lane
    # gets about the same estimated work (pipelines.dag.lanes).
    settings = {arch: cfg.train_settings(arch) for arch in archs}
    plan = assign_lanes(archs, {a: estimated_seconds(a, s, cfg.eval.enabled) for a, s in settings.items()},
                        lanes or cfg.train.max_parallel)
    # A lane's single-worker trainings share one Ray Train run (stages.train_stage, pipelines.train.lane);
    # the token tells this run's lane records from an earlier run's.
    token = uuid.uuid4().hex[:12]
    branches = {}
    for members in plan:
        after = None
        for j, arch in enumerate(members):
            peers = [[a, settings[a]] for a in members[j + 1:]]
            # The stage task only drives the trainer; the Ray Train workers ask for their own CPUs/GPUs.
            # One retry: a driver process that died resumes from the last checkpoint.
            branch = _node(stages.train_stage, f"train/{arch}", num_cpus=0, max_retries=1)(
                run, arch, settings[arch], data, after, board,
                {"token": token, "peers": peers} if cfg.train.share_workers else None)
            if cfg.eval.enabled:
                branch = _node(stages.eval_stage, f"eval/{arch}", num_cpus=cfg.eval.num_cpus,
                               num_gpus=cfg.eval.num_gpus, max_retries=0)(
                    run, arch, cfg.eval.model_dump(), branch, data, board)
            after = _node(stages.settle, f"{AFTER}{arch}", num_cpus=0)([branch])
            branches[arch] = branch
    evals = [branches[arch] for arch in archs]  # the comparison reads them in the run's order
    # Branches go in a list: Ray does not resolve nested refs, so one crashed branch cannot fail the gather.
    robustness = None
    if cfg.robustness.enabled:
        robustness = _node(stages.robustness_stage, "robustness", num_cpus=1)(
            run, cfg.robustness.model_dump(), evals, data, board)
    compare = _node(stages.compare_stage, "compare", num_cpus=0.5 if cfg.compare.enabled else 0)(
        run, evals, archs, cfg.compare.enabled, robustness, board)
    deployed, smoke = {"status": "disabled"}, {"status": "disabled"}
    if cfg.deploy.enabled:
        # Beside the comparison, not after it: the choice needs only the evaluations, and the comparison's
        # model-size measurements overlap the Serve start (docs/pipeline.md).
        deployed = _node(stages.deploy_stage, "deploy", num_cpus=0, **on_driver)(
            run, cfg.deploy.model_dump(), evals, archs, board)
        if cfg.smoke.enabled:
            smoke = _node(stages.smoke_stage, "smoke", num_cpus=0, **on_driver)(
                run, cfg.smoke.model_dump(), deployed, data, board)
    return _node(stages.finish_stage, "finish", num_cpus=0)(run, compare, smoke, deployed, robustness)


def dag_nodes(dag: Node) -> list[Node]:
    """Every node of the graph, dependencies first."""
    order: list[Node] = []
    seen: set[int] = set()

    def visit(node: Node):
        if id(node) in seen:
            return
        seen.add(id(node))
        for child in node.children():
            visit(child)
        order.append(node)

    visit(dag)
    return order


@ray.remote(num_cpus=0)
class _LaneGate:
    """Where every lane waits for the branch before its next training: one async actor (one process) for
    all of them. (A Ray task per wait held an idle worker process each for the whole run: 27 in make run.)"""

    async def settle(self, refs: list) -> None:
        """Return once the given tasks have ended, successfully or not (the refs are nested in a list, so
        Ray hands them over unresolved and a failure upstream cannot fail this call)."""
        await asyncio.gather(*refs, return_exceptions=True)


_gates: list = []  # the gates of running graphs: a handle dropped would end its actor


def release() -> None:
    """End the lane gates of the graphs submitted from this process (their runs have ended)."""
    while _gates:
        ray.kill(_gates.pop())


def submit(dag: Node) -> tuple["ray.ObjectRef", dict[str, "ray.ObjectRef"]]:
    """Start every stage task of the graph, dependencies first; returns the output's ObjectRef and
    ``{stage name: ObjectRef}`` of every stage. Nothing waits here: Ray starts a task once the refs
    passed to it directly are ready. The lanes' ordering nodes (``after/<arch>``) are calls of one
    ``_LaneGate`` actor, not tasks; ``release()`` ends it after the run."""
    refs: dict[int, ray.ObjectRef] = {}
    gate = None

    def arg(a: Any):
        if isinstance(a, Node):
            return refs[id(a)]
        if isinstance(a, list):
            return [arg(x) for x in a]
        return a

    named = {}
    for node in dag_nodes(dag):
        if node.fn is stages.settle:
            if gate is None:
                # Restarted, with its pending waits retried, if its process dies.
                gate = _LaneGate.options(max_restarts=-1, max_task_retries=-1).remote()
                _gates.append(gate)
            ref = gate.settle.options(name=node.name).remote(*[arg(a) for a in node.args])
        else:
            ref = ray.remote(node.fn).options(name=node.name, **node.options).remote(*[arg(a) for a in node.args])
        refs[id(node)] = named[node.name] = ref
    return refs[id(dag)], named


def dag_edges(dag: Node) -> tuple[list[str], list[tuple[str, str]]]:
    """The stage names in execution order (dependencies first) and the (upstream, downstream) edges;
    a lane's ordering helper is replaced by an edge from the training it waits for."""
    order = dag_nodes(dag)

    def sources(node: Node) -> list[str]:
        if not node.name.startswith(AFTER):
            return [node.name]
        return [s for c in node.children() for s in sources(c)]

    names = [n.name for n in order if not n.name.startswith(AFTER)]
    edges = [(src, n.name) for n in order if not n.name.startswith(AFTER)
             for c in n.children() for src in sources(c)]
    return names, edges


def plan_lines(dag: Node) -> list[str]:
    """The DAG as text, one stage a line with what it waits for."""
    names, edges = dag_edges(dag)
    ups = {n: [u for u, d in edges if d == n] for n in names}
    width = max(len(n) for n in names)
    lines = []
    for n in names:
        deps = ups[n]
        if len(deps) > 4:
            shown = f"{', '.join(deps[:3])}, ... ({len(deps)} stages)"
        else:
            shown = ", ".join(deps) or "-"
        lines.append(f"{n:<{width}}  <- {shown}")
    return lines


def _levels(names: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    level = {n: 0 for n in names}
    for n in names:  # names are in dependency order
        for u, d in edges:
            if d == n:
                level[n] = max(level[n], level[u] + 1)
    return level


def plot_plan(dag: Node, path: str) -> str:
    """Draw the DAG as a PNG (stages as boxes by dependency level, arrows for dependencies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, edges = dag_edges(dag)
    level = _levels(names, edges)
    columns: dict[int, list[str]] = {}
    for n in names:
        columns.setdefault(level[n], []).append(n)
    tallest = max(len(c) for c in columns.values())
    pos = {}
    for lv, col in columns.items():
        for i, n in enumerate(col):
            pos[n] = (lv, (len(col) - 1) / 2 - i)
    fig_h = max(3.0, 0.4 * tallest + 1)
    fig, ax = plt.subplots(figsize=(2.3 * (max(columns) + 1) + 1, fig_h))
    colors = {"data": "#9ecae1", "train": "#fdae6b", "eval": "#a1d99b", "compare": "#bcbddc",
              "robustness": "#fdd0a2", "deploy": "#fc9272", "smoke": "#fcbba1", "finish": "#d9d9d9"}
    for u, d in edges:
        (x0, y0), (x1, y1) = pos[u], pos[d]
        ax.annotate("", xy=(x1 - 0.38, y1), xytext=(x0 + 0.38, y0),
                    arrowprops={"arrowstyle": "->", "color": "#777777", "lw": 0.6})
    for n, (x, y) in pos.items():
        ax.text(x, y, n, ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round", "fc": colors.get(n.split("/")[0], "#eeeeee"), "ec": "#555555"})
    ax.set_xlim(-0.6, max(columns) + 0.6)
    ax.set_ylim(-tallest / 2 - 0.2, tallest / 2 + 0.2)
    ax.axis("off")
    ax.set_title(f"visionflow run: {len(names)} stages")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
