"""Preprocess deployment: client bytes -> checked, decoded, resized ``uint8`` tensor."""
from __future__ import annotations

import os
import time

from ray import serve

from pipelines.serve.errors import ApiError
from pipelines.serve.images import decode_image, to_tensor


@serve.deployment
class Preprocess:
    """Decodes JPEG/PNG, refuses oversized images, resizes for the model.

    ``__call__(data, size, square)`` returns ``{"image": uint8 3xhxw NumPy array, "scale": (sx, sy), "size": (w, h),
    "ms": float}`` or, for bad input, the :class:`ApiError` as a value (never raised: replicas stay up).
    """

    def __init__(self, max_image_pixels: int):
        self.max_image_pixels = int(max_image_pixels)

    def pid(self) -> int:
        """The replica's process id (tests read its memory from /proc)."""
        return os.getpid()

    def __call__(self, data: bytes, size: int, square: bool):
        t0 = time.perf_counter()
        try:
            rgb = decode_image(data, self.max_image_pixels)
        except ApiError as e:
            return e
        image, scale = to_tensor(rgb, size, square)
        # uint8 on the wire is 4x smaller than float; the model stage converts. A NumPy array: Ray moves
        # it as a buffer, a tensor through torch.save (see Detections.__reduce__).
        image = image.mul_(255).round_().byte().numpy()
        h, w = rgb.shape[:2]
        return {"image": image, "scale": scale, "size": (w, h), "ms": (time.perf_counter() - t0) * 1e3}
