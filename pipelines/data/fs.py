"""Paths on any filesystem pyarrow reaches: local paths and URIs such as ``s3://bucket/key``."""
from __future__ import annotations

import os

import pyarrow.fs as pafs


def resolve(path) -> tuple[pafs.FileSystem, str]:
    """Take a local path or a URI; return ``(filesystem, path inside it)``."""
    text = os.fspath(path)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(text)


def join(root: str, name: str) -> str:
    """``root/name`` with forward slashes (object stores have no os.sep)."""
    return root.rstrip("/") + "/" + name.lstrip("/")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole file at ``path``; raises FileNotFoundError when it is absent."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(path)
    with fs.open_input_stream(path) as f:
        return f.read()
