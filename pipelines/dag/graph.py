"""The run as a Ray DAG (``.bind()`` / ``execute()``): data -> train x N -> eval x N [-> robustness]
-> compare -> deploy -> smoke -> finish. Building it runs nothing; ``plan_lines`` and
``plot_plan`` describe a built DAG (``visionflow run --plan``).
"""
from __future__ import annotations

import ray
from ray.dag import DAGNode

from pipelines.dag import stages
from pipelines.dag.config import RunConfig


AFTER = "after/"  # helper nodes that order a training lane; the plan shows their edges, not them


def build_dag(cfg: RunConfig, board=None, runtime_env: dict | None = None, driver_node: str | None = None) -> DAGNode:
    """Bind every stage of ``cfg`` into one DAG whose output is the run's summary dict. ``runtime_env``
    is given to every stage task (and so to the Ray Train and Ray Data work it starts); ``driver_node``
    (a node id) is where deploy and smoke run: the node whose HTTP proxy the printed URL names."""
    on_driver = {}
    if driver_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        on_driver = {"scheduling_strategy": NodeAffinitySchedulingStrategy(driver_node, soft=False)}

    def _remote(fn, name: str, **options):
        # Named after its stage, so the dashboard and the plan show stage names.
        if runtime_env:
            options["runtime_env"] = runtime_env
        return ray.remote(fn).options(name=name, **options)

    run = cfg.run_dir
    archs = cfg.archs()
    data = _remote(stages.data_stage, "data", num_cpus=1).bind(run, cfg.data.model_dump(), board)
    evals = []
    # max_parallel lanes, each training its architectures one after another: a training is not even
    # scheduled (no process, no memory) until the one before it in its lane has ended, however it ended.
    lanes: list = [None] * cfg.train.max_parallel
    for i, arch in enumerate(archs):
        lane = i % len(lanes)
        # The stage task only drives the trainer; the Ray Train workers ask for their own CPUs/GPUs.
        # One retry: a driver process that died resumes from the last checkpoint.
        train = _remote(stages.train_stage, f"train/{arch}", num_cpus=0, max_retries=1).bind(
            run, arch, cfg.train_settings(arch), data, lanes[lane], board)
        lanes[lane] = _remote(stages.settle, f"{AFTER}{arch}", num_cpus=0).bind([train])
        if cfg.eval.enabled:
            train = _remote(stages.eval_stage, f"eval/{arch}", num_cpus=cfg.eval.num_cpus,
                            num_gpus=cfg.eval.num_gpus, max_retries=0).bind(
                run, arch, cfg.eval.model_dump(), train, data, board)
        evals.append(train)
    # Branches go in a list: Ray does not resolve nested refs, so one crashed branch cannot fail the gather.
    robustness = None
    if cfg.robustness.enabled:
        robustness = _remote(stages.robustness_stage, "robustness", num_cpus=1).bind(
            run, cfg.robustness.model_dump(), evals, data, board)
    compare = _remote(stages.compare_stage, "compare", num_cpus=0.5 if cfg.compare.enabled else 0).bind(
        run, evals, archs, cfg.compare.enabled, robustness, board)
    deployed, smoke = {"status": "disabled"}, {"status": "disabled"}
    if cfg.deploy.enabled:
        deployed = _remote(stages.deploy_stage, "deploy", num_cpus=0, **on_driver).bind(
            run, cfg.deploy.model_dump(), compare, board)
        if cfg.smoke.enabled:
            smoke = _remote(stages.smoke_stage, "smoke", num_cpus=0, **on_driver).bind(
                run, cfg.smoke.model_dump(), deployed, data, board)
    return _remote(stages.finish_stage, "finish", num_cpus=0).bind(run, compare, smoke, deployed, robustness)


def _stage_name(node: DAGNode) -> str:
    return node.get_options().get("name") or getattr(getattr(node, "_body", None), "__name__", "node")


def dag_nodes(dag: DAGNode) -> list[DAGNode]:
    """Every node of the DAG, dependencies first."""
    order: list[DAGNode] = []
    seen: set[int] = set()

    def visit(node: DAGNode):
        if id(node) in seen:
            return
        seen.add(id(node))
        for child in node._get_all_child_nodes():
            visit(child)
        order.append(node)

    visit(dag)
    return order


def stage_refs(dag: DAGNode) -> dict[str, "ray.ObjectRef"]:
    """``{stage name: ObjectRef}`` of the last ``dag.execute(_ray_cache_refs=True)``."""
    cache = getattr(dag, "cache_from_last_execute", {}) or {}
    return {_stage_name(n): cache[n._stable_uuid] for n in dag_nodes(dag) if n._stable_uuid in cache}


def dag_edges(dag: DAGNode) -> tuple[list[str], list[tuple[str, str]]]:
    """The stage names in execution order (dependencies first) and the (upstream, downstream) edges;
    a lane's ordering helper is replaced by an edge from the training it waits for."""
    order = dag_nodes(dag)

    def sources(node) -> list[str]:
        name = _stage_name(node)
        if not name.startswith(AFTER):
            return [name]
        return [s for c in node._get_all_child_nodes() for s in sources(c)]

    names = [_stage_name(n) for n in order if not _stage_name(n).startswith(AFTER)]
    edges = [(src, _stage_name(n)) for n in order if not _stage_name(n).startswith(AFTER)
             for c in n._get_all_child_nodes() for src in sources(c)]
    return names, edges


def plan_lines(dag: DAGNode) -> list[str]:
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


def plot_plan(dag: DAGNode, path: str) -> str:
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
