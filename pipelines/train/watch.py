"""Watching a training run, all written by the rank-0 worker:

- a progress bar per epoch (``pipelines.console.Progress`` on the worker's stdout, which Ray streams to the
  driver): images of all workers, images/s, step, running loss, ETA; on a terminal one line redrawn, into a
  pipe or a log a line every few seconds and the last one;
- TensorBoard event files under ``RUN_DIR/tensorboard/``: every numeric field of each epoch's record
  (``train/loss``, ``val/top1``, ``lr``...), step = epochs finished; a resumed run purges the steps it
  trains again;
- ``RUN_DIR/metrics.csv``: ``metrics.jsonl``'s records (``read_metrics``: one row per epoch, a re-trained
  epoch's last record) rewritten whole, atomically, after every epoch;
- ``RUN_DIR/curves.png``: train/val loss and the main metric by epoch (``pipelines.reports.curves``).

None of it may stop a training: a failure to write them is said once, in one line, and training goes on.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile

from pipelines import storage
from pipelines.console import Progress

TENSORBOARD = "tensorboard"
METRICS_CSV = "metrics.csv"
CURVES = "curves.png"
_NOT_SCALARS = {"epoch", "start_epoch"}


def _say(line: str) -> None:
    """A warning for the user: on stderr, like every other ``visionflow <cmd>:`` line."""
    out = sys.__stderr__ or sys.stderr
    out.write(line + "\n")
    out.flush()


def expected_rows(task: str, manifest: dict, max_images: int | None = None) -> int | None:
    """Rows of a view (train per epoch, or val) from its split's manifest, before the first epoch counted them:
    a classification view has a row per object (crowd and tiny ones dropped: an upper bound), the others a
    row per image (localization drops images without an object). ``max_images``: the view reads only that
    many of the split's images (``--limit-train-images``); a classification view's objects are then estimated at
    the split's mean per image."""
    images, instances = manifest.get("num_images"), manifest.get("num_instances")
    if not isinstance(images, int) or images <= 0:
        return None
    used = images if max_images is None else min(images, max_images)
    if task != "classification":
        return used
    if not isinstance(instances, int) or instances <= 0:
        return None
    return max(1, round(instances * used / images))


def expected_split_rows(cfg) -> dict:
    """``expected_rows`` of the run's train and val splits: {"train": n, "val": n} (None where unknown)."""
    from pipelines import storage
    from pipelines.data import read_manifest

    return {split: expected_rows(cfg.task, read_manifest(storage.join(str(cfg.data), split)),
                                 cfg.limit_train_images if split == "train" else None)
            for split in ("train", "val")}


class EpochBar:
    """One epoch's progress bar on rank 0: ``update(images_in_batch, loss)`` per step. ``total_images`` is
    the epoch's images over all workers (None: unknown, no ETA); shards are equal, so rank 0's count times
    the number of workers is the whole group's."""

    def __init__(self, label: str, total_images: int | None, *, batch_size: int, world: int, out=None,
                 every_s: float = 5.0):
        self.world = max(1, int(world))
        self.steps = math.ceil(total_images / self.world / batch_size) if total_images else None
        self.bar = Progress(total_images, label, unit="img", out=out or sys.__stdout__ or sys.stdout,
                            every_s=every_s)
        self.step, self._loss, self._n = 0, 0.0, 0.0

    def update(self, images: int, loss: float) -> None:
        self.step += 1
        self._loss += float(loss) * images
        self._n += images
        step = f"{self.step}/{max(self.steps, self.step)}" if self.steps else str(self.step)
        self.bar.update(images * self.world, step=step, loss=self._loss / max(self._n, 1e-9))

    def close(self) -> None:
        self.bar.close()


def scalars(record: dict) -> dict[str, float]:
    """TensorBoard tags of an epoch's record: ``train_x`` -> ``train/x``, ``val_x`` -> ``val/x``, other
    numbers by their own name (``lr``, ``workers``); lists, strings and non-finite values are left out."""
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(float(value)):
            continue
        if key.startswith("train_"):
            tag = "train/" + key[len("train_"):]
        elif key.startswith("val_"):
            tag = "val/" + key[len("val_"):]
        else:
            tag = key
        out[tag] = float(value)
    return out


def write_atomic(out: str, name: str, data: bytes) -> str:
    """``data`` at ``out/name``: locally through a temporary file and a rename (a reader never sees half a
    file); object stores publish an object only when its upload completes."""
    run = storage.RunDir(out)
    if run.remote:
        return run.write_bytes(name, data)
    target = run.local(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(target)


def metrics_csv(records: list[dict]) -> str:
    """The records as CSV: one row per epoch, the columns of every record in first-seen order; a list or a
    dict (``worker_nodes``) is its JSON text, a missing value an empty cell."""
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in records:
        writer.writerow(["" if r.get(c) is None else json.dumps(r[c]) if isinstance(r[c], (list, dict)) else r[c]
                         for c in columns])
    return buf.getvalue()


def write_metrics_csv(out: str) -> str:
    """Rewrite ``out/metrics.csv`` from ``out/metrics.jsonl`` (so a resumed run's CSV holds the same epochs as
    ``read_metrics``); returns its path."""
    return write_atomic(out, METRICS_CSV, metrics_csv(storage.read_metrics(out)).encode())


def write_curves(out: str, task: str | None, title: str) -> str:
    from pipelines.reports.curves import run_curves

    return write_atomic(out, CURVES, run_curves(storage.read_metrics(out), task, title))


class Board:
    """TensorBoard event files of a run: ``log(record)`` after each epoch. On remote storage the events are
    written to a local folder and uploaded to ``RUN_DIR/tensorboard`` after each epoch."""

    def __init__(self, out: str, start_epoch: int):
        self.out, self.writer, self._tmp = out, None, None
        run = storage.RunDir(out)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                _say("tensorboard is not installed: no TensorBoard events for this run (pip install tensorboard)")
                return
        if run.remote:
            self._tmp = tempfile.mkdtemp(prefix="visionflow-tb-")
            logdir = self._tmp
        else:
            logdir = str(run.local(TENSORBOARD))
        # Steps are epochs finished: a run resumed after epoch `start_epoch` trains step start_epoch + 1 on, and
        # TensorBoard drops what an earlier writer logged from that step on (epochs trained again).
        self.writer = SummaryWriter(logdir, purge_step=start_epoch + 1 if start_epoch > 0 else None)

    def log(self, record: dict) -> None:
        if self.writer is None:
            return
        step = int(record["epoch"]) + 1
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        if self._tmp is not None:
            storage.RunDir(self.out).upload_dir(self._tmp, TENSORBOARD)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Watch:
    """Rank 0's files of a run; ``after_epoch(record)`` once the record is in ``metrics.jsonl``. Each
    failure is said once in one line and the others go on."""

    def __init__(self, out: str, task: str | None, title: str, start_epoch: int):
        self.out, self.task, self.title = out, task, title
        self._warned: set[str] = set()
        self.board = self._try("tensorboard", lambda: Board(out, start_epoch))

    def _try(self, what: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- watching must never stop a training
            if what not in self._warned:
                self._warned.add(what)
                _say(f"visionflow train: could not write {what} ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0]}); training goes on")
            return None

    def after_epoch(self, record: dict) -> None:
        if self.board is not None:
            self._try("tensorboard", lambda: self.board.log(record))
        self._try(METRICS_CSV, lambda: write_metrics_csv(self.out))
        self._try(CURVES, lambda: write_curves(self.out, self.task, self.title))

    def close(self) -> None:
        if self.board is not None:
            self._try("tensorboard", self.board.close)
