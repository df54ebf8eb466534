"""Decoding client images safely: formats allowed, size checked before decoding, no pickles ever.

Pure functions (PIL + torch); the Preprocess deployment calls them.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipelines.data.image_decode import BrokenImage, ImageError, TooManyPixels, UnknownFormat, open_image
from pipelines.serve.errors import not_an_image, too_large, unsupported_type

# Only these decoders may run on client bytes.
ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png"}
ALLOWED_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/octet-stream"}


def check_content_type(content_type: str | None) -> None:
    """Raise 415 unless the declared type is JPEG, PNG or unspecified bytes."""
    base = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if base not in ALLOWED_CONTENT_TYPES:
        raise unsupported_type(
            f"content type {base!r} is not supported; send image/jpeg or image/png bytes, "
            f"or multipart/form-data with a 'file' field")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG bytes to an upright RGB ``uint8`` array ``H x W x 3`` (the decoder ingest uses:
    ``pipelines.data.image_decode``, so EXIF orientation and 16-bit samples are handled as in training).

    Raises 400 for bytes that are not a JPEG/PNG image and 413 when width x height exceeds ``max_pixels``
    (checked from the header, so a decompression bomb is refused before it is decoded).
    """
    if not data:
        raise not_an_image("the request body is empty; expected JPEG or PNG image bytes")
    try:
        rgb = open_image(data, max_pixels, formats=list(ALLOWED_FORMATS))
    except TooManyPixels as e:
        raise too_large(f"image is {e.width}x{e.height} = {e.width * e.height} pixels; "
                        f"the limit is {max_pixels} pixels") from None
    except UnknownFormat:
        raise not_an_image("the body is not a JPEG or PNG image") from None
    except BrokenImage as e:
        raise not_an_image(f"the image could not be decoded: {e}") from None
    except ImageError as e:  # PIL's own decompression-bomb limit
        raise too_large(f"image is too large to decode ({e})") from None
    return np.asarray(rgb, dtype=np.uint8)


def to_tensor(rgb: np.ndarray, size: int, square: bool) -> tuple[torch.Tensor, tuple[float, float]]:
    """Resize an ``H x W x 3`` uint8 image and make it a float ``3 x h x w`` tensor in [0, 1].

    ``square``: resize to ``size x size`` (classifiers); else the longest side becomes ``size``
    (detectors, aspect kept). Returns the tensor and the ``(sx, sy)`` factors from sent to resized pixels.
    """
    h, w = rgb.shape[:2]
    if square:
        nw, nh = size, size
    else:
        s = size / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
    img = Image.fromarray(rgb)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    return t.contiguous(), (nw / w, nh / h)
