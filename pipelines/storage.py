"""Paths on any filesystem pyarrow reaches: local paths and URIs (``file://``, ``s3://``, ``gs://`` ...).

``RunDir(uri)`` is a directory tree addressed by relative names; the free functions (``write_json(uri,
name, doc)``, ``read_json``, ``exists``, ``list_dirs``, ``read_metrics``, ``append_metrics`` ...) are the same
operations on a ``RunDir(uri)``. Stages and the trainer write their outputs and records through this, so a
run directory on object storage survives the cluster that wrote it and a rerun from anywhere resumes it.
JSON documents on local paths are written atomically (a temporary file, then ``os.replace``).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import pyarrow.fs as pafs

__all__ = ["RunDir", "is_remote", "resolve", "join", "read_bytes", "write_bytes", "read_json", "write_json",
           "exists", "list_dirs", "read_metrics", "append_metrics"]

METRICS = "metrics.jsonl"


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://``, ``gs://`` ...); False for local paths and ``file://``."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def resolve(path) -> tuple[pafs.FileSystem, str]:
    """Take a local path or a URI; return ``(filesystem, path inside it)``."""
    text = os.fspath(path)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    # "~/runs/x" from a YAML (no shell expanded it): the home folder, not a folder named "~" here
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


def same_place(a, b) -> bool:
    """Whether two local paths or URIs name the same place (as ``resolve`` reads them)."""
    if a is None or b is None:
        return False
    (fa, pa), (fb, pb) = resolve(str(a)), resolve(str(b))
    return type(fa) is type(fb) and pa.rstrip("/") == pb.rstrip("/")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rebase_paths(value, old: str, new: str):
    """``value`` (strings in dicts and lists, nested) with every path under the folder ``old`` moved under
    ``new``: a report written to a temporary folder and uploaded names its files where they were uploaded; a
    stage record of a run directory that was moved names the files where they are now."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old.rstrip("/") + "/") else value
    if isinstance(value, dict):
        return {k: rebase_paths(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rebase_paths(v, old, new) for v in value)
    return value


def join(root: str, name: str) -> str:
    """``root/name`` with forward slashes (object stores have no os.sep)."""
    return root.rstrip("/") + "/" + name.lstrip("/")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole file at ``path`` of ``fs``; raises FileNotFoundError when it is absent."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(path)
    with fs.open_input_stream(path) as f:
        return f.read()


class RunDir:
    """A directory tree addressed by relative names (``"archs/resnet18/train"``; ``""`` is the root).

    ``uri`` is a local path or a URI; ``path(name)`` gives what to hand to a stage (a local absolute path, or
    a URI for remote storage), ``local(name)`` a local path or raises when the storage is remote.
    """

    def __init__(self, uri: str | os.PathLike):
        text = os.fspath(uri)
        if not text:
            raise ValueError("run_dir is empty; expected a local path or a URI such as s3://bucket/prefix")
        self.fs, self.root = resolve(text)
        self.uri = self.root if "://" not in text or text.startswith("file://") else text.rstrip("/")
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

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self._abs(name)).type != pafs.FileType.NotFound

    def list_dirs(self, name: str = "") -> list[str]:
        """Names of the directories directly under ``name`` (empty when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._abs(name), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def makedirs(self, name: str) -> None:
        self.fs.create_dir(self._abs(name), recursive=True)

    def remove(self, name: str) -> None:
        """Delete ``name`` (a file or a whole tree) if it exists."""
        info = self.fs.get_file_info(self._abs(name))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._abs(name))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._abs(name))

    def move(self, src: str, dst: str) -> None:
        """Rename the tree ``src`` to ``dst`` (which must not exist): one rename on a local filesystem, a
        copy then delete on object stores, which cannot rename a prefix."""
        self.makedirs(os.path.dirname(dst.strip("/")) or "")
        try:
            self.fs.move(self._abs(src), self._abs(dst))
        except (OSError, NotImplementedError):
            if not self.remote:
                raise
            pafs.copy_files(self._abs(src), self._abs(dst), source_filesystem=self.fs, destination_filesystem=self.fs)
            self.remove(src)

    def read_bytes(self, name: str = "") -> bytes:
        """The whole file ``name``; raises FileNotFoundError when it is absent."""
        return read_bytes(self.fs, self._abs(name))

    def read_json(self, name: str = ""):
        """The JSON document at ``name``, or None when it does not exist."""
        try:
            return json.loads(self.read_bytes(name).decode())
        except (FileNotFoundError, IsADirectoryError):
            return None

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``data`` at ``name`` (parents created); returns its path."""
        with self.open_output(name) as f:
            f.write(data)
        return self.path(name)

    def open_output(self, name: str):
        """A binary output stream at ``name`` (parents created), for writers that stream (``torch.save``)."""
        self.fs.create_dir(os.path.dirname(self._abs(name)), recursive=True)
        return self.fs.open_output_stream(self._abs(name))

    def write_json(self, name: str, doc) -> str:
        """Write ``doc`` as JSON at ``name`` so that a reader never sees half a file; returns its path."""
        data = (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode()
        if self.remote:  # object stores publish an object only once its upload completes
            return self.write_bytes(name, data)
        parent = os.path.dirname(self._abs(name))
        self.fs.create_dir(parent, recursive=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old record (a power cut left it empty)
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 made records unreadable to others
        os.replace(tmp, self._abs(name))  # atomic on one filesystem
        return self.path(name)

    def read_metrics(self, name: str = METRICS) -> list[dict]:
        """The per-epoch records of the JSON-lines file ``name`` (empty when there are none yet), in epoch
        order. A line that does not parse (a record torn by a writer killed mid-line) is skipped with a
        warning. A record supersedes every earlier line of its epoch or later: a resumed run re-appends
        the epochs after its checkpoint, and what a run that died before checkpointing wrote is dropped."""
        try:
            data = self.read_bytes(name)
        except FileNotFoundError:
            return []
        records: list[dict] = []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
                warnings.warn(f"{self.path(name)}: line {number} is not a JSON record (a write cut short?); "
                              "skipped", RuntimeWarning, stacklevel=2)
                continue
            epoch = record.get("epoch") if isinstance(record, dict) else None
            if isinstance(epoch, int):
                records = [r for r in records if not (isinstance(r.get("epoch"), int) and r["epoch"] >= epoch)]
            records.append(record)
        return records

    def append_metrics(self, record: dict, name: str = METRICS) -> None:
        """Append one epoch's record to ``name`` as one JSON line. Earlier lines are never rewritten: on a
        local path the line is appended, flushed and fsynced; a torn last line (a writer killed mid-line)
        is cut off first. Object stores cannot append: the object is uploaded again whole (old bytes plus
        the line), and an object appears only once its upload completes. Readers resolve re-appended
        epochs (``read_metrics``)."""
        line = (json.dumps(record) + "\n").encode()
        if self.remote:
            try:
                old = self.read_bytes(name)
            except FileNotFoundError:
                old = b""
            self.write_bytes(name, _cut_torn_tail(old, self.path(name)) + line)
            return
        path = self._abs(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        created = not os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.ftruncate(fd, len(_cut_torn_tail(os.pread(fd, size, 0), path)))
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new directory entry survives a crash too
            _fsync_dir(os.path.dirname(path))

    def upload_dir(self, local_dir: str | os.PathLike, name: str) -> str:
        """Copy a local directory tree to ``name``; returns its path."""
        self.makedirs(name)
        pafs.copy_files(os.fspath(local_dir), self._abs(name), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        return self.path(name)


def _cut_torn_tail(data: bytes, where: str) -> bytes:
    """``data`` up to its last newline: what is after it is a record cut short (warned about)."""
    if not data or data.endswith(b"\n"):
        return data
    keep = data.rfind(b"\n") + 1
    warnings.warn(f"{where}: its last line was cut short ({len(data) - keep} bytes, a writer killed mid-line?); "
                  "dropped before appending", RuntimeWarning, stacklevel=3)
    return data[:keep]


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


# The same operations on the directory ``uri`` (a local path or a URI), for code that holds a URI.

def fingerprint(uri: str) -> dict:
    """What identifies the content at ``uri`` cheaply: a file's size, mtime and SHA-256; a directory's
    file count, total size and newest mtime (every file under it, not hashed: images are many and big).
    A file changed in place changes its fingerprint."""
    import hashlib

    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        digest = hashlib.sha256(read_bytes(fs, path)).hexdigest()
        return {"size": info.size, "mtime_ns": info.mtime_ns, "sha256": digest}
    if info.type == pafs.FileType.Directory:
        files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
        return {"files": len(files), "bytes": sum(i.size or 0 for i in files),
                "newest_mtime_ns": max((i.mtime_ns or 0 for i in files), default=0)}
    return {"missing": True}


def write_bytes(uri: str, name: str, data: bytes) -> str:
    """Write ``data`` to ``uri/name`` (parents created); returns the full path or URI."""
    return RunDir(uri).write_bytes(name, data)


def write_json(uri: str, name: str, doc) -> str:
    """Write ``doc`` as JSON to ``uri/name`` (atomically on local paths); returns the full path or URI."""
    return RunDir(uri).write_json(name, doc)


def read_json(uri: str, name: str = ""):
    """The JSON document at ``uri`` (or ``uri/name``); None when absent."""
    return RunDir(uri).read_json(name)


def exists(uri: str, name: str = "") -> bool:
    return RunDir(uri).exists(name)


def list_dirs(uri: str, name: str = "") -> list[str]:
    """Names of the directories directly under ``uri/name`` (empty when it does not exist)."""
    return RunDir(uri).list_dirs(name)


def read_metrics(uri: str) -> list[dict]:
    """The per-epoch records of ``uri/metrics.jsonl`` in epoch order (empty when there are none yet); a torn
    line is skipped with a warning, a re-appended epoch supersedes the earlier lines of it and later."""
    return RunDir(uri).read_metrics()


def append_metrics(uri: str, record: dict) -> None:
    """Append one epoch's record to ``uri/metrics.jsonl`` (flushed and fsynced; earlier lines untouched)."""
    RunDir(uri).append_metrics(record)
