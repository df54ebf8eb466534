"""The run directory on any filesystem pyarrow reaches: a local path, ``file://``, ``s3://``, ``gs://``.

Stages write their outputs and records through this, so a run directory on object storage survives the
cluster that wrote it and a rerun from anywhere resumes it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://``, ``gs://`` ...); False for local paths and ``file://``."""
    return "://" in str(uri) and not str(uri).startswith("file://")


class RunDir:
    """A directory tree addressed by relative names (``"archs/resnet18/train"``).

    ``uri`` is a local path or a URI; ``path(name)`` gives what to hand to a stage (a local absolute path, or
    a URI for remote storage), ``local(name)`` a local path or raises when the storage is remote.
    """

    def __init__(self, uri: str | os.PathLike):
        text = os.fspath(uri)
        if not text:
            raise ValueError("run_dir is empty; expected a local path or a URI such as s3://bucket/prefix")
        if "://" in text:
            self.fs, self.root = pafs.FileSystem.from_uri(text)
            scheme = text.split("://", 1)[0]
            self.uri = text.rstrip("/") if scheme != "file" else self.root
            if scheme == "file":
                text = self.root
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(text)
            self.uri = self.root
        self.remote = is_remote(self.uri)

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    def _abs(self, name: str) -> str:
        return self.root.rstrip("/") + ("/" + name.strip("/") if name.strip("/") else "")

    def path(self, name: str = "") -> str:
        """Where ``name`` lives, in the form stages take: a local path, or a URI on remote storage."""
        if not self.remote:
            return self._abs(name)
        return self.uri + ("/" + name.strip("/") if name.strip("/") else "")

    def local(self, name: str = "") -> Path:
        """A local path for ``name``; raises ValueError on remote storage."""
        if self.remote:
            raise ValueError(f"{self.uri} is remote storage; {name!r} has no local path")
        return Path(self._abs(name))

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._abs(name)).type != pafs.FileType.NotFound

    def makedirs(self, name: str) -> None:
        self.fs.create_dir(self._abs(name), recursive=True)

    def remove(self, name: str) -> None:
        """Delete ``name`` (a file or a whole tree) if it exists."""
        info = self.fs.get_file_info(self._abs(name))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._abs(name))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._abs(name))

    def read_json(self, name: str):
        """The JSON document at ``name``, or None when it does not exist."""
        info = self.fs.get_file_info(self._abs(name))
        if info.type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self._abs(name)) as f:
            return json.loads(f.read().decode())

    def write_json(self, name: str, doc) -> str:
        """Write ``doc`` as JSON at ``name`` so that a reader never sees half a file; returns its path."""
        data = (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode()
        parent = os.path.dirname(self._abs(name))
        self.fs.create_dir(parent, recursive=True)
        if self.remote:
            # Object stores publish an object only once its upload completes.
            with self.fs.open_output_stream(self._abs(name)) as f:
                f.write(data)
        else:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._abs(name))  # atomic on one filesystem
        return self.path(name)

    def write_bytes(self, name: str, data: bytes) -> str:
        self.fs.create_dir(os.path.dirname(self._abs(name)), recursive=True)
        with self.fs.open_output_stream(self._abs(name)) as f:
            f.write(data)
        return self.path(name)

    def upload_dir(self, local_dir: str | os.PathLike, name: str) -> str:
        """Copy a local directory tree to ``name``; returns its path."""
        self.makedirs(name)
        pafs.copy_files(os.fspath(local_dir), self._abs(name), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        return self.path(name)
