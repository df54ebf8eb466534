"""What Ray Data prints on the console while a training runs.

A training executes a view every epoch and for its validation. Left to Ray Data's defaults, each execution
put its start line, its plan, its progress bars (blank lines where tqdm is not installed) and an
"execution finished" line on the console of every worker, forwarded to the user's terminal: most of the
1,247 lines of a ``make run``, around the trainings' own progress lines. These two calls keep them in
Ray Data's log file (``logs/ray-data/ray-data.log`` in the session's folder) instead, with Ray Data's warning
that the progress bars are off. A run's data stage does the same for its ingest (``ingest(quiet=True)``).

A fit with several workers runs each epoch's split in a split coordinator process of Ray Data's, which
sets up Ray Data's logging afresh when it starts: on a local cluster this project starts, every process
gets the same settings from a logging config of Ray Data's own kind (``ray_private.quiet_data_logging_config``,
through ``RAY_DATA_LOGGING_CONFIG``, set by ``ray_runtime.connect``).
"""
from __future__ import annotations

import logging
import os

from pipelines.ray_private import DATA_LOGGING_CONFIG_ENV as LOGGING_CONFIG_ENV
from pipelines.ray_private import DropProgressBarsNotice


def quiet_execution(ds):
    """``ds`` (returned) executes without progress bars: the training's own progress line says how far it is.
    The setting is on the dataset's ``DataContext``, which the datasets derived from one read share (the
    driver's own context is a separate copy)."""
    ds.context.enable_progress_bars = False
    return ds


def quiet_data_console() -> None:
    """In this process, Ray Data's console handler passes warnings and errors only; its log file still gets
    everything. Ray Data's default logging config names that handler ``console``; a process whose user set
    ``RAY_DATA_LOGGING_CONFIG`` keeps the user's config as it is."""
    import ray.data  # noqa: F401 -- configures Ray Data's loggers on import

    if os.environ.get(LOGGING_CONFIG_ENV):
        return
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() != "console":
            continue
        if handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)
        if not any(isinstance(f, DropProgressBarsNotice) for f in handler.filters):
            handler.filters.insert(0, DropProgressBarsNotice())

