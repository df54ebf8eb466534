"""Image bytes -> an upright, 8-bit RGB PIL image: the one decoder for ingest and the Serve preprocess.

- The pixel count is read from the header (PIL opens lazily) and checked against ``max_pixels`` before
  anything is decoded, so a decompression bomb never is.
- The EXIF orientation is applied (``ImageOps.exif_transpose``): the size that comes back is the size the
  image is shown at, which is what COCO's width/height describe.
- 16-bit samples are scaled to 8 bits (``value >> 8``: 1000 -> 3), not clipped to 255 as PIL's
  ``convert`` does. 16-bit RGB(A) PNGs PIL already reads as 8 bits the same way.
- Transparent pixels are put over white, as a browser shows them.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# PIL modes with 16-bit (or wider integer) samples; "I" is what 16-bit TIFFs and older Pillows give.
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S")


class ImageError(ValueError):
    """Bytes that are not a usable image; the message is the reason."""


class UnknownFormat(ImageError):
    """The header is not one of the allowed formats (or not an image at all)."""


class BrokenImage(ImageError):
    """The header was read but the pixels could not be (truncated, corrupt)."""


class TooManyPixels(ImageError):
    """Width x height over the limit, found from the header before decoding."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"too many pixels: {width}x{height} = {width * height}, over the limit of {limit}")
        self.width, self.height, self.limit = width, height, limit


@dataclass(frozen=True)
class Decoded:
    """``image``: RGB, upright, 8 bits; what the source was: ``format``, ``mode``, whether an EXIF
    orientation was applied (``oriented``) and whether its samples had 16 bits (``deep``)."""

    image: Image.Image
    format: str
    mode: str
    oriented: bool
    deep: bool

    @property
    def plain_rgb(self) -> bool:
        """True when any decoder shows the source bytes as ``image`` (8-bit RGB, no orientation)."""
        return self.mode == "RGB" and not self.oriented and not self.deep


def _broken(e: Exception) -> BrokenImage:
    msg = str(e)
    if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
        return BrokenImage(f"truncated: {msg}")
    return BrokenImage(f"not decodable: {msg}")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 -- a broken EXIF block is ignored, as viewers do
        return 1


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit (or "I") single-channel image as 8-bit "L", by its high byte."""
    arr = np.asarray(im).astype(np.int64)
    return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")


def _rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def read_image(data: bytes, max_pixels: int, formats: list[str] | None = None) -> Decoded:
    """Decode ``data`` fully (only ``formats``, PIL names like "JPEG", when given). Raises
    UnknownFormat, TooManyPixels (from the header, before decoding) or BrokenImage."""
    if not data:
        raise UnknownFormat("empty file")
    with warnings.catch_warnings():
        # PIL warns (or raises) about big images by its own limit; ``max_pixels`` is the rule here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=formats)
        except UnidentifiedImageError:
            raise UnknownFormat("not decodable: not a recognised image format") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"too many pixels: {e}; the limit is {max_pixels}") from None
        except Exception as e:  # noqa: BLE001 -- a header PIL cannot parse
            raise UnknownFormat(f"not decodable: {e}") from None
        w, h = im.size
        if w * h > max_pixels:
            raise TooManyPixels(w, h, max_pixels)
        if w < 1 or h < 1:
            raise BrokenImage(f"not decodable: empty size {w}x{h}")
        fmt, mode = im.format, im.mode
        deep = mode in DEEP_MODES or any(";16" in str(getattr(t, "args", "")) for t in im.tile)
        try:
            im.load()  # the full decode: only this notices a truncated file
            oriented = _orientation(im) in range(2, 9)  # 1: upright; others are not orientations
            if oriented:
                im = ImageOps.exif_transpose(im)
        except Exception as e:  # noqa: BLE001 -- OSError, SyntaxError, ValueError ... from a decoder
            raise _broken(e) from None
    if im.mode in DEEP_MODES:
        im = _to_8bit(im)
    return Decoded(_rgb(im), fmt, mode, oriented, deep)


def open_image(data: bytes, max_pixels: int, formats: list[str] | None = None) -> Image.Image:
    """``data`` as an upright 8-bit RGB image; the errors of :func:`read_image`."""
    return read_image(data, max_pixels, formats).image
