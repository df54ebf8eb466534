"""Task views from the shards (pipelines.data.augment) and collate_detection, on the real Ray cluster."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data import augment, collate_detection, load_split, save_preview


@pytest.fixture(scope="module")
def split(data_dir):
    ds, manifest = load_split(data_dir, "train")
    table = pq.read_table(data_dir / "train")
    return ds, manifest, table


def _rows(ds):
    return sorted(ds.take_all(), key=lambda r: (int(r.get("image_id", 0)), r.get("label", 0)))


def test_classification_view(split):
    ds, manifest, table = split
    rows = augment(ds, task="classification", size=32, seed=0, epoch=0).take_all()
    non_crowd = sum(len(c) - sum(c) for c in table["iscrowd"].to_pylist())
    assert 0.9 * non_crowd <= len(rows) <= non_crowd  # one crop per non-crowd object (tiny ones skipped)
    k = len(manifest["categories"])
    labels = np.array([r["label"] for r in rows])
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() <= k - 1
    assert len(set(labels.tolist())) == k
    assert all(r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8 for r in rows)


def test_localization_view_picks_the_largest_object(split):
    ds, manifest, table = split
    rows = augment(ds, task="localization", size=40, train=False).take_all()
    expected = []
    for r in table.select(["image_id", "boxes", "labels", "iscrowd", "width", "height"]).to_pylist():
        b = np.asarray(r["boxes"], np.float32).reshape(-1, 4)
        area = np.where(np.asarray(r["iscrowd"]) == 0, (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), -1)
        if len(b) and area.max() > 0:
            i = int(np.argmax(area))
            expected.append((b[i] * 40 / r["width"], r["labels"][i] - 1))
    assert len(rows) == len(expected)
    boxes = np.stack([e[0] for e in expected])
    for r in rows:
        assert r["image"].shape == (40, 40, 3) and r["box"].dtype == np.float32
        j = int(np.abs(boxes - r["box"]).max(1).argmin())  # eval: the box just scales
        assert np.abs(boxes[j] - r["box"]).max() < 1e-3 and expected[j][1] == r["label"]


def test_detection_view_eval_and_train(split):
    ds, manifest, table = split
    originals = {r["image_id"]: r for r in table.select(["image_id", "boxes", "labels", "width"]).to_pylist()}
    ev = augment(ds, task="detection", size=64, train=False)
    count = 0
    for batch in ev.iter_batches(batch_size=8, batch_format="numpy"):
        images, targets = collate_detection(batch)
        for img, t in zip(images, targets):
            src = originals[t["image_id"]]
            assert img.dtype == torch.float32 and img.shape == (3, 96, 96) and 0 <= img.min() and img.max() <= 1
            assert t["labels"].tolist() == src["labels"]  # eval keeps every instance at the original size
            assert torch.allclose(t["boxes"], torch.tensor(src["boxes"], dtype=torch.float32).reshape(-1, 4))
            count += 1
    assert count == manifest["num_images"]
    sizes = set()
    for batch in augment(ds, task="detection", size=64, train=True, seed=1).iter_batches(batch_size=8,
                                                                                         batch_format="numpy"):
        images, targets = collate_detection(batch)
        for img, t in zip(images, targets):
            sizes.add(img.shape[-1])
            assert max(img.shape[-2:]) <= 64 * 1.25 + 1
            b = t["boxes"]
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            assert (b[:, 2] <= img.shape[-1]).all() and (b[:, 3] <= img.shape[-2]).all()
            assert t["labels"].min().item() >= 1 if len(t["labels"]) else True
    assert len(sizes) > 3  # scale jitter


def test_segmentation_view_masks_follow_boxes(split, tmp_path):
    ds, manifest, _ = split
    view = augment(ds, task="segmentation", size=64, train=True, seed=0, epoch=2)
    batch = next(iter(view.iter_batches(batch_size=6, batch_format="numpy")))
    rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["image"]))]
    png = save_preview(rows, tmp_path / "preview.png", manifest["categories"], title="segmentation view")
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # not blank
    images, targets = collate_detection(batch)
    for img, t in zip(images, targets):
        assert t["masks"].shape == (len(t["boxes"]), *img.shape[-2:]) and t["masks"].dtype == torch.uint8
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs):
                assert xs.min() >= box[0] - 2 and xs.max() + 1 <= box[2] + 2


def test_views_reproducible_per_epoch_and_different_across_epochs(split):
    """A row of the Ray view equals the same transform run here, seeded by (seed, epoch, image_id)."""
    ds, _, table = split
    from vision import transforms as T

    sources = {r["image_id"]: r for r in table.to_pylist()}
    ids = set(sorted(sources)[:12])
    sub = ds.filter(lambda r: r["image_id"] in ids)
    a = _rows(augment(sub, task="detection", size=48, seed=7, epoch=3))
    c = _rows(augment(sub, task="detection", size=48, seed=7, epoch=4))
    assert len(a) == len(c) == 12
    for row in a:
        src = sources[row["image_id"]]
        img, t = T.transform_detection(T.decode_image(src["image"]), np.asarray(src["boxes"]).reshape(-1, 4),
                                       src["labels"], iscrowd=src["iscrowd"], size=48, train=True,
                                       seed=T.seed_for(7, 3, row["image_id"]))
        assert np.array_equal(row["image"], img.permute(1, 2, 0).numpy())
        assert np.array_equal(row["boxes"].reshape(-1, 4), t["boxes"].numpy().reshape(-1, 4))
    assert any(x["image"].shape != z["image"].shape or not np.array_equal(x["image"], z["image"])
               for x, z in zip(a, c))


def test_bad_view_arguments(split):
    ds, _, _ = split
    with pytest.raises(ValueError, match="at least one row"):
        save_preview([], "unused.png")
    with pytest.raises(ValueError, match="unknown task 'keypoints'"):
        augment(ds, task="keypoints", size=32)
    with pytest.raises(ValueError, match="size"):
        augment(ds, task="detection", size=0)


def test_an_augmentation_task_streams_its_rows_in_small_blocks(split, monkeypatch):
    """A task's rows leave it block by block (the first batch does not wait for the whole task): each
    block stays near ``VIEW_BLOCK_BYTES`` (Ray Data's 128 MiB default held all of a task's rows in one)."""
    from pipelines.data import views

    ds, manifest, table = split
    monkeypatch.setattr(views, "VIEW_BLOCK_BYTES", 64 * 1024)  # read on the driver, when the plan is built
    view = augment(ds, task="detection", size=96, train=False)
    blocks = [len(b["image_id"]) for b in view.iter_batches(batch_size=None, batch_format="numpy")]
    row_bytes = 96 * 96 * 3  # eval: each image at its original 96 px
    assert sum(blocks) == table.num_rows
    assert len(blocks) >= table.num_rows * row_bytes // (64 * 1024) // 2
    assert max(blocks) <= 64 * 1024 // row_bytes + views.AUGMENT_BATCH  # one augmentation batch past the target


def test_a_trainings_views_read_and_augment_in_one_task(data_dir, tmp_path):
    """``prepare`` reads the shards with the augmentation's CPUs, so Ray Data fuses the two maps: one task
    per group of shards, no read tasks of their own handing blocks to the augmentation."""
    from pipelines.train.config import TrainConfig
    from pipelines.train.trainer import prepare

    cfg = TrainConfig(task="detection", arch="ssdlite_mobilenet_v3", data=str(data_dir), out=str(tmp_path / "run"),
                      epochs=1, augment_cpus=0.5)
    _, _, datasets, _ = prepare(cfg)
    for name in ("train_0", "val"):
        view = datasets[name]
        assert sum(len(b["image_id"]) for b in view.iter_batches(batch_size=8, batch_format="numpy")) > 0
        assert "MapBatches(_read_shards)->MapBatches(_detection_rows)" in view.stats(), name


def test_the_read_sets_how_many_shards_a_read_and_augment_task_takes(data_dir):
    """The view takes whole blocks, so the read's ``shards_per_task`` is what Ray Data bundles into each fused
    read-and-augment task. Before, the view's batch of 16 rows made every task take 16 *shards* (Ray Data
    counts the read's input rows): a split of 16 shards of 250 images ran as one task on one core."""
    import re

    from pipelines.data import read_shards, split_shards

    shards, manifest, fs = split_shards(data_dir, "train")
    assert len(shards) >= 2
    for per_task in (1, len(shards)):
        view = augment(read_shards(shards, fs, shards_per_task=per_task), task="detection", size=64, train=True)
        assert sum(len(b["image_id"]) for b in view.iter_batches(batch_size=8, batch_format="numpy")) == \
            manifest["num_images"]
        tasks = re.search(r"MapBatches\(_read_shards\)->MapBatches\(_detection_rows\): (\d+) tasks executed",
                          view.stats())
        assert tasks and int(tasks.group(1)) == -(-len(shards) // per_task), (per_task, view.stats())


@pytest.mark.parametrize("images,listed,reading,per_task", [
    (1000, 32, 32, 16),  # 31-image shards: 16 a task (about 500 images), two tasks
    (4000, 16, 16, 2),   # 250-image shards: 2 a task, eight tasks (one task before)
    (300, 10, 2, 2),     # a training's first 60 images of 30-image shards: one task
    (0, 0, 0, 1),        # an empty split
])
def test_how_many_shards_a_read_task_takes(images, listed, reading, per_task):
    from pipelines.data.ingest import shards_per_read_task

    assert shards_per_read_task({"num_images": images, "shards": [f"s{i}" for i in range(listed)]},
                                reading) == per_task


def test_collate_gives_tensors_of_their_own_over_read_only_columns():
    """A column Ray hands out as one fixed-shape array (or ragged, as arrays) can be a read-only view of the
    block: the targets copy it, so a write to a target never reaches the batch (torch would share a
    read-only array, with a warning it gives once per process); the image converts to float [0, 1]."""
    rng = np.random.default_rng(0)
    fixed = {"image": rng.integers(0, 255, (2, 8, 10, 3), dtype=np.uint8),
             "boxes": np.array([[[1, 1, 5, 5]], [[2, 2, 6, 7]]], np.float32),
             "labels": np.array([[1], [3]]), "iscrowd": np.zeros((2, 1), np.uint8),
             "masks": np.ones((2, 1, 8, 10), np.uint8), "image_id": np.array([4, 9])}
    ragged = {}
    for k, v in fixed.items():
        ragged[k] = np.empty(2, object) if k != "image_id" else v.copy()
        for i in range(2):
            if k != "image_id":
                ragged[k][i] = v[i].copy()
    for batch in (fixed, ragged):
        for v in batch.values():
            for a in (v if v.dtype == object else [v]):
                a.setflags(write=False)
        images, targets = collate_detection(batch)
        assert torch.equal(images[1], torch.tensor(np.array(batch["image"][1])).permute(2, 0, 1).float() / 255)
        assert [t["image_id"] for t in targets] == [4, 9] and targets[1]["labels"].tolist() == [3]
        targets[0]["boxes"] += 100
        targets[0]["masks"].zero_()
        assert batch["boxes"][0][0, 0] == 1 and np.asarray(batch["masks"][0]).min() == 1
