"""What a training reads each epoch: ``limit_train_images`` (only the train split's first N images; the quickstart
trains most architectures on 60 of its 300 and the served detector on all of them) and ``shuffle_buffer``
(each epoch's shards in a new order, batches drawn from a local shuffle buffer)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipelines.data import load_split, read_shards, read_split_table, shard_items, split_shards
from pipelines.dag import lanes
from pipelines.train import TrainConfig
from pipelines.train.trainer import epoch_batches, ingest_config, prepare, shuffle_seed
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


def test_expected_rows_follow_the_cap():
    manifest = {"num_images": 300, "num_instances": 690}
    assert expected_rows("detection", manifest) == 300
    assert expected_rows("detection", manifest, 60) == 60
    assert expected_rows("detection", manifest, 400) == 300  # a cap past the split reads the split
    assert expected_rows("classification", manifest) == 690
    assert expected_rows("classification", manifest, 60) == 138  # objects at the split's 2.3 an image
    assert expected_rows("classification", {"num_images": 300}, 60) is None


def test_limit_train_images_is_refused_below_one(data_dir, tmp_path):
    # A training that steps through exactly its cap, its one worker reading in order: test_init_from.py's
    # fine-tuning, which trains on the first ten images (one Ray Train start for both).
    with pytest.raises(ValueError, match="limit_train_images"):
        TrainConfig(arch="yolo_v1", data=str(data_dir), out=str(tmp_path / "x"), limit_train_images=0)


def test_lane_estimates_scale_with_limit_train_images(monkeypatch):
    monkeypatch.setattr(lanes, "_costs", lambda: {"a": {"epoch_s": 2.0, "eval_s": 1.0, "limit_train_images": 60},
                                                  "b": {"epoch_s": 2.0, "eval_s": 1.0}})
    assert lanes.estimated_seconds("a", {"epochs": 3}) == pytest.approx(7.0)  # no cap set: as measured
    assert lanes.estimated_seconds("a", {"epochs": 3, "limit_train_images": 300}) == pytest.approx(31.0)
    assert lanes.estimated_seconds("b", {"epochs": 3, "limit_train_images": 300}) == pytest.approx(7.0)  # measured on all


def _block_order(shards, fs, seed) -> tuple[int, ...]:
    """Which of ``shards`` ``read_shards`` read first, second, ... (each shard reads a different number of
    rows, so the runs of rows name them; the blocks in execution order kept)."""
    ds = read_shards(shard_items(shards), fs, shuffle_seed=seed, num_cpus=1)  # few read processes to start
    ds.context.execution_options.preserve_order = True
    return tuple(len(b["image_id"]) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def test_shard_order_is_drawn_from_its_seed(ray_cluster, data_dir):
    shards, manifest, fs = split_shards(data_dir, "train")
    assert [s["path"].rsplit("/", 1)[-1] for s in shards] == manifest["shards"]
    many = [{"path": shards[0]["path"], "rows": k} for k in range(1, 13)]  # 12 shards of 1..12 rows
    assert _block_order(many, fs, None) == tuple(range(1, 13))  # no seed: the manifest's order
    drawn = [_block_order(many, fs, seed) for seed in (1, 2, 3)]
    assert all(sorted(d) == list(range(1, 13)) for d in drawn) and len(set(drawn)) == 3
    assert _block_order(many, fs, 2) == drawn[1]  # the same seed, the same order
    assert [s["rows"] for s in many] == list(range(1, 13))  # the caller's list is left as it was


def _epoch_order(cfg, epoch: int) -> list[int]:
    """The image ids in the order rank 0 of a one-worker training gets them in ``epoch``."""
    _, _, datasets, _ = prepare(cfg)
    batches = epoch_batches(datasets[f"train_{epoch}"].iterator(), cfg, epoch, 0)
    return [int(i) for b in batches for i in b["image_id"]]


def _in_split_order(order: list[int], split: list[int]) -> float:
    """The share of consecutive ids that are also consecutive in the split's own order."""
    nxt = {a: b for a, b in zip(split, split[1:])}
    return sum(nxt.get(a) == b for a, b in zip(order, order[1:])) / max(1, len(order) - 1)


def test_each_epoch_draws_its_batches_in_a_new_order(ray_cluster, data_dir, tmp_path):
    table, _ = read_split_table(data_dir, "train", columns=["image_id"])
    split = [int(i) for i in table["image_id"].to_pylist()]
    kw = dict(task="detection", arch="yolo_v1", data=str(data_dir), epochs=2, batch_size=4, image_size=32,
              augment_cpus=0.25)
    plain = TrainConfig(out=str(tmp_path / "plain"), shuffle_buffer=0, **kw)
    assert shuffle_seed(plain, 0) is None and shuffle_seed(plain, 0, 0) is None
    kept = _epoch_order(plain, 0)
    assert sorted(kept) == sorted(split) and _in_split_order(kept, split) > 0.7  # rows as the shards hold them
    shuffled = TrainConfig(out=str(tmp_path / "shuffled"), shuffle_buffer=64, **kw)
    first, second = _epoch_order(shuffled, 0), _epoch_order(shuffled, 1)
    assert sorted(first) == sorted(second) == sorted(split)  # every image once an epoch
    assert _in_split_order(first, split) < 0.3 and _in_split_order(second, split) < 0.3
    assert first != second
    assert shuffle_seed(shuffled, 1) != shuffle_seed(shuffled, 0) != shuffle_seed(shuffled, 0, 0)


def test_each_epochs_view_reads_the_shards_in_an_order_of_its_own(ray_cluster, data_dir, tmp_path, monkeypatch):
    import pipelines.data as data

    seeds, real = [], data.read_shards
    monkeypatch.setattr(data, "read_shards", lambda shards, fs, **kw: seeds.append(kw.get("shuffle_seed"))
                        or real(shards, fs, **kw))
    kw = dict(task="detection", arch="yolo_v1", data=str(data_dir), epochs=3, batch_size=4, image_size=32)
    prepare(TrainConfig(out=str(tmp_path / "a"), **kw))
    assert len(seeds) == 3 and None not in seeds and len(set(seeds)) == 3  # one order an epoch
    seeds.clear()
    prepare(TrainConfig(out=str(tmp_path / "b"), shuffle_buffer=0, **kw))
    assert seeds == [None, None, None]  # no shuffling: the manifest's order


def test_a_one_worker_epoch_comes_in_the_same_order_however_fast_it_is_read(ray_cluster, data_dir, tmp_path):
    """A small epoch is read whole before its steps; its augmentation tasks then race, and so do the
    iterator's format threads: the seeded local shuffle must still see the blocks in the seeded shard order,
    and the steps the batches in the order it drew them, so two fits of one seed train on the same batches.
    Read through what the fit's worker gets: Ray Train's ``DataConfig`` replaces a dataset's execution
    options unless told to keep them (``ingest_config``)."""
    import time

    cfg = TrainConfig(task="detection", arch="yolo_v1", data=str(data_dir), out=str(tmp_path / "run"), epochs=2,
                      batch_size=4, image_size=32, augment_cpus=0.25, shuffle_buffer=64)

    def worker_iterators() -> dict:
        datasets = prepare(cfg)[2]
        return ingest_config(datasets, split=False).configure(datasets, world_size=1, worker_handles=None,
                                                              worker_node_ids=None)[0]
    assert all(it.get_context().execution_options.preserve_order for it in worker_iterators().values())

    def order(slow: bool) -> list[list[int]]:
        batches = []
        for b in epoch_batches(worker_iterators()["train_1"], cfg, 1, 0):
            batches.append([int(i) for i in b["image_id"]])
            if slow:
                time.sleep(0.05)
        return batches

    slow = order(slow=True)
    assert [order(slow=False) for _ in range(3)] == [slow] * 3
