"""Live progress of `simpnet run`: how what train.train_run reports (``Event``, train/callbacks.py) is shown.

Training code only calls a function with an ``Event``; everything about rendering is here. A ``Reporter``
shows, on a terminal, one tqdm bar for the run in training (table, row, seed, iteration, time left, img/s,
last test accuracy) under one bar for the whole command (runs done / total, time left from the iterations
still to train). When stderr is not a terminal (CI, SLURM logs, a pipe) it prints plain lines instead: one
per evaluation and one per finished run. With ``quiet=true`` it prints nothing but failed runs.

Rates and times left count only the iterations trained since this process started the run: a resumed run's
earlier iterations (and their time) are in neither. Packed runs (``jobs_per_device>1``) train in worker
processes, which send their events through a queue (``Forwarder``); the parent then shows the overall bar
and one plain line per evaluation of each run, since several processes cannot share one bar.
"""
from __future__ import annotations

import io
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from simpnet_cli.train.callbacks import Event  # noqa: F401 - defined in train/, which never imports runs/


def run_name(run) -> str:
    """How a run is named to a person: its table, row and seed (its hash only names its folder)."""
    return f"table {run.table} row {run.row_id} seed {run.seed}"


def run_key(run) -> tuple:
    """A run's key in the display: its row, seed and what it computes apart from how its step is shared
    (stack=auto decides that only in the worker that trains it)."""
    return (str(run.table), run.row_id, run.seed, run.alone_hash)


def duration(seconds: float | None) -> str:
    """45s, 36m, 2h05m, 3d04h: short enough for a progress line."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{round(s / 60)}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def run_status(ev: Event, left_first: bool = False) -> str:
    """``iter 500/30000 (2%), 812 img/s, 36m left, test acc 61.2% (best 61.2% @ 500)`` (time left before
    the rate with ``left_first``, so that a narrow terminal cuts the least useful part)."""
    done = ev.iteration - ev.start
    parts = [f"iter {ev.iteration}/{ev.iterations} ({100 * ev.iteration // max(ev.iterations, 1)}%)"]
    rate = f"{done * ev.batch_size / ev.train_s:.0f} img/s" if done > 0 and ev.train_s > 0 else None
    left = f"{duration(ev.wall_s / done * (ev.iterations - ev.iteration))} left" if done > 0 and ev.wall_s > 0 \
        else "? left"
    parts += [p for p in ((left, rate) if left_first else (rate, left)) if p]
    if ev.test_acc is not None:
        acc = f"test acc {ev.test_acc:.1f}%"
        if ev.best_acc is not None and ev.best_acc >= 0:
            acc += f" (best {ev.best_acc:.1f}% @ {ev.best_iter})"
        parts.append(acc)
    return ", ".join(parts)


@dataclass
class _Run:
    name: str
    expected: int            # iterations this command counted on training for it
    folder: str = ""
    start: int | None = None  # where this session began (a resumed run: its checkpoint's iteration)
    counted: int = 0          # iterations credited to the overall progress
    bar: object = None
    drawn: float = 0.0
    last: Event | None = field(default=None)


class Reporter:
    """Shows a command's runs: bars on a terminal, plain lines otherwise, nothing but failures when quiet.

    ``expected`` maps each run's key (``run_key``) to the iterations it is expected to train (0 for a run
    already recorded, or trained under another key); ``done`` is the number of runs already recorded."""

    REDRAW_S = 0.2  # at most five redraws a second on a terminal

    def __init__(self, expected: dict, runs_total: int, done: int = 0, *, stream: TextIO | None = None,
                 quiet: bool = False, tty: bool | None = None, run_bars: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self.quiet, self.tty, self.run_bars = quiet, tty and not quiet, run_bars
        self.runs_total, self.runs_done = runs_total, done
        self.total = sum(expected.values())  # iterations still to train in this command
        self.trained = 0                     # of which trained so far
        self.runs: dict = {k: _Run("", n) for k, n in expected.items()}
        self.t0 = time.perf_counter()
        self.overall = None
        self.overall_drawn = 0.0
        if self.tty and runs_total:
            from tqdm import tqdm

            self.ncols, self.nrows = _terminal_size(self.stream)
            self.overall = tqdm(total=max(self.total, 1), file=self.stream, leave=False, position=0,
                                ncols=self.ncols, nrows=self.nrows, bar_format="{desc}", desc="runs")
            self._draw_overall(force=True)

    # -------------------------------------------------------------- what the runner and train_run call

    def run_started(self, key, name: str, folder: str = "") -> None:
        """A run is about to be trained (or recorded from its finished folder) in ``folder``."""
        state = self.runs.setdefault(key, _Run(name, 0))
        state.name, state.folder = name, folder

    def event(self, key, ev: Event) -> None:
        state = self.runs.setdefault(key, _Run(str(key), 0))
        if ev.kind == "start":
            state.start = ev.start
            if ev.start:  # trained in an earlier session: neither to train now nor part of the rate
                self.total -= min(ev.start, max(state.expected - state.counted, 0))
                state.expected = max(state.expected - ev.start, 0)
        if state.start is None:
            state.start = ev.start
        gained = max(ev.iteration - state.start - state.counted, 0)
        state.counted += gained
        self.trained += gained
        if self.total < self.trained:
            self.total = self.trained
        state.last = ev
        if self.quiet:
            return
        if not self.tty:
            if ev.kind == "start":
                what = f"{ev.iterations} iterations" if not ev.start else f"iterations {ev.start}-{ev.iterations}"
                self._line(f"{state.name}: training {what}" + (f" in {state.folder}" if state.folder else ""))
            elif ev.kind == "eval":
                self._line(f"{state.name}: {run_status(ev)}")
            return
        if self.run_bars:
            self._draw_run(state, ev, force=ev.kind != "step")
        elif ev.kind == "eval":
            self._line(f"{state.name}: {run_status(ev)}")
        self._draw_overall(force=ev.kind != "step")

    def note(self, key, message: str) -> None:
        """A message from the run (resumed, diverged), named by its table, row and seed."""
        if not self.quiet:
            state = self.runs.get(key)
            self._line(f"{state.name if state else key}: {message}")

    def run_finished(self, key, outcome: str, message: str) -> None:
        """A run is recorded, skipped, busy or failed; ``message`` is the runner's summary line for it."""
        state = self.runs.pop(key, None)
        if state is not None:
            leftover = max(state.expected - state.counted, 0)  # not trained here (done earlier, or stopped)
            self.total -= leftover
            if state.bar is not None:
                state.bar.close()
                state.bar = None
        if state is not None or outcome != "skipped":  # (runs recorded before the command began are done)
            self.runs_done += 1
        if self.quiet and outcome != "error":
            return
        self._line(message)
        if not self.tty and not self.quiet and self.runs_done < self.runs_total and self.trained:
            self._line(f"progress: {self._overall_status()}")
        self._draw_overall(force=True)

    def close(self) -> None:
        for state in self.runs.values():
            if state.bar is not None:
                state.bar.close()
                state.bar = None
        if self.overall is not None:
            self.overall.close()
            self.overall = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- rendering

    def time_left(self) -> float | None:
        elapsed = time.perf_counter() - self.t0
        if self.trained <= 0 or elapsed <= 0:
            return None
        return (self.total - self.trained) * elapsed / self.trained

    def _overall_status(self) -> str:
        left = self.time_left()
        text = f"{self.runs_done}/{self.runs_total} runs done"
        if self.total:
            text += f", {self.trained}/{self.total} iterations trained"
        return text + (f", {duration(left)} left" if left is not None else "")

    def _line(self, text: str) -> None:
        if self.tty:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def _draw_overall(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.overall is None or (not force and now - self.overall_drawn < self.REDRAW_S):
            return
        self.overall_drawn = now
        self.overall.total = max(self.total, self.trained, 1)
        self.overall.n = self.trained
        left = self.time_left()
        _show(self.overall, f"runs {self.runs_done}/{self.runs_total} done",
              f"{100 * self.trained // max(self.total, 1)}% of the iterations to train, "
              f"{duration(left) if left is not None else '?'} left")

    def _draw_run(self, state: _Run, ev: Event, force: bool) -> None:
        now = time.perf_counter()
        if state.bar is None:
            from tqdm import tqdm

            state.bar = tqdm(total=max(ev.iterations, 1), initial=ev.start, file=self.stream, leave=False,
                             position=1, ncols=self.ncols, nrows=self.nrows, bar_format="{desc}", desc=state.name)
        elif not force and now - state.drawn < self.REDRAW_S:
            return
        state.drawn = now
        state.bar.n = ev.iteration
        _show(state.bar, state.name, run_status(ev, left_first=True))
        self.stream.flush()


def _terminal_size(stream) -> tuple[int, int]:
    """(columns, rows) of the terminal behind ``stream``; a terminal that reports none (a fresh pty, a
    stand-in) gets 160 x 24, since tqdm draws no nested bar on a screen of 0 rows."""
    try:
        cols, rows = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        cols, rows = 0, 0
    return cols or 160, max(rows, 3) if rows else 24


def _show(bar, head: str, text: str) -> None:
    """Redraw a tqdm bar as ``head [####      ] text``."""
    esc = lambda t: t.replace("{", "{{").replace("}", "}}")  # noqa: E731
    bar.bar_format = f"{esc(head)} {{bar:12}} {esc(text)}"
    bar.refresh()


class Forwarder:
    """A packed run's stand-in for the Reporter, in its worker process: sends events through a queue to
    the parent's Reporter (``drain``), a step event at most once a second."""

    EVERY_S = 1.0

    def __init__(self, queue):
        self.queue = queue
        self.sent: dict = {}

    def __getstate__(self):
        return {"queue": self.queue}

    def __setstate__(self, state):
        self.queue, self.sent = state["queue"], {}

    def run_started(self, key, name: str, folder: str = "") -> None:
        self.queue.put(("run_started", key, (name, folder)))

    def event(self, key, ev: Event) -> None:
        now = time.monotonic()
        if ev.kind == "step" and now - self.sent.get(key, -1e9) < self.EVERY_S:
            return
        self.sent[key] = now
        self.queue.put(("event", key, (ev,)))

    def note(self, key, message: str) -> None:
        self.queue.put(("note", key, (message,)))


def drain(queue, reporter: Reporter) -> None:
    """Show what the workers have sent so far."""
    import queue as queue_mod

    while True:
        try:
            method, key, args = queue.get_nowait()
        except queue_mod.Empty:
            return
        getattr(reporter, method)(key, *args)
