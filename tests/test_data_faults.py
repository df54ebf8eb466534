"""Faults during ingest, injected for real: `visionflow ingest` killed with SIGKILL (its whole process
group, its own Ray cluster included) in the middle of a re-ingest, and a decode worker that dies
(SIGKILL from the test-only hook ``VISIONFLOW_TEST_CRASH_ON``) on one image."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data import ingest
from pipelines.data.decode import TEST_CRASH_ENV
from vision.data.synth import write_synth

REPO = Path(__file__).resolve().parents[1]


def _ingest_process(annotations, images, out, **env) -> subprocess.Popen:
    """`python -m pipelines ingest` with a new local Ray cluster of its own, in its own process group."""
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ.update(env, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "pipelines", "ingest", "--annotations", str(annotations), "--images",
           str(images), "--out", str(out), "--no-dashboard"]
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _read_split(out: Path) -> tuple[dict, list[int]]:
    """The manifest and the image ids of every shard it lists, each read back whole with pyarrow."""
    manifest = json.loads((out / "_manifest.json").read_text())
    ids = []
    for shard in manifest["shards"]:
        ids += pq.read_table(out / shard, columns=["image_id"])["image_id"].to_pylist()
    return manifest, sorted(ids)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """A small set (the first ingest) and a bigger one (the re-ingest that gets killed)."""
    root = tmp_path_factory.mktemp("reingest")
    write_synth(root / "small", images=20, size=64, seed=1)
    write_synth(root / "big", images=400, size=96, seed=2)
    return root


def _kill_reingest_at_random(ray_cluster, two_sets, out: Path, delay: float) -> str:
    """Ingest the small set into ``out``, start a re-ingest of the big set, SIGKILL it ``delay`` seconds
    after it began writing, and check that ``out`` is a whole split: the old one, or (when the kill came
    after the commit) the new one. Returns which."""
    small, big = two_sets / "small", two_sets / "big"
    ingest(small / "annotations" / "instances_train.json", small / "train", out)
    old_manifest, old_ids = _read_split(out)
    assert old_manifest["num_images"] == len(old_ids) > 0
    big_ids = sorted(im["id"] for im in json.loads((big / "annotations" / "instances_train.json").read_text())["images"])
    proc = _ingest_process(big / "annotations" / "instances_train.json", big / "train", out)
    try:
        deadline = time.monotonic() + 180
        while True:  # begun writing: its temporary folder exists (or, as ingest once did, the old is gone)
            if list(out.glob(".tmp-*")) or not (out / "_manifest.json").exists():
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the re-ingest never started writing"
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the re-ingest ended before the kill; make the big set bigger"
    finally:
        _kill_group(proc)
    manifest, ids = _read_split(out)  # every shard the manifest lists, read back whole
    if ids == old_ids:
        assert manifest == old_manifest
        state = "old"
    else:
        assert ids == big_ids and manifest["num_images"] == len(big_ids), "neither the old split nor the new"
        state = "new"

    # The next ingest clears what the killed one left and replaces the split.
    new = ingest(big / "annotations" / "instances_train.json", big / "train", out)
    assert not list(out.glob(".tmp-*")) and not list(out.parent.glob(out.name + ".tmp-*"))
    manifest, ids = _read_split(out)
    assert manifest == new and ids == big_ids
    assert sorted(p.name for p in out.glob("part-*.parquet")) == new["shards"]
    return state


def test_kill_during_reingest_keeps_the_old_split(ray_cluster, two_sets, tmp_path):
    delay = random.uniform(0.0, 0.5)  # the big set's shards take ~2 s to write: this lands mid-write
    state = _kill_reingest_at_random(ray_cluster, two_sets, tmp_path / "split", delay)
    assert state == "old", f"killed {delay:.2f} s after writing began, yet the new split was complete"


def test_leftovers_of_a_killed_commit_are_cleared(ray_cluster, two_sets, tmp_path):
    """What a run killed inside its commit leaves (new shards moved into ``out`` but not listed yet, its
    temporary folder; an earlier version's temporary sibling) does not disturb the old split, and the next
    ingest clears it."""
    small = two_sets / "small"
    out = tmp_path / "split"
    ingest(small / "annotations" / "instances_train.json", small / "train", out)
    old_manifest, old_ids = _read_split(out)
    shard = out / old_manifest["shards"][0]
    (out / "part-00000-0dead0be.parquet").write_bytes(shard.read_bytes())
    for stage in (tmp_path / "split.tmp-0killed0", out / ".tmp-0killed1"):
        stage.mkdir()
        (stage / "part-00001-0dead0bf.parquet").write_bytes(shard.read_bytes()[:100])
    from pipelines.data import read_split_table

    table, _ = read_split_table(tmp_path, "split", columns=["image_id"])  # the manifest's shards only
    assert sorted(table["image_id"].to_pylist()) == old_ids
    new = ingest(small / "annotations" / "instances_train.json", small / "train", out)
    assert not list(tmp_path.glob("split.tmp-*")) and not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("part-*.parquet")) == new["shards"]
    assert _read_split(out)[1] == old_ids


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
def test_kill_during_reingest_at_several_moments(ray_cluster, two_sets, tmp_path, delay):
    # Later kills may land in the commit or after it: then the new split must be whole instead.
    delay += random.uniform(0, 0.5)
    state = _kill_reingest_at_random(ray_cluster, two_sets, tmp_path / "split", delay)
    print(f"killed {delay:.2f} s after writing began: the {state} split")


def test_a_decoder_crash_costs_only_its_image(tmp_path):
    write_synth(tmp_path / "set", images=40, size=64, seed=3)
    annotations = tmp_path / "set" / "annotations" / "instances_train.json"
    coco = json.loads(annotations.read_text())
    victim = coco["images"][5]
    proc = _ingest_process(annotations, tmp_path / "set" / "train", tmp_path / "out",
                           **{TEST_CRASH_ENV: victim["file_name"]})
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, output.decode()[-3000:]
    manifest, ids = _read_split(tmp_path / "out")
    assert [(q["image_id"], q["reason"].split(":")[0]) for q in manifest["quarantined"]] == \
        [(victim["id"], "decoder crashed")]
    assert ids == sorted(im["id"] for im in coco["images"] if im["id"] != victim["id"])
    assert manifest["num_images"] == len(coco["images"]) - 1
    assert manifest["num_instances"] == sum(1 for a in coco["annotations"] if a["image_id"] != victim["id"])
