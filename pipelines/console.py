"""A progress bar for long work in a terminal: done/total, items/s, ETA, and the caller's own fields.

On a terminal it redraws one line in place; into a file or a pipe (a job's log) it writes a plain line
at most every ``every_s`` seconds, and always the last one.
"""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``with Progress(total, "predict", unit="img") as bar: bar.update(n, loss=0.3)``."""

    def __init__(self, total: int | None, label: str, unit: str = "it", out=None, every_s: float = 5.0,
                 width: int = 24):
        self.total, self.label, self.unit = total, label, unit
        self.out = out or sys.stderr
        self.every_s, self.width = every_s, width
        self.done = 0
        self.fields: dict = {}
        self.t0 = time.perf_counter()
        self._last = float("-inf")  # the first update is always written
        self._pending = False  # into a pipe: an update not written yet (it came between two lines)
        self._final_written = False
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [self.label]
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * self.width)
            parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}")
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            parts.append(f"{rate:.1f} {self.unit}/s")
            parts.append(f"elapsed {_clock(elapsed)}" + (f" eta {_clock(eta)}" if eta == eta else ""))
        else:
            parts += [f"{self.done} {self.unit}", f"{rate:.1f} {self.unit}/s", f"elapsed {_clock(elapsed)}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items()]
        return "  ".join(parts)

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.perf_counter()
        final = self.total is not None and self.done >= self.total
        if self._tty:
            if final or now - self._last >= 0.1:
                self.out.write("\r" + self.line() + "\033[K")
                self.out.flush()
                self._last = now
        elif (final and not self._final_written) or now - self._last >= self.every_s:
            self.out.write(self.line() + "\n")
            self.out.flush()
            self._last, self._pending, self._final_written = now, False, final
        else:
            self._pending = True

    def close(self) -> None:
        """Ends the bar: on a terminal the line is finished; into a pipe the last state is written unless
        it already was (work that stopped short of ``total``, or came between two lines)."""
        if self._tty:
            self.out.write("\r" + self.line() + "\033[K\n")
            self.out.flush()
        elif self._pending:
            self.out.write(self.line() + "\n")
            self.out.flush()
            self._pending = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
