"""vision.transforms as properties on real data (the ingested shapes set): boxes move with masks."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.transforms import v2

from vision import transforms as T


@pytest.fixture(scope="module")
def rows(data_dir):
    return [r for r in pq.read_table(data_dir / "train").to_pylist() if r["boxes"]]


def _decoded(row):
    image = T.decode_image(row["image"])
    masks = T.decode_masks(row["segmentation"], row["height"], row["width"])
    return image, np.asarray(row["boxes"], np.float32), masks


def test_box_is_the_bbox_of_its_transformed_mask(rows):
    checked = 0
    for row in rows:
        image, boxes, masks = _decoded(row)
        for seed in range(4):
            img, t = T.transform_detection(image, boxes, row["labels"], iscrowd=row["iscrowd"], masks=masks,
                                           size=64, train=True, seed=seed)
            assert len(t["boxes"]) == len(t["labels"]) == len(t["iscrowd"]) == len(t["masks"])
            assert t["masks"].shape[-2:] == img.shape[-2:]
            s = img.shape[-1] / image.shape[-1]
            # 1 px of polygon rasterisation in the source, scaled; one output pixel of nearest-neighbour
            # rounding; and the half-pixel alignment of torch's "nearest", which grows with |1 - scale|.
            tol = 1.05 * s + 1.0 + 0.5 * abs(1.0 - s)
            keep = t["masks"].flatten(1).bool().any(1)
            assert keep.float().mean() > 0.9
            err = (T.boxes_from_masks(t["masks"][keep]) - t["boxes"][keep]).abs().max().item()
            assert err <= tol, (row["image_id"], seed, err, tol)
            checked += int(keep.sum())
    assert checked > 100


def _composed(image, boxes, labels, *, size, train, iscrowd, masks, seed):
    """The reference: torchvision's v2 Compose of ``detection_transform`` on tv_tensors."""
    T._seed_torch(seed)
    img, target = T.to_tv(image, boxes, labels, iscrowd, masks)
    img, target = T.detection_transform(size, train)(img, target)
    return img.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}


def test_transform_detection_is_the_composed_v2_transform_bit_for_bit(rows):
    """transform_detection calls the kernels directly: the same draws and outputs as the v2 Compose, on
    the real rows (masks included) and on random boxes partly outside, degenerate or missing."""
    cases = [(*_decoded(r), r["labels"], r["iscrowd"]) for r in rows[:12]]
    rng = np.random.default_rng(0)
    for _ in range(150):
        h, w, n = int(rng.integers(24, 200)), int(rng.integers(24, 200)), int(rng.integers(0, 5))
        xy = rng.uniform(-5, [w, h], (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0, [w / 2, h / 2], (n, 2))], 1).astype(np.float32)
        cases.append((torch.from_numpy(rng.integers(0, 255, (3, h, w), dtype=np.uint8)), boxes,
                      torch.from_numpy(rng.integers(0, 2, (n, h, w), dtype=np.uint8)),
                      rng.integers(1, 6, n).tolist(), rng.integers(0, 2, n).tolist()))
    flipped = 0
    for i, (image, boxes, masks, labels, crowd) in enumerate(cases):
        for train, size, with_masks in ((True, 64, True), (True, 131, False), (False, 64, True)):
            m = masks if with_masks else None
            want = _composed(image, boxes, labels, size=size, train=train, iscrowd=crowd, masks=m, seed=i)
            got = T.transform_detection(image, boxes, labels, size=size, train=train, iscrowd=crowd, masks=m,
                                        seed=i)
            assert torch.equal(got[0], want[0]) and got[0].dtype == want[0].dtype, (i, train, size)
            assert got[1].keys() == want[1].keys(), (i, train, size)
            for k in want[1]:
                assert got[1][k].dtype == want[1][k].dtype and torch.equal(got[1][k], want[1][k]), (i, k)
            flipped += train and not torch.equal(got[0], T.transform_detection(
                image, boxes, labels, size=size, train=True, seed=i, flip_p=0.0)[0])
    assert flipped > 50  # both branches of the flip were compared


def test_masks_given_as_rles_give_what_the_decoded_masks_give(rows):
    """The views hand a row's RLEs to transform_detection, which decodes them one at a time (only the kept
    ones, in training): the same masks, bit for bit, as decoding them all first, on the real rows (training
    draws and evaluation) and on a draw that drops instances."""
    dropped = 0
    for i, row in enumerate(rows[:12]):
        image, boxes, masks = _decoded(row)
        for train, seed in ((True, i), (True, i + 100), (False, i)):
            want = T.transform_detection(image, boxes, row["labels"], iscrowd=row["iscrowd"], masks=masks,
                                         size=48, train=train, seed=seed)
            got = T.transform_detection(image, boxes, row["labels"], iscrowd=row["iscrowd"],
                                        masks=list(row["segmentation"]), size=48, train=train, seed=seed)
            assert torch.equal(got[0], want[0])
            assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][k], want[1][k]) for k in want[1])
    image = torch.zeros((3, 40, 50), dtype=torch.uint8)
    boxes = np.array([[0, 0, 10, 10], [-30, 5, -20, 30], [5, 5, 45, 30]], np.float32)  # the second is outside
    rles = [T.encode_mask(np.pad(np.ones((10, 10), np.uint8), ((k * 5, 30 - k * 5), (k * 10, 40 - k * 10))))
            for k in range(3)]
    _, t = T.transform_detection(image, boxes, [1, 2, 3], masks=rles, size=32, train=True, seed=0)
    _, want = T.transform_detection(image, boxes, [1, 2, 3], masks=T.decode_masks(rles, 40, 50), size=32,
                                    train=True, seed=0)
    assert len(t["masks"]) == 2 and torch.equal(t["masks"], want["masks"])
    _, t = T.transform_detection(image, boxes[1:2], [2], masks=rles[1:2], size=32, train=True, seed=0)
    assert t["masks"].shape == (0, *t["masks"].shape[1:]) and t["masks"].dtype == torch.uint8
    with pytest.raises(ValueError, match="2 mask RLEs for 3 boxes"):
        T.transform_detection(image, boxes, [1, 2, 3], masks=rles[:2], size=32, train=True, seed=0)
    with pytest.raises(ValueError, match=r"a mask RLE of size \[40, 50\] on a 50x40 image"):
        T.transform_detection(image.transpose(1, 2), boxes, [1, 2, 3], masks=rles, size=32, train=False)


def test_transform_detection_names_mismatched_instances():
    image = torch.zeros((3, 40, 50), dtype=torch.uint8)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 30]], np.float32)
    with pytest.raises(ValueError, match=r"masks of shape \(2, 40, 40\) for 2 boxes on a 40x50 image"):
        T.transform_detection(image, boxes, [1, 2], masks=torch.zeros((2, 40, 40), dtype=torch.uint8), size=32,
                              train=True, seed=0)
    with pytest.raises(ValueError, match="expected \\(2, 40, 50\\)"):
        T.transform_detection(image, boxes, [1, 2], masks=np.zeros((1, 40, 50), np.uint8), size=32, train=False)
    with pytest.raises(ValueError, match="1 labels for 2 boxes"):
        T.transform_detection(image, boxes, [1], size=32, train=True, seed=0)
    with pytest.raises(ValueError, match="3 iscrowd for 2 boxes"):
        T.transform_detection(image, boxes, [1, 2], iscrowd=[0, 0, 1], size=32, train=True, seed=0)
    _, t = T.transform_detection(image, boxes, [1, 2], masks=np.ones((2, 40, 50), np.uint8), size=32, train=True,
                                 seed=0)  # numpy masks are taken as tensors
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape[0] == len(t["boxes"])


def test_scale_jitter_of_a_one_pixel_wide_image_keeps_a_pixel():
    """A 300 x 1 image (ingest accepts it) at size 128: the jittered width rounds to 0, which torchvision's
    resize refuses; it keeps one pixel, and the box on it survives."""
    image = torch.full((3, 300, 1), 200, dtype=torch.uint8)
    for seed in range(5):
        out, t = T.transform_detection(image, np.array([[0, 10, 1, 290]], np.float32), [1], size=128, train=True,
                                       seed=seed, masks=np.ones((1, 300, 1), np.uint8))
        assert out.shape[2] == 1 and 64 <= out.shape[1] <= 256 and t["masks"].shape[1:] == out.shape[1:]
        assert len(t["boxes"]) == 1


def test_flip_twice_is_the_original(rows):
    flip = v2.RandomHorizontalFlip(p=1.0)
    for row in rows[:10]:
        image, boxes, masks = _decoded(row)
        img, target = T.to_tv(image, boxes, row["labels"], row["iscrowd"], masks)
        once = flip(img, target)
        twice = flip(*once)
        assert torch.equal(twice[0], img) and not torch.equal(once[0], img)
        assert torch.allclose(twice[1]["boxes"], target["boxes"])
        assert torch.equal(twice[1]["masks"], target["masks"])
        w = image.shape[-1]
        np.testing.assert_allclose(once[1]["boxes"][:, [0, 2]].numpy(), w - boxes[:, [2, 0]], atol=1e-4)


def test_seeded_draws_repeat_and_differ(rows):
    image, boxes, masks = _decoded(rows[0])
    run = lambda seed: T.transform_detection(image, boxes, rows[0]["labels"], size=64, train=True, seed=seed)
    a, b = run(T.seed_for(0, 0, 1)), run(T.seed_for(0, 0, 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    shapes = {tuple(run(T.seed_for(0, epoch, 1))[0].shape) for epoch in range(6)}
    assert len(shapes) > 1  # scale jitter differs across epochs
    assert T.seed_for(0, 0, 1) != T.seed_for(0, 1, 1) != T.seed_for(1, 0, 1)


def test_eval_transform_is_identity_and_sanitize_drops_empty():
    image = torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8)
    boxes = np.array([[0, 0, 10, 10], [20, 20, 20.5, 30]], np.float32)  # the second is thinner than 1 px
    img, t = T.transform_detection(image, boxes, [1, 2], iscrowd=[0, 0], size=32, train=False)
    assert torch.equal(img, image) and len(t["boxes"]) == 2
    img, t = T.transform_detection(image, boxes, [1, 2], iscrowd=[0, 1], size=40, train=True, seed=0,
                                   scale_range=(1.0, 1.0))
    assert t["labels"].tolist() == [1] and t["iscrowd"].tolist() == [0]


def test_crops_and_localization_shapes():
    image = torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8)
    crop = T.classification_crop(image, [10, 10, 30, 40], size=24, train=True, seed=5)
    assert crop.shape == (3, 24, 24) and crop.dtype == torch.uint8
    assert torch.equal(crop, T.classification_crop(image, [10, 10, 30, 40], size=24, train=True, seed=5))
    top, left, h, w = T.crop_box([10, 10, 30, 40], 60, 80, train=False)
    assert (top, left, h, w) == (7, 8, 36, 24)
    img, box = T.transform_localization(image, [40, 30, 80, 60], 2, size=32, train=False)
    assert img.shape == (3, 32, 32)
    np.testing.assert_allclose(box.numpy(), [16, 16, 32, 32], atol=1e-4)
    for seed in range(10):
        img, box = T.transform_localization(image, [40, 30, 80, 60], 2, size=32, train=True, seed=seed)
        assert img.shape == (3, 32, 32) and (box[2:] > box[:2]).all() and (box >= 0).all() and (box <= 32).all()


def test_rle_round_trip():
    m = np.zeros((7, 9), np.uint8)
    m[2:5, 3:8] = 1
    rle = T.encode_mask(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [7, 9]
    assert torch.equal(T.decode_masks([rle], 7, 9)[0], torch.from_numpy(m))
    assert T.decode_masks([], 7, 9).shape == (0, 7, 9)


def _pil_pixels(data: bytes) -> torch.Tensor:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def test_the_views_decode_jpeg_and_png_with_torchcodec_to_pils_pixels(rows, monkeypatch):
    import io

    from PIL import Image

    assert T._codec_decoders() is not None, "torchcodec (a dependency) does not load"
    rng = np.random.default_rng(0)
    pngs = []
    for mode, shape in (("RGB", (40, 50, 3)), ("L", (40, 50))):  # what ingest re-encodes as PNG, and gray
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    jpegs = [row["image"] for row in rows]  # the shards' JPEGs
    expected = [_pil_pixels(b) for b in jpegs + pngs]
    with monkeypatch.context() as m:  # these must not reach PIL
        m.setattr(T.Image, "open", lambda *a, **k: pytest.fail("decoded with PIL"))
        got = [T.decode_image(b) for b in jpegs + pngs]
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == torch.uint8 and torch.equal(g, e)
    assert got[-1].shape == (3, 40, 50)

    # What TorchCodec would show otherwise goes to PIL: a BMP, a JPEG with an EXIF orientation (PIL's path
    # leaves it as stored; TorchCodec would turn it), a 16-bit PNG (TorchCodec rounds, PIL truncates).
    bmp, turned, deep = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)).save(bmp, format="BMP")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(turned, format="JPEG", exif=exif)
    Image.fromarray(rng.integers(0, 65536, (6, 7), dtype=np.uint16)).save(deep, format="PNG")
    for data in (bmp.getvalue(), turned.getvalue(), deep.getvalue()):
        assert T._codec_for(data) is None
        assert torch.equal(T.decode_image(data), _pil_pixels(data))
    assert T.decode_image(turned.getvalue()).shape == (3, 30, 20)
    with pytest.raises(OSError):  # a torn JPEG still fails (TorchCodec refuses it, then PIL)
        T.decode_image(jpegs[0][:200])


def test_visionflow_image_decoder_pil_turns_torchcodec_off(monkeypatch):
    monkeypatch.setenv(T.DECODER_ENV, "pil")
    T._codec_decoders.cache_clear()
    try:
        assert T._codec_decoders() is None and T.decoder_name() == "PIL"
    finally:
        monkeypatch.delenv(T.DECODER_ENV)
        T._codec_decoders.cache_clear()
    assert T.decoder_name() == "torchcodec"
