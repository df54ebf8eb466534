"""The other areas' entry points, as the DAG calls them: the one place that knows their Python names.

Each takes plain paths (local or URI) and returns plain dicts, so the stages stay free of their details.
"""
from __future__ import annotations


def train(settings: dict, data_dir: str, out_dir: str) -> dict:
    """Train one architecture (``settings``: TrainConfig fields incl. task and arch) on ``data_dir``,
    keeping the run under ``out_dir`` (rerun = resume). Returns ``{"run_dir", "checkpoint", "final", "epochs_run"}``."""
    from pipelines.train import TrainConfig, fit

    result = fit(TrainConfig.model_validate({**settings, "data": data_dir, "out": out_dir}))
    return _plain({"run_dir": result["run_dir"], "checkpoint": result["checkpoint"], "final": result["metrics"],
                   "epochs_run": result["epochs_run"], "phases": result.get("phases")})


def train_lane(members: list[tuple[dict, str]], data_dir: str, reporter=None) -> list[dict | str | None]:
    """Train several architectures (``(settings, out_dir)`` each, single-worker) one after another in one
    Ray Train run (``pipelines.train.lane``). Returns per member what ``train`` returns, the error text
    that ended it, or None when the lane never finished it."""
    from pipelines.train import TrainConfig
    from pipelines.train.lane import fit_lane

    cfgs = [TrainConfig.model_validate({**settings, "data": data_dir, "out": out}) for settings, out in members]
    out = []
    for result in fit_lane(cfgs, reporter=reporter):
        if result is None or isinstance(result, BaseException):
            out.append(None if result is None else f"{type(result).__name__}: {result}")
        else:
            out.append(_plain({"run_dir": result["run_dir"], "checkpoint": result["checkpoint"],
                               "final": result["metrics"], "epochs_run": result["epochs_run"],
                               "phases": result.get("phases"), "seconds": result["seconds"]}))
    return out


def evaluate(train_dir: str, data_dir: str, out_dir: str, from_training: bool = True) -> dict:
    """Metrics of the latest checkpoint of ``train_dir`` on the val split of ``data_dir``: with
    ``from_training``, its training's last validation pass where that pass was of this checkpoint on this
    data (``metrics_from_training``), else evaluated again."""
    from pipelines.train import evaluate_checkpoint
    from pipelines.train.evaluate import metrics_from_training

    found = metrics_from_training(train_dir, data_dir, out=out_dir) if from_training else None
    return _plain(found if found is not None else evaluate_checkpoint(train_dir, data_dir, out=out_dir))


def compare(train_dirs: list[str], out_dir: str) -> dict:
    """The overall comparison (Markdown table + PNG chart) of the given runs; returns their paths."""
    from pipelines.reports.compare import compare as build_comparison

    return _plain(build_comparison(train_dirs, out_dir))


def robustness(train_dirs: list[str], data_dir: str, out_dir: str, cfg: dict) -> dict:
    """Robustness report (+ layer visualizations) of the given classifiers side by side, written to the
    local ``out_dir``; returns the paths it wrote."""
    from pipelines.data import quiet_data_console
    from pipelines.reports.robustness import robustness_report

    quiet_data_console()  # the stage's own lines say how far it is (for this worker process from now on)
    return _plain(robustness_report(train_dirs, data_dir, out_dir, epsilons=cfg["epsilons"], images=cfg["images"],
                                    visualize=cfg["visualize"]))


def _plain(obj):
    """JSON-able copy of a result (paths as strings, numbers as floats)."""
    import json

    return json.loads(json.dumps(obj, default=lambda o: str(o) if not hasattr(o, "item") else o.item()))
