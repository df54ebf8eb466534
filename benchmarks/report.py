"""Generate ``docs/benchmarks.md`` from ``benchmarks/results/*.json``: ``python -m benchmarks.report``.

Every figure on that page is read from a results file here; none is typed by hand. One section per
results file: what it measures (the only hand-written text, and it holds no measured figure), where the
run's command, date, load average and core count come from (``not recorded`` when the file lacks them;
nothing is guessed), then the file's figures as tables.

``python -m benchmarks.report --check`` exits 1 when ``docs/benchmarks.md`` differs from what the
results would give now (``tests/test_docs.py`` runs the same comparison).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = ROOT / "docs" / "benchmarks.md"
COMMAND = "python -m benchmarks.report"
NOT_RECORDED = "not recorded"

# Field names a results file may use for the facts of the run itself (first found wins). Looked up at
# the top level of the file and in its ``config`` section.
PROVENANCE = {
    "command": ("command", "argv", "cmdline"),
    "date": ("date", "datetime", "timestamp", "started_at", "measured_at"),
    "load average": ("load_average", "loadavg", "load_avg", "load"),
    "cores": ("cores", "cpu_count", "num_cores"),
}

# What each results file measures and how to read it. Hand-written; must not hold a measured figure.
DESCRIPTIONS = {
    "adversarial_cost": (
        "Throughput of attacks, adversarial-input detectors and the deconvnet projection against plain "
        "inference of the same model (ZFNet, random weights, CPU), in one run. `ratio_to_inference` is "
        "each case's images/s over inference's. `deconvnet_over_gradient` compares the deconvnet's "
        "backward rules with a plain gradient projection of the same activation."),
    "coco_eval": (
        "`vision.metrics.CocoEvaluator` against pycocotools called directly (`loadRes` + `COCOeval`) on "
        "the same synth images, bbox and segm; the 12 numbers of each type are checked equal. The plain "
        "side gets its inputs ready-made (a ground-truth JSON on disk, result dicts in memory); ours also "
        "builds the ground truth from dataset rows and RLE-encodes every predicted mask. `ratio` = ours / "
        "plain (above 1: slower). `metrics` are the COCOeval numbers of the benchmark's synthetic "
        "predictions, not of a trained model."),
    "data_ingest_memory": (
        "Peak memory of writing a synth set and ingesting it (`python -m benchmarks.data_throughput "
        "--ingest-memory N`): the driver's peak RSS (`getrusage`), the summed peak RSS of the cluster's "
        "other processes (raylet, GCS, workers; sampled from `/proc`, shared pages counted once per "
        "process that maps them) and the object store's peak (`ray memory --stats-only`)."),
    "data_throughput": (
        "One epoch of the Ray Data pipeline (`load_split` -> `augment(task=\"detection\")` -> "
        "`iter_batches` + `collate_detection`, execution start-up included) against "
        "`torchvision.datasets.CocoDetection` + `DataLoader` with the same flip, scale jitter, sanitize "
        "and to-float; the views decode the shards' images with `config.decoder` (TorchCodec's, or PIL "
        "where it does not load), CocoDetection with PIL. Each column is its own run (`--images`, "
        "`--decoder`). Rounds "
        "of the sides alternate, each side first in turn; "
        "`images_per_s` is the best round of each side, `all_runs` every round, `first_batch_s` each "
        "round's seconds to the first batch (Ray Data's first round starts its augmentation processes, "
        "each importing torch and torchvision; later rounds reuse them; the DataLoader forks its workers "
        "every round, in a process of its own started before Ray). The decode ceilings are decoding alone with `config.decoder`, in one and in four "
        "processes. "
        "Two more sides say where the time goes: `ray_data_read_only` is `load_split` -> `iter_batches` "
        "with nothing done to the rows and the batches left in Arrow: Ray Data's execution and hand-off "
        "with no work in them, an upper bound for Ray Data here (lighter than the views in more than the "
        "work: encoded rows, no block cap, no numpy batches or collate; "
        "`ratio_ray_read_only_vs_dataloader` its ratio); `views_in_one_process` is the views' functions "
        "(`augment_table` + `collate_detection`) in the driver on one torch thread, without Ray, after a "
        "warm-up batch. "
        "Target: `ratio_ray_vs_dataloader` >= 2.0, >= 0.3 of the decode ceiling, the first "
        "batch no later than the DataLoader's."),
    "detection_diagnosis": (
        "A trained detector scored four ways (`python -m benchmarks.detection_diagnosis RUN DATA --label "
        "NAME`): on val and on train (seen without augmentation), each class-aware and class-agnostic "
        "(every class merged into one, so only finding the objects counts). A high agnostic AP with a low "
        "class-aware AP means the objects are found but misnamed; train far above val means memorized. "
        "Each entry is its own run, named by its label."),
    "detection_quality": (
        "Each detector trained from scratch (`weights=None`) with the task plug-ins on synth shapes and "
        "scored with COCOeval on the val split, next to a chance baseline (random boxes of ground-truth "
        "sizes) scored the same way in the same run. `engine` `ray` trains through Ray Train's `fit()`. "
        "`seconds` is the wall time of the whole run (Ray start-up, training, the val evaluation after "
        "every epoch); `train_images` counts images seen over all epochs. Each column is its own run. "
        "Targets: Faster R-CNN bbox AP50 >= 0.7, Mask R-CNN segm AP50 >= 0.6, YOLO bbox AP50 >= 0.5, "
        "SSDlite and R-CNN clearly above chance."),
    "detection_vs_reference": (
        "Learning against a reference: a torchvision Faster R-CNN from scratch (one entry per architecture: "
        "torchvision's MobileNetV3-Large 320 FPN builder, or torchvision's FasterRCNN classes with a "
        "ResNet-18 FPN) trained by a plain loop in the style of torchvision's references/detection, and by "
        "visionflow's Ray Train run of the same network, on the same synth data, epochs, seed, initial weights "
        "(`same_initial_weights`) and settings. `ap50_difference` is visionflow's bbox AP50 minus the "
        "reference's (target within 0.03; with `--seeds`, each side's AP50 is the mean over the seeds and this the "
        "mean of the per-seed differences, `*_by_seed` beside them); `visionflow_weights_scored_as_reference` scores visionflow's weights "
        "with torchvision's post-processing and pycocotools, separating training from post-processing; "
        "`speed_ratio_reference_over_visionflow` is the reference's wall time over visionflow's (target "
        ">= 0.9; with `--seeds`, of the totals), each side training and validating after every epoch."),
    "nms": (
        "`vision.ops` NMS against a baseline on the same random boxes (80 classes, IoU threshold as "
        "recorded); kept indices are checked equal and calls of the two sides interleave. `batched_nms` "
        "is torchvision's kernel behind input checks (the baseline is torchvision's own); Soft-NMS's "
        "baseline is the paper's per-box Python loop. `ratio` = ours / baseline (below 1: faster)."),
    "ray_step_overhead": (
        "What running under Ray costs the training steps themselves: the same Faster R-CNN ResNet-18 FPN "
        "steps (AdamW, batch 8 of 128 px synthetic images) in a plain process, beside an idle local Ray "
        "cluster, beside an idle Ray Train run (controller, cleaner, synchronization actor, waiting worker) "
        "and inside a Ray Train worker, each case its own process, in that order, then plain again "
        "(`plain_after`: drift). `ratio_to_plain` is a case's median seconds per step over the first plain "
        "case's; `other_processes_cores` the CPU every other process of the machine used meanwhile."),
    "roi_align": (
        "R-CNN training steps on the CPU (batch 4, synthetic images with 3 objects each, AdamW) with "
        "visionflow's RoI pools (`vision/ops/roi_align.py`: RoIAlign's training pass as a sparse matrix "
        "product) against the same network with torchvision's `MultiScaleRoIAlign`, same weights, steps of "
        "the two sides interleaved in rounds. `speedup` = torchvision's median ms per step over visionflow's; "
        "`max_relative_difference` is the largest difference between the two pools' outputs and feature "
        "gradients on the network's own proposals, over each tensor's largest magnitude (checked below 1e-3 "
        "before timing)."),
    "serve_load": (
        "The Serve graph (HTTP -> Ingress -> Preprocess -> detector with dynamic batching -> NMS stage -> "
        "Postprocess) under concurrent clients, against the same model's `candidates` + NMS called "
        "in-process at several batch sizes in the same run (the best batch is `in_process_limit`). "
        "`vs_in_process` is Serve's throughput over that limit (target: >= 1.0 at the highest "
        "concurrency); `batching_gain` is the highest concurrency's throughput over concurrency 1's. "
        "`nms_p50_ms` is the median of the NMS stage's `Server-Timing` entry (the whole batched call). "
        "`lone_request_ms` splits a request at concurrency 1 (p50s): `http_hop` is the client's latency less "
        "the Ingress's own time, `handle_hops` the Ingress's time less the stages' work (the Ingress -> "
        "detector and detector -> NMS stage calls); `hop_without_work_ms` times one hop with nothing to do: "
        "`GET /healthz` over HTTP, and an empty call of the NMS stage's handle from the driver. `batch_size_cap` is the "
        "detector's batch cap: `max_batch_size`, or with `--calibrate` the size its replica chose at start "
        "(`replica_batch_rates`: the images/s it measured by batch size)."),
    "train_overhead": (
        "Ray Train with 2 workers (DDP over gloo, one thread each) against one plain PyTorch process, same "
        "crops held in memory, same ResNet-18, same global batch; the first epoch of each side is untimed. "
        "Target: `ratio` (Ray Train / plain) >= 0.9."),
    "train_quality": (
        "ResNet-18 trained from scratch with `pipelines.train.fit` (Ray Train and the real data pipeline) "
        "on synth crops: classification (val top-1) and localization (val localization accuracy: class "
        "right and IoU >= 0.5). Each column is its own run (`--tasks` runs one of the two); `target`, "
        "`chance` and `met` are part of the file."),
}

PREAMBLE = """\
Every figure below is read from a file in [`benchmarks/results/`](../benchmarks/results/), written by the
benchmark named in its section ([`benchmarks/`](../benchmarks/); `make bench` runs them all at their
default sizes, `python -m benchmarks.run_all NAME...` some of them). Speed benchmarks measure a ratio
against a baseline in the same run, so read the ratios: absolute speeds depend on the machine and on what
else ran on it. Quality benchmarks report a metric next to its target and to chance.

For each file the page says where its command, date, load average and core count come from. A results
file that does not hold one of them says **not recorded**: it predates `benchmarks/provenance.py`, and
its figures may come from a loaded machine (some such files were off by 2x or more when rerun idle).
"""

def _fmt(value) -> str:
    """One value as table text: floats to 4 significant digits (thousands grouped), lists joined."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return _fmt(int(value))
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys; lists of scalars stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not _is_table(v):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_rows(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _is_table(v) -> bool:
    """A dict whose values are all dicts: one run (or row) per key."""
    return isinstance(v, dict) and bool(v) and all(isinstance(x, dict) for x in v.values())


def _label(rows: list[dict], index: int) -> str:
    """Column name of row ``index`` in a transposed table: the first field whose values tell rows apart."""
    for key in rows[0]:
        values = [r.get(key) for r in rows]
        if all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values) and len(set(values)) == len(rows):
            v = values[index]
            return str(v) if isinstance(v, str) else f"{key} {v}"
    return f"#{index + 1}"


def _table(rows: list[dict], labels: list[str] | None = None) -> list[str]:
    """A Markdown table of ``rows`` (dicts, flattened). Few rows with many fields are transposed:
    one line per field, one column per row."""
    flat = [_flatten(r) for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    if labels is not None or (len(keys) > 8 and len(flat) <= 6):
        names = labels or [_label(rows, i) for i in range(len(rows))]
        lines = ["| field | " + " | ".join(_fmt(n) for n in names) + " |",
                 "| --- |" + " ---: |" * len(names)]
        for k in keys:
            lines.append(f"| `{k}` | " + " | ".join(_fmt(r[k]) if k in r else "" for r in flat) + " |")
        return lines
    lines = ["| " + " | ".join(f"`{k}`" for k in keys) + " |", "|" + " --- |" * len(keys)]
    for r in flat:
        lines.append("| " + " | ".join(_fmt(r[k]) if k in r else "" for k in keys) + " |")
    return lines


def _lookup(data: dict, names: tuple[str, ...]) -> tuple[str, object] | None:
    for where, section in (("", data), ("config.", data.get("config"))):
        if isinstance(section, dict):
            for n in names:
                if n in section and section[n] not in (None, ""):
                    return where + n, section[n]
    return None


def _writers(name: str) -> list[str]:
    """The benchmark modules whose source names ``<name>.json``: the ones that write this file."""
    found = []
    for src in sorted((ROOT / "benchmarks").glob("*.py")):
        if src.stem in ("report", "run_all", "__init__"):
            continue
        if f"{name}.json" in src.read_text():
            found.append(f"python -m benchmarks.{src.stem}")
    return found


def _runs(data) -> list[dict]:
    """The per-run entries of a results file whose rows are separate runs (empty otherwise)."""
    if _is_table(data):
        return list(data.values())
    if _is_rows(data):
        return data
    if isinstance(data, dict):
        return [r for v in data.values() if _is_rows(v) or _is_table(v)
                for r in (v if isinstance(v, list) else v.values())]
    return []


def _provenance(name: str, data) -> list[str]:
    lines = []
    writers = _writers(name)
    for what, names in PROVENANCE.items():
        hit = _lookup(data, names) if isinstance(data, dict) and not _is_table(data) else None
        in_rows = [n for n in names if any(n in r for r in _runs(data))]
        if hit is not None:
            field, value = hit
            text = f"`{_fmt(value)}`" if what == "command" else _fmt(value)
            lines.append(f"- {what}: {text} (field `{field}`)")
        elif in_rows:
            lines.append(f"- {what}: per run, field `{in_rows[0]}` of the table below")
        elif what == "command" and writers:
            lines.append(f"- command: {NOT_RECORDED} (the file is written by "
                         + " or ".join(f"`{w}`" for w in writers) + "; the flags of this run are not in it)")
        else:
            lines.append(f"- {what}: {NOT_RECORDED}")
    return lines


def _figures(data) -> list[str]:
    """Tables of a results file: its scalar fields (dotted), then each list of rows or table of runs."""
    if _is_table(data):  # the whole file is one entry per run
        return _table(list(data.values()), labels=list(data))
    if _is_rows(data):
        return _table(data)
    scalars, blocks = {}, []
    for key, value in data.items():
        if key == "note":
            continue
        if _is_rows(value):
            blocks.append((key, _table(value)))
        elif _is_table(value):
            blocks.append((key, _table(list(value.values()), labels=list(value))))
        elif isinstance(value, dict):
            scalars.update(_flatten(value, key + "."))
        else:
            scalars[key] = value
    lines = []
    if scalars:
        lines += ["| field | value |", "| --- | ---: |"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in scalars.items()]
    for key, table in blocks:
        lines += (["", ] if lines else []) + [f"`{key}`:", ""] + table
    return lines


def section(path: Path) -> list[str]:
    """The Markdown section of one results file."""
    name = path.stem
    data = json.loads(path.read_text())
    lines = [f"## {name}", "", f"File: [`benchmarks/results/{path.name}`](../benchmarks/results/{path.name}).", ""]
    lines += [DESCRIPTIONS.get(name, "No description yet: add one to `DESCRIPTIONS` in `benchmarks/report.py`."), ""]
    lines += ["How it ran:", ""] + _provenance(name, data) + [""]
    if isinstance(data, dict) and data.get("note"):
        lines += [f"Note in the file: {_fmt(data['note'])}", ""]
    lines += _figures(data) + [""]
    return lines


def results_files(results: Path) -> list[Path]:
    """The results files the page shows: every ``*.json`` but a failed run's (``gpu_check.failed.json``)."""
    return sorted(p for p in results.glob("*.json") if not p.name.endswith(".failed.json"))


def render(results: Path = RESULTS) -> str:
    """The whole of ``docs/benchmarks.md`` as the results files give it now."""
    files = results_files(results)
    lines = ["# Benchmarks", "",
             f"**Generated** by `{COMMAND}` from `benchmarks/results/*.json`: do not edit this file by hand; "
             f"rerun the command after a benchmark writes new results. `tests/test_docs.py` fails when this "
             f"page and its results disagree.", "", PREAMBLE.rstrip("\n"), "", "Results files:", ""]
    lines += [f"- [{p.stem}](#{p.stem})" for p in files] + [""]
    for p in files:
        lines += section(p)
    lines += ["## Limits", "",
              "- Only what a results file holds is here. Figures measured once by hand (the wall time of "
              "`make run` or `make test`, training curves by epoch) have no results file and are not shown.",
              "- Command, date, load average and core count appear only where the benchmark wrote them into "
              "its file; everything marked not recorded is unknown, not zero.",
              _gpu_line(files), ""]
    return "\n".join(lines)


def _gpu_line(files: list[Path]) -> str:
    """Which results files come from a GPU (``gpu_check``, or a file naming a CUDA device); it said "none"
    whatever the folder held."""
    gpu = [p.stem for p in files if p.stem == "gpu_check" or '"cuda' in p.read_text()]
    return (f"- GPU runs: {', '.join(gpu)}; every other file was measured on a CPU." if gpu
            else "- None of the results files records a GPU run.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is out of date")
    ap.add_argument("--out", default=str(OUTPUT), help="where to write (default: docs/benchmarks.md)")
    args = ap.parse_args(argv)
    text = render()
    out = Path(args.out)
    if args.check:
        current = out.read_text() if out.is_file() else ""
        if current != text:
            print(f"{out} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} from {len(results_files(RESULTS))} results files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
