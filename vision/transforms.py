"""Image + target transforms for every task, on ``torchvision.transforms.v2`` and ``tv_tensors``.

Pure torch/torchvision (no Ray): Ray Data calls these per row, and so can Serve or a plain
``DataLoader``. A flip or a scale moves the pixels, boxes and masks in one call; a sanitize step then
drops the instances that became empty. Randomness comes from torch's generator, seeded per row with
:func:`seed_for`, so a (seed, epoch) pair always gives the same augmentation and epochs differ.
"""
from __future__ import annotations

import functools
import io
import os
import warnings

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# Detection/segmentation train-time scale jitter around the training size.
SCALE_RANGE = (0.75, 1.25)
_XYXY = tv_tensors.BoundingBoxFormat.XYXY
# Classification crops: context added around the object box (fraction of its size).
CROP_CONTEXT = 0.1


def _seed_torch(seed: int) -> None:
    # The CPU generator alone: torch.manual_seed also seeds every accelerator and costs ~10 ms a call.
    torch.default_generator.manual_seed(int(seed))


def seed_for(seed: int, epoch: int, *keys: int) -> int:
    """A 63-bit seed mixed from (seed, epoch, *keys), e.g. keys = (image_id, instance index)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF,
                                    *[int(k) & 0xFFFFFFFFFFFF for k in keys]])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)


_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
# Set to "pil" to decode every image with PIL (where TorchCodec misbehaves on a platform; the data benchmark's
# ``--decoder pil``). Read once per process, so set it before the cluster's workers start.
DECODER_ENV = "VISIONFLOW_IMAGE_DECODER"


@functools.cache
def _codec_decoders():
    """TorchCodec's JPEG and PNG decoders, or None: when ``VISIONFLOW_IMAGE_DECODER=pil``, when it is not
    installed, or when it does not load with this torch (its native library is built against one torch
    release; a warning says so once)."""
    if os.environ.get(DECODER_ENV, "").lower() == "pil":
        return None
    try:
        from torchcodec.decoders import decode_jpeg, decode_png
    except ModuleNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 -- a native library that does not load: PIL decodes instead
        warnings.warn(f"torchcodec does not load ({type(e).__name__}: {e}); images are decoded with PIL")
        return None
    return {"jpeg": decode_jpeg, "png": decode_png}


def decoder_name() -> str:
    """"torchcodec" where :func:`decode_image` uses TorchCodec for 8-bit JPEG/PNG in this process, else "PIL"."""
    return "torchcodec" if _codec_decoders() is not None else "PIL"


def _codec_for(data: bytes):
    """The TorchCodec decoder that gives PIL's pixels for ``data``, or None. TorchCodec turns an image by
    its EXIF orientation and scales 16-bit PNG samples with rounding; PIL's path here does neither, so
    those go to PIL: a JPEG with an APP1 (EXIF) marker anywhere, a PNG with an eXIf chunk or not 8 bits."""
    codec = _codec_decoders()
    if codec is None:
        return None
    if data[:3] == _JPEG:
        return None if b"\xff\xe1" in data else codec["jpeg"]
    if data[:8] == _PNG:
        # IHDR is the first chunk; its bit depth is byte 24.
        return codec["png"] if len(data) > 24 and data[24] == 8 and b"eXIf" not in data else None
    return None


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 tensor (3, H, W), RGB.

    For bytes that were already checked (ingest decoded every shard's image in full, within its pixel
    limit): 8-bit JPEG and PNG without EXIF go to TorchCodec's decoders (libjpeg-turbo, libpng: PIL's pixels
    at less cost, docs/data.md); anything else, or a file TorchCodec refuses, to PIL. Neither path applies
    an EXIF orientation (ingest stores images upright).
    """
    decode = _codec_for(data)
    if decode is not None:
        try:
            return decode(data, mode="RGB")
        except RuntimeError:
            pass  # PIL's error, or its image, below
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_masks(rles: list[dict], height: int, width: int) -> torch.Tensor:
    """COCO RLE dicts ({"size", "counts"} with str or bytes counts) -> uint8 tensor (N, H, W)."""
    if not rles:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    fixed = [{"size": [int(s) for s in r["size"]],
              "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]}
             for r in rles]
    return torch.from_numpy(np.ascontiguousarray(mask_utils.decode(fixed).transpose(2, 0, 1)))


def encode_mask(mask) -> dict:
    """A binary HxW mask -> compressed COCO RLE ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _per_instance(sample):
    # Sanitize drops labels and iscrowd together with their boxes (masks are found on their own).
    target = sample[1]
    return tuple(target[k] for k in ("labels", "iscrowd") if k in target)


@functools.lru_cache(maxsize=64)
def detection_transform(size: int, train: bool, scale_range=SCALE_RANGE, flip_p: float = 0.5):
    """The detection/segmentation transform on ``(image, target)``.

    Train: random horizontal flip, scale jitter so the image fits ``size`` x ``size`` times a factor
    in ``scale_range`` (aspect kept), then sanitize. Eval: the identity (detectors see the original size).
    Built once per setting (the modules hold no state: each call draws from torch's generator). The
    definition: :func:`transform_detection` runs the same draws and kernels without the ``Compose``, and a
    test holds the two equal.
    """
    if not train:
        return v2.Identity()
    return v2.Compose([
        v2.RandomHorizontalFlip(p=flip_p),
        v2.ScaleJitter(target_size=(size, size), scale_range=scale_range, antialias=True),
        v2.SanitizeBoundingBoxes(labels_getter=_per_instance),
    ])


def to_tv(image: torch.Tensor, boxes, labels, iscrowd=None, masks=None) -> tuple:
    """Wrap plain tensors as ``(tv_tensors.Image, target dict)`` ready for a v2 transform."""
    h, w = image.shape[-2:]
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4),
                                          format="XYXY", canvas_size=(h, w)),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1),
    }
    if iscrowd is not None:
        target["iscrowd"] = torch.as_tensor(np.asarray(iscrowd, dtype=np.uint8)).reshape(-1)
    if masks is not None:
        target["masks"] = tv_tensors.Mask(masks)
    return tv_tensors.Image(image), target


def transform_detection(image, boxes, labels, *, size: int, train: bool, iscrowd=None, masks=None,
                        seed: int | None = None, scale_range=SCALE_RANGE, flip_p: float = 0.5):
    """Run :func:`detection_transform` on one image and its instances.

    Takes a uint8 (3, H, W) image, boxes (N, 4) xyxy pixels, labels (N,), optional iscrowd (N,) and
    masks: (N, H, W), or the N instances' COCO RLEs (``{"size": [H, W], "counts"}``), which a training draw
    decodes, flips and resizes one at a time and only for the instances it keeps (N full-size masks at once
    are N x H x W bytes: 200 objects on a 4000 x 3000 image, 2.4 GB, twice over with the flip).
    ``seed`` makes the draw reproducible. Returns ``(image uint8 (3, H', W'), target)`` with ``boxes``
    float32, ``labels`` int64 and, when given, ``iscrowd`` and ``masks`` uint8 (N', H', W').

    The same draws and the same torchvision kernels as :func:`detection_transform`, called directly on
    plain tensors: bit for bit its result (``tests/test_data_transforms.py``) at half its cost per image
    (the ``Compose``'s tv_tensors dispatch and pytree walks were most of it; docs/data.md).
    """
    if seed is not None:
        _seed_torch(seed)
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    out = {"boxes": b, "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)}
    if iscrowd is not None:
        out["iscrowd"] = torch.as_tensor(np.asarray(iscrowd, dtype=np.uint8)).reshape(-1)
    h, w = image.shape[-2:]
    for key in ("labels", "iscrowd"):
        if key in out and len(out[key]) != len(b):
            raise ValueError(f"{len(out[key])} {key} for {len(b)} boxes")
    rles = None
    if isinstance(masks, (list, tuple)):
        rles, masks = _checked_rles(masks, len(b), h, w), None
    elif masks is not None:
        masks = torch.as_tensor(masks)
        if tuple(masks.shape) != (len(b), h, w):
            raise ValueError(f"masks of shape {tuple(masks.shape)} for {len(b)} boxes on a {h}x{w} image: "
                             f"expected ({len(b)}, {h}, {w})")
    if train:
        flip = bool(torch.rand(1) < flip_p)  # v2.RandomHorizontalFlip's draw
        if flip:
            image = F.horizontal_flip_image(image)
            b = F.horizontal_flip_bounding_boxes(b, format=_XYXY, canvas_size=(h, w))
        # v2.ScaleJitter's draw and size
        scale = scale_range[0] + torch.rand(1) * (scale_range[1] - scale_range[0])
        r = min(size / h, size / w) * scale
        new = [max(1, int(h * r)), max(1, int(w * r))]  # a 300 x 1 image: v2 would ask for 0 pixels
        image = F.resize_image(image, new, antialias=True)
        b, canvas = F.resize_bounding_boxes(b, canvas_size=(h, w), size=new)
        b, valid = F.sanitize_bounding_boxes(b, format=_XYXY, canvas_size=canvas)  # v2.SanitizeBoundingBoxes
        out = {**{k: v[valid] for k, v in out.items()}, "boxes": b}
        # Masks after the sanitize, only the kept ones (each mask is flipped and resized on its own either way)
        if rles is not None:
            kept = [rle for rle, keep in zip(rles, valid.tolist()) if keep]
            masks = torch.stack([_flip_resize(decode_masks([rle], h, w), flip, new)[0] for rle in kept]) \
                if kept else torch.zeros((0, *new), dtype=torch.uint8)
        elif masks is not None:
            masks = _flip_resize(masks[valid], flip, new)
    elif rles is not None:
        masks = decode_masks(rles, h, w)  # evaluation keeps the original size: every mask in full
    out["boxes"] = out["boxes"].float()
    if masks is not None:
        out["masks"] = masks.to(torch.uint8)
    return image, out


def _flip_resize(masks: torch.Tensor, flip: bool, size: list[int]) -> torch.Tensor:
    return F.resize_mask(F.horizontal_flip_mask(masks) if flip else masks, size)


def _checked_rles(rles, n: int, height: int, width: int) -> list:
    if len(rles) != n:
        raise ValueError(f"{len(rles)} mask RLEs for {n} boxes")
    for rle in rles:
        if [int(s) for s in rle["size"]] != [height, width]:
            raise ValueError(f"a mask RLE of size {list(rle['size'])} on a {height}x{width} image")
    return list(rles)


def crop_box(box, height: int, width: int, *, train: bool, context: float = CROP_CONTEXT,
             seed: int | None = None) -> tuple[int, int, int, int]:
    """The integer crop ``(top, left, h, w)`` around an object box, with context, inside the image.

    Train: the context is jittered (0.5x..2x) and the centre shifted by up to 10% of the box size.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx, cy, ctx = (x1 + x2) / 2, (y1 + y2) / 2, context
    if train:
        g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
        u = torch.rand(3, generator=g).tolist()
        ctx = context * (0.5 + 1.5 * u[0])
        cx += (u[1] - 0.5) * 0.2 * bw
        cy += (u[2] - 0.5) * 0.2 * bh
    half_w, half_h = bw * (1 + 2 * ctx) / 2, bh * (1 + 2 * ctx) / 2
    left, right = max(int(np.floor(cx - half_w)), 0), min(int(np.ceil(cx + half_w)), width)
    top, bottom = max(int(np.floor(cy - half_h)), 0), min(int(np.ceil(cy + half_h)), height)
    return top, left, max(bottom - top, 1), max(right - left, 1)


def classification_crop(image: torch.Tensor, box, *, size: int, train: bool, seed: int | None = None):
    """An object crop of a uint8 (3, H, W) image, resized to (3, size, size); train adds jitter and flip."""
    h, w = image.shape[-2:]
    top, left, ch, cw = crop_box(box, h, w, train=train, seed=seed)
    crop = F.resized_crop(image, top, left, ch, cw, [size, size], antialias=True)
    if train:
        g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
        if torch.rand((), generator=g).item() < 0.5:
            crop = F.horizontal_flip(crop)
    return crop


def localization_transform(size: int, train: bool):
    """The localization transform: (train) flip and a mild scale/shift, then resize to size x size."""
    steps = [v2.Resize((size, size), antialias=True)]
    if train:
        steps = [v2.RandomHorizontalFlip(p=0.5),
                 v2.RandomAffine(degrees=0, translate=(0.05, 0.05), scale=(0.85, 1.15)),
                 v2.ClampBoundingBoxes()] + steps
    return v2.Compose(steps)


def transform_localization(image: torch.Tensor, box, label: int, *, size: int, train: bool,
                           seed: int | None = None):
    """One image and its main object -> ``(uint8 (3, size, size), box float32 (4,) xyxy pixels)``.

    If the random shift pushed the object out of view, the draw falls back to flip + resize.
    """
    if seed is not None:
        _seed_torch(seed)
    img, target = to_tv(image, [box], [label])
    out_img, out_t = localization_transform(size, train)(img, target)
    out_box = out_t["boxes"].as_subclass(torch.Tensor)[0]
    if train and (out_box[2] - out_box[0] < 1 or out_box[3] - out_box[1] < 1):
        flip = torch.rand(()) < 0.5
        steps = ([v2.RandomHorizontalFlip(p=1.0)] if flip else []) + [v2.Resize((size, size), antialias=True)]
        out_img, out_t = v2.Compose(steps)(img, target)
        out_box = out_t["boxes"].as_subclass(torch.Tensor)[0]
    return out_img.as_subclass(torch.Tensor), out_box.float()


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes (N, 4) that enclose each non-empty mask of (N, H, W) (pixel edges, so x2 = last + 1)."""
    from torchvision.ops import masks_to_boxes

    boxes = masks_to_boxes(masks.bool()).float()
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])
