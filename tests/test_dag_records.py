"""Stage records and the run directory: what makes a rerun skip finished work."""
from __future__ import annotations

import pytest

import os

from pipelines.dag.records import Stage, prune_set_aside, stage_key
from pipelines.storage import RunDir


@pytest.fixture(params=["path", "file-uri"])
def run(request, tmp_path):
    """The same run directory addressed as a plain path and as a pyarrow URI."""
    return RunDir(str(tmp_path / "run") if request.param == "path" else f"file://{tmp_path}/run")


def test_key_depends_on_config_and_inputs_only():
    a = stage_key("train", {"epochs": 1, "lr": 0.1}, {"data": "k1"})
    assert a == stage_key("train", {"lr": 0.1, "epochs": 1}, {"data": "k1"})  # order does not matter
    assert a != stage_key("train", {"epochs": 2, "lr": 0.1}, {"data": "k1"})
    assert a != stage_key("train", {"epochs": 1, "lr": 0.1}, {"data": "k2"})  # upstream changed
    assert a != stage_key("eval", {"epochs": 1, "lr": 0.1}, {"data": "k1"})


def test_finished_record_is_found_only_with_the_same_key(run):
    stage = Stage(run, "archs/resnet18/train", "k1")
    assert stage.finished() is None
    stage.begin(resumable=True)
    assert stage.finished() is None  # started is not finished
    stage.done({"epochs": 1}, {"data": "d"}, {"run_dir": "x"}, 1.5)
    assert stage.finished()["outputs"] == {"run_dir": "x"}
    assert Stage(run, "archs/resnet18/train", "k2").finished() is None


def test_begin_keeps_an_interrupted_resumable_stage_and_clears_everything_else(run):
    stage = Stage(run, "archs/resnet18/train", "k1")
    stage.begin(resumable=True)
    run.write_json("archs/resnet18/train/checkpoint_000/meta.json", {"epoch": 0})
    # Same key, resumable: the trainer's checkpoints stay for it to resume from.
    assert Stage(run, "archs/resnet18/train", "k1").begin(resumable=True) is True
    assert run.exists("archs/resnet18/train/checkpoint_000/meta.json")
    # Another key (the config changed): the old checkpoints must not be resumed.
    assert Stage(run, "archs/resnet18/train", "k2").begin(resumable=True) is False
    assert not run.exists("archs/resnet18/train/checkpoint_000")
    # Not resumable (data): always from an empty directory.
    run.write_json("data/shards/train/part-0.json", {})
    Stage(run, "data", "d1").begin(resumable=False)
    run.write_json("data/shards/train/part-0.json", {})
    Stage(run, "data", "d1").begin(resumable=False)
    assert not run.exists("data/shards")


def test_run_dir_json_roundtrip_and_paths(run, tmp_path):
    path = run.write_json("a/b.json", {"x": 1})
    assert run.read_json("a/b.json") == {"x": 1}
    assert run.read_json("a/missing.json") is None
    assert path.endswith("/run/a/b.json") and not run.remote
    assert run.local("a") == tmp_path / "run" / "a"
    run.remove("a")
    assert not run.exists("a/b.json")


def test_remote_uri_is_not_mistaken_for_a_local_path():
    from pipelines.storage import is_remote

    assert is_remote("s3://bucket/prefix") and is_remote("gs://b/p")
    assert not is_remote("/tmp/x") and not is_remote("file:///tmp/x") and not is_remote("runs/q")
    with pytest.raises(ValueError, match="run_dir is empty"):
        RunDir("")


def test_a_report_uploaded_from_a_temporary_folder_names_where_it_was_uploaded():
    """The robustness stage of a run on object storage writes its report to a temporary folder and uploads
    it: every path it returns, nested ones too (each model's examples and visualizations), names the upload."""
    from pipelines.storage import rebase_paths

    tmp, remote = "/tmp/tmpab12", "s3://bucket/run/robustness"
    local = {"json": f"{tmp}/robustness.json", "examples": [f"{tmp}/examples_resnet18.png"],
             "visualizations": {"resnet18": [f"{tmp}/visualizations/resnet18/conv1.png"]},
             "models": ["resnet18"], "images": 256, "elsewhere": "/tmp/tmpab123/x.png"}
    assert rebase_paths(local, tmp, remote) == {
        "json": f"{remote}/robustness.json", "examples": [f"{remote}/examples_resnet18.png"],
        "visualizations": {"resnet18": [f"{remote}/visualizations/resnet18/conv1.png"]},
        "models": ["resnet18"], "images": 256, "elsewhere": "/tmp/tmpab123/x.png"}  # a sibling folder is not inside


def test_settings_of_how_a_stage_runs_are_left_out_of_its_key(tmp_path):
    """A crashed training rerun with more restarts, more CPUs or a GPU keeps its stage (and so continues
    from its checkpoint); a setting of what it trains sets the stage aside."""
    from pipelines.dag.stages import _eval_stage_of, _train_stage_of

    run = RunDir(str(tmp_path))
    base = {"task": "classification", "arch": "resnet18", "epochs": 3, "lr": 0.001}

    def key(settings):
        return _train_stage_of(run, "resnet18", settings, {"key": "data-key"}).key

    assert key(base) == key({**base, "max_failures": 3, "cpus_per_worker": 2, "gpus_per_worker": 1,
                             "augment_cpus": 1, "checkpoints_to_keep": 5, "placement": "spread"})
    assert len({key(base), key({**base, "epochs": 4}), key({**base, "workers": 2}), key({**base, "lr": 0.01})}) == 4
    evals = {_eval_stage_of(run, "resnet18", {"enabled": True, "from_training": ft, **res}, {"key": "t"}).key
             for ft in (True, False) for res in ({"num_cpus": 1}, {"num_cpus": 2, "num_gpus": 1})}
    assert len(evals) == 2  # from_training changes what the evaluation reads; its resources do not


@pytest.mark.parametrize("torn", ['{"key": "ab', "[1, 2]", "\xff\xfe"])
def test_a_torn_or_hand_edited_record_runs_its_stage_again_and_names_the_file(run, torn):
    """A record cut short (a power cut before the disk had it) or edited by hand failed its stage on every
    rerun with a JSONDecodeError naming no file. It is read as absent, with a warning naming it; the stage runs
    again and its record replaces the file."""
    stage = Stage(run, "archs/resnet18/train", "k1")
    stage.begin(resumable=True)
    stage.done({}, {}, {"run_dir": "x"}, 1.0)
    run.local("archs/resnet18/train/_stage.json").write_bytes(torn.encode("latin-1"))
    with pytest.warns(RuntimeWarning, match=r"archs/resnet18/train/_stage.json is not a (JSON|stage) record"):
        assert stage.finished() is None
    run.local("archs/resnet18/train/_started.json").write_bytes(torn.encode("latin-1"))
    with pytest.warns(RuntimeWarning, match="_started.json"):
        assert stage.begin(resumable=True) is False
    stage.done({}, {}, {"run_dir": "y"}, 1.0)
    assert stage.finished()["outputs"]["run_dir"] == "y"


def test_a_moved_run_directory_hands_out_its_new_paths(tmp_path):
    """Records hold absolute paths; moved (mv, another machine or mount point), a run skipped its finished stages
    and handed the later ones the old location's shards and checkpoints (or paths that no longer existed)."""
    old = RunDir(str(tmp_path / "a" / "run"))
    Stage(old, "data", "d1").begin(resumable=False)
    Stage(old, "data", "d1").done({}, {}, {"data_dir": old.path("data/shards"), "splits": [old.path("data/x")],
                                           "source": "/elsewhere/coco"}, 1.0)
    os.rename(tmp_path / "a", tmp_path / "b")
    new = RunDir(str(tmp_path / "b" / "run"))
    outputs = Stage(new, "data", "d1").finished()["outputs"]
    assert outputs == {"data_dir": new.path("data/shards"), "splits": [new.path("data/x")], "source": "/elsewhere/coco"}


def test_prune_deletes_set_aside_stage_outputs_only(tmp_path):
    """--prune took any folder with an "@" up to three levels down: a run directory in a project folder listed
    node_modules/@types."""
    run = RunDir(str(tmp_path))
    for d in ("archs/resnet18/train@0123456789abcdef", "data@fedcba9876543210", "node_modules/@types",
              "photos/me@home", "archs/x/train@0123"):
        run.makedirs(d)
    assert sorted(prune_set_aside(run)) == ["archs/resnet18/train@0123456789abcdef", "data@fedcba9876543210"]
    assert run.exists("node_modules/@types") and run.exists("photos/me@home") and run.exists("archs/x/train@0123")


def test_records_are_readable_by_others_and_a_home_folder_is_expanded(tmp_path, monkeypatch):
    """JSON records were written 0600 (mkstemp's), unreadable to a team's other users; ``run_dir: ~/runs/x`` in a
    YAML (no shell to expand it) made a folder named "~" in the working directory."""
    mask = os.umask(0o022)
    try:
        path = RunDir(str(tmp_path)).write_json("summary.json", {"x": 1})
    finally:
        os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o644
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert RunDir("~/runs/x").uri == str(tmp_path / "home" / "runs" / "x")
