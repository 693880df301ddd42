"""Progress of a long run on stderr (quantize, calibrate, write, verify): one bar per phase, and time left.

Imports nothing from ptqtp; tqdm only when a bar is shown. Time left is measured, not guessed: the remaining
work at the rate of a moving window (`Eta`), and "estimating" until the window has seen enough of the run.
The first item of a run pays for warm-up (first touches of the file, allocations, thread pools), and a
rate taken from it promised 30 minutes for runs of 3.
"""

from __future__ import annotations

import sys
import time

WINDOW = 0.10  # the rate is taken over the last tenth of the work done ...
MIN_ITEMS = 3  # ... once this many items finished after the first one
MIN_WORK = 0.05  # ... and they hold this share of the work


class Eta:
    """Seconds left of a run of `total` work units, from the rate over a trailing window.

    Feed it `add(now, done)` after each item (`done`: work finished so far). The first item is warm-up and
    never enters the rate; the window then spans the last `WINDOW` of the total work (all of it since the
    warm-up while less has been done), so a slow start is forgotten and work of uneven items evens out.
    """

    def __init__(self, total: float):
        self.total = float(total)
        self.samples: list[tuple[float, float]] = []  # (time, work done), the first after the warm-up item
        self._start = 0  # index of the window's first sample (only moves forward: work done only grows)

    def add(self, now: float, done: float) -> None:
        self.samples.append((now, float(done)))

    def restart(self) -> None:
        """Forget the samples (work done meanwhile took no time, e.g. skipped by a resume)."""
        self.samples.clear()
        self._start = 0

    def seconds_left(self) -> float | None:
        """None while estimating: fewer than `MIN_ITEMS` items or `MIN_WORK` of the work past the warm-up."""
        if len(self.samples) < MIN_ITEMS + 1 or self.total <= 0:
            return None
        t_now, w_now = self.samples[-1]
        w0 = self.samples[0][1]
        if w_now - w0 < MIN_WORK * self.total:
            return None
        while (self._start + 1 < len(self.samples)  # the latest sample still a full window back
               and self.samples[self._start + 1][1] <= w_now - WINDOW * self.total):
            self._start += 1
        t_start, w_start = self.samples[self._start]
        if t_now <= t_start or w_now <= w_start:
            return None
        return max(0.0, self.total - w_now) * (t_now - t_start) / (w_now - w_start)


def format_seconds(s: float) -> str:
    """1:02:05, 3:07, 0:09."""
    s = int(round(s))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class _NoBar:
    def update(self, n: int = 1, item: str | None = None, work: float | None = None) -> None:
        pass

    def skip(self, n: int, work: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """A bar over `total` items: done/total, elapsed, the item at hand and time left (`Eta`).

    `update(n, item, work)` after each item; `work` is what it cost in the run's units (default `n`), out of
    `total_work` (default `total`): e.g. weights solved, so that a small Linear moves the estimate less than
    a large one. `skip` advances over items done earlier (a resumed run): they take no time, so the rate
    starts afresh after them.
    """

    def __init__(self, total: int, desc: str, unit: str, total_work: float | None = None):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} "
                                    "[{elapsed}{postfix}]")
        self._eta = Eta(total if total_work is None else total_work)
        self._done = 0.0

    def update(self, n: int = 1, item: str | None = None, work: float | None = None) -> None:
        self._done += n if work is None else work
        if self._done > 0:  # items that carry no work (dense copies) before the first that does are no warm-up
            self._eta.add(time.perf_counter(), self._done)
        left = self._eta.seconds_left()
        left = "left: estimating" if left is None else f"left {format_seconds(left)}"
        self._bar.set_postfix_str(f"{left}, {item[-40:]}" if item else left, refresh=False)
        self._bar.update(n)

    def skip(self, n: int, work: float | None = None) -> None:
        self._done += n if work is None else work
        self._eta.restart()
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def progress_bar(total: int, show: bool, desc: str, unit: str, total_work: float | None = None):
    """A `Progress` bar, or a silent stand-in with the same methods when `show` is False."""
    return Progress(total, desc, unit, total_work) if show else _NoBar()
