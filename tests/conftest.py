"""Shared fixtures: one Ray cluster and one tiny dataset per test session."""
from __future__ import annotations

import pytest

@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with more logical CPUs than cores, shared by every test."""
    import ray

    from pipelines.ray_runtime import LOCAL, connect

    # A new cluster of its own, whatever else runs on the machine; connect retries a start-up that timed
    # out on a loaded machine.
    connect(LOCAL, num_cpus=4, dashboard=False, log_to_driver=False)
    yield ray
    # Serve tests may have started Serve on this cluster.
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()

@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small built-in shapes dataset in COCO layout (train + val)."""
    from vision.data.synth import write_synth

    out = tmp_path_factory.mktemp("synth")
    write_synth(out, images=60, size=96, seed=0)
    return out

@pytest.fixture(scope="session")
def data_dir(ray_cluster, synth_dir, tmp_path_factory):
    """`synth_dir` ingested: DIR/train and DIR/val Parquet shards with manifests."""
    from pipelines.data import ingest

    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        ingest(synth_dir / "annotations" / f"instances_{split}.json", synth_dir / split, out / split)
    return out

@pytest.fixture(scope="session")
def reordered_data_dir(ray_cluster, synth_dir, tmp_path_factory):
    """`synth_dir`'s val split ingested with its category names in another order (the same ids, images and
    annotations): data a checkpoint of `data_dir` must not be scored on."""
    import json

    from pipelines.data import ingest

    coco = json.loads((synth_dir / "annotations" / "instances_val.json").read_text())
    names = [c["name"] for c in coco["categories"]]
    for c, name in zip(coco["categories"], names[1:] + names[:1]):
        c["name"] = name
    root = tmp_path_factory.mktemp("reordered")
    (root / "instances_val.json").write_text(json.dumps(coco))
    ingest(root / "instances_val.json", synth_dir / "val", root / "shards" / "val")
    return root / "shards"
