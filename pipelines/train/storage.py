"""Run-directory files on a local path or a URI (``s3://...``), through pyarrow's filesystems."""
from __future__ import annotations

import json

import pyarrow.fs as pafs

from pipelines.data.fs import join, read_bytes, resolve

__all__ = ["join", "read_bytes", "resolve", "write_bytes", "read_json", "write_json", "append_metrics",
           "read_metrics", "exists", "list_dirs"]


def write_bytes(uri: str, name: str, data: bytes) -> str:
    """Write ``data`` to ``uri/name`` (parents created); returns the full path or URI."""
    fs, root = resolve(uri)
    path = join(root, name)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return join(uri, name) if "://" in str(uri) else path


def write_json(uri: str, name: str, obj) -> str:
    return write_bytes(uri, name, json.dumps(obj, indent=2, default=str).encode())


def read_json(uri: str, name: str | None = None):
    """The JSON document at ``uri`` (or ``uri/name``); None when absent."""
    fs, root = resolve(uri)
    try:
        return json.loads(read_bytes(fs, join(root, name) if name else root))
    except FileNotFoundError:
        return None


def exists(uri: str, name: str = "") -> bool:
    fs, root = resolve(uri)
    return fs.get_file_info(join(root, name) if name else root).type != pafs.FileType.NotFound


def list_dirs(uri: str, name: str = "") -> list[str]:
    """Names of the directories directly under ``uri/name`` (empty when it does not exist)."""
    fs, root = resolve(uri)
    base = join(root, name) if name else root
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_metrics(uri: str) -> list[dict]:
    """The per-epoch records of ``uri/metrics.jsonl`` (empty when there are none yet)."""
    fs, root = resolve(uri)
    try:
        text = read_bytes(fs, join(root, "metrics.jsonl")).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def append_metrics(uri: str, record: dict) -> None:
    """Add one epoch's record to ``uri/metrics.jsonl``. Records of that epoch or later (left by a run that
    died before checkpointing them) are dropped first, so a resumed run never duplicates an epoch."""
    kept = [r for r in read_metrics(uri) if r.get("epoch", -1) < record["epoch"]]
    text = "".join(json.dumps(r) + "\n" for r in [*kept, record])
    write_bytes(uri, "metrics.jsonl", text.encode())
