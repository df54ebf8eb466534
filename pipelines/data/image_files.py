"""Reading the image files a COCO JSON names: only inside the images root, never more than a cap.

A ``file_name`` is data from the annotation file, so it is not trusted as a path: on the local
filesystem the real path (symlinks resolved) must lie under the real images root; on object stores
(``s3://`` ...) a name may not be absolute nor have ``..`` segments. A file is read only up to
``max_image_bytes`` (its size is checked first, and the read stops one byte past the cap).
"""
from __future__ import annotations

import os

import pyarrow.fs as pafs

from pipelines.storage import join

DEFAULT_MAX_IMAGE_BYTES = 64 << 20
OUTSIDE = "outside images root"


class OutsideRoot(ValueError):
    """A file name that leads out of the images root."""


class TooManyBytes(ValueError):
    """A file larger than the byte cap."""


def image_path(filesystem: pafs.FileSystem, root: str, name: str) -> str:
    """Where ``name`` lives under ``root``; raises OutsideRoot when that is not under ``root``."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        if os.path.isabs(name):
            raise OutsideRoot(f"{OUTSIDE}: {name!r} is an absolute path")
        real_root = os.path.realpath(root)
        path = os.path.realpath(os.path.join(real_root, name))
        if os.path.commonpath([real_root, path]) != real_root:
            raise OutsideRoot(f"{OUTSIDE}: {name!r} resolves to {path}, not under {real_root}")
        return path
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or "://" in name or ".." in parts:
        raise OutsideRoot(f"{OUTSIDE}: {name!r} is absolute or has '..' segments")
    return join(root, name)


def read_image_file(filesystem: pafs.FileSystem, path: str, max_bytes: int) -> bytes:
    """The bytes of the file at ``path``: FileNotFoundError when absent, IsADirectoryError for a
    directory, ValueError for anything else that is not a regular file, TooManyBytes over the cap."""
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type == pafs.FileType.Directory:
        raise IsADirectoryError(path)
    if info.type != pafs.FileType.File:
        raise ValueError("unreadable: not a regular file")
    if info.size is not None and info.size > max_bytes:
        raise TooManyBytes(_too_many(f"{info.size} bytes", max_bytes))
    with filesystem.open_input_stream(path) as f:
        data = f.read(max_bytes + 1)  # the size may have been wrong (or grown): never more than the cap
    if len(data) > max_bytes:
        raise TooManyBytes(_too_many("more bytes", max_bytes))
    return data


def _too_many(size: str, cap: int) -> str:
    return f"too large: {size}, over the max_image_bytes cap of {cap} bytes ({cap / (1 << 20):g} MiB)"
