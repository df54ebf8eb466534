"""``train_images``: a training that reads only the train split's first N images (the quickstart trains
most architectures on 60 of its 300 and the served detector on all of them)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipelines.data import load_split, read_manifest, read_split_table
from pipelines.dag import lanes
from pipelines.storage import read_metrics
from pipelines.train import TrainConfig, fit
from pipelines.train.watch import expected_rows


def _ids(ds) -> list[int]:
    return sorted(int(r["image_id"]) for r in ds.select_columns(["image_id"]).take_all())


def test_load_split_reads_the_first_images_in_the_manifests_order(data_dir):
    table, manifest = read_split_table(data_dir, "train", columns=["image_id"])
    order = [int(i) for i in table["image_id"].to_pylist()]  # the shards in the manifest's order
    sizes = [pq.read_metadata(data_dir / "train" / s).num_rows for s in manifest["shards"]]
    assert len(sizes) >= 2, "the fixture's split should span several shards"
    for n in (1, sizes[0], sizes[0] + 3, len(order)):  # within the first shard, at and past its end, all
        ds, _ = load_split(data_dir, "train", max_images=n)
        assert _ids(ds) == sorted(order[:n]), n
    ds, _ = load_split(data_dir, "train", max_images=len(order) + 50)
    assert _ids(ds) == sorted(order)
    with pytest.raises(ValueError, match="max_images must be at least 1"):
        load_split(data_dir, "train", max_images=0)


def test_expected_rows_follow_the_cap(data_dir):
    manifest = read_manifest(data_dir / "train")
    images, instances = manifest["num_images"], manifest["num_instances"]
    assert expected_rows("detection", manifest) == images
    assert expected_rows("detection", manifest, 7) == 7
    assert expected_rows("detection", manifest, images + 9) == images
    assert expected_rows("classification", manifest) == instances
    assert expected_rows("classification", manifest, images // 2) == round(instances * (images // 2) / images)


def test_a_training_with_train_images_steps_through_that_many(ray_cluster, data_dir, tmp_path):
    cfg = TrainConfig(task="detection", arch="yolo_v1", data=str(data_dir), out=str(tmp_path / "run"), epochs=1,
                      batch_size=4, image_size=64, model_kwargs={"image_size": 64}, cpus_per_worker=0.5,
                      augment_cpus=0.25, train_images=10)
    fit(cfg)
    (record,) = read_metrics(cfg.out)
    assert record["train_images"] == 10  # every image of the cap, none past it (the split has 48)
    with pytest.raises(ValueError, match="train_images"):
        TrainConfig(arch="yolo_v1", data=str(data_dir), out=str(tmp_path / "x"), train_images=0)


def test_lane_estimates_scale_with_train_images(monkeypatch):
    monkeypatch.setattr(lanes, "_costs", lambda: {"a": {"epoch_s": 2.0, "eval_s": 1.0, "train_images": 60},
                                                  "b": {"epoch_s": 2.0, "eval_s": 1.0}})
    assert lanes.estimated_seconds("a", {"epochs": 3}) == pytest.approx(7.0)  # no cap set: as measured
    assert lanes.estimated_seconds("a", {"epochs": 3, "train_images": 300}) == pytest.approx(31.0)
    assert lanes.estimated_seconds("b", {"epochs": 3, "train_images": 300}) == pytest.approx(7.0)  # measured on all
