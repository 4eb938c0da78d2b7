"""Live progress of `simpnet run` (issue 12): bars on a terminal, plain lines when stderr is a file or a pipe,
nothing but failures with quiet=true; rates and times left count only what this process trained."""
from __future__ import annotations

import io
import os
import pty
import queue
import re
import select
import subprocess
import sys

from pathlib import Path

import pytest

from simpnet_cli import cli
from simpnet_cli.runs import progress

HASH = re.compile(r"\b[0-9a-f]{16}\b")
ANSI = re.compile(r"\x1b\[")


def simpnet(tmp_path: Path, *args: str, stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simpnet_cli.cli", "run", *args, "profile=smoke",
                             f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def ev(kind, it, start=0, iterations=100, train_s=0.0, wall_s=0.0, acc=None, best=None, best_iter=None):
    return progress.Event(kind, it, iterations, start, 10, train_s, wall_s, acc, best, best_iter)


# --------------------------------------------------------------------------- the command, as a user sees it

@pytest.mark.slow
def test_a_terminal_gets_bars_naming_row_iteration_and_time_left(tmp_path):
    master, slave = pty.openpty()  # a pseudo-terminal as the command's stderr: isatty() is true there
    proc = simpnet(tmp_path, "table=2", "row=8L", stderr=slave)
    os.close(slave)
    out = b""
    while select.select([master], [], [], 120)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the command exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    assert "\r" in text and "\x1b[A" in text, f"no redrawn bars: {text!r}"
    bar = [frame for frame in re.split(r"[\r\n]|\x1b\[A", text) if "table 2 row 8L seed 0" in frame and " iter " in frame]
    assert any(re.search(r"iter 2/4 \(50%\), \d+s left, \d+ img/s, test acc", f) for f in bar), bar
    assert any(re.search(r"runs \d/1 done .*, \d+s left", f) for f in re.split(r"[\r\n]", text)), text
    assert "table 2 row 8L seed 0: ok (final" in text  # the runner's summary line stays
    assert not HASH.search(text), "a run is named by table, row and seed, not by its hash"


@pytest.mark.slow
def test_redirected_stderr_gets_plain_lines_naming_table_row_and_seed(tmp_path):
    proc = simpnet(tmp_path, "table=2", "row=[8L,9L]", stderr=subprocess.PIPE)
    err = proc.communicate(timeout=180)[1].decode()
    assert proc.returncode == 0, err
    assert "\r" not in err and not ANSI.search(err), repr(err)
    lines = err.splitlines()
    for row in ("8L", "9L"):
        name = f"table 2 row {row} seed 0"
        assert any(re.fullmatch(rf"{name}: iter 2/4 \(50%\), \d+ img/s, \d+s left, test acc \d+\.\d% "
                                rf"\(best \d+\.\d% @ 2\)", ln) for ln in lines), err
        assert any(ln.startswith(f"{name}: iter 4/4 (100%)") for ln in lines), err
        assert any(ln.startswith(f"{name}: ok (final") for ln in lines), err
    assert any(re.fullmatch(r"progress: 1/2 runs done, 4/8 iterations trained, \d+s left", ln) for ln in lines), err
    # hashes only where a folder is named
    assert all("runs/" in ln for ln in lines if HASH.search(ln)), err


def test_quiet_prints_nothing_but_the_summary(tmp_path, capsys):
    args = ["run", "table=5", "row=P5", "profile=smoke", "quiet=true", f"results_dir={tmp_path}/results",
            f"runs_dir={tmp_path}/runs"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"1 run(s): 1 ok; results in {tmp_path}/results/"], err


# --------------------------------------------------------------------------- the Reporter, fed events

def test_a_resumed_run_counts_only_the_iterations_it_trains_now():
    """Resumed at 900 of 1000: 50 iterations of 10 images in 10 s are 50 img/s and 10 s for the last 50;
    the overall bar's work is the 100 iterations left, not 1000."""
    term = FakeTerminal()
    key = ("2", "8L", 0, "h")
    shown = progress.Reporter({key: 1000}, 1, stream=term)
    shown.run_started(key, "table 2 row 8L seed 0", "runs/h")
    shown.event(key, ev("start", 900, start=900, iterations=1000))
    assert (shown.total, shown.trained) == (100, 0)
    shown.event(key, ev("eval", 950, start=900, iterations=1000, train_s=10.0, wall_s=10.0, acc=61.2, best=62.0,
                        best_iter=500))
    assert (shown.total, shown.trained) == (100, 50)
    text = term.getvalue()
    assert "table 2 row 8L seed 0" in text
    assert "iter 950/1000 (95%), 10s left, 50 img/s, test acc 61.2% (best 62.0% @ 500)" in text, text
    shown.close()


def test_plain_lines_and_the_overall_estimate():
    """Two runs of 100 iterations, one already recorded (done at once, no work); a resume message is named
    by table, row and seed; the overall estimate comes from the iterations still to train."""
    log = io.StringIO()
    a, b, c = ("4", "WE10", 0, "a"), ("4", "BW10", 0, "b"), ("4", "X", 0, "c")
    shown = progress.Reporter({a: 100, b: 100}, 3, done=1, stream=log)
    assert not shown.tty and shown.total == 200
    shown.run_finished(c, "skipped", "table 4 row X seed 0: already recorded")  # recorded before: done already
    assert shown.runs_done == 1
    shown.run_started(a, "table 4 row WE10 seed 0", "runs/a")
    shown.note(a, "resuming a at iteration 50")
    shown.event(a, ev("start", 50, start=50))
    shown.event(a, ev("step", 60, start=50, train_s=1.0, wall_s=1.0))  # no line between evaluations
    shown.event(a, ev("eval", 100, start=50, train_s=5.0, wall_s=5.0, acc=70.0, best=70.0, best_iter=100))
    shown.t0 -= 10.0  # the command has run for 10 s: 50 iterations trained, 100 to go
    shown.run_finished(a, "ok", "table 4 row WE10 seed 0: ok (final 70.00%, ...)")
    assert shown.total == 150 and shown.trained == 50
    lines = log.getvalue().splitlines()
    assert lines == [
        "table 4 row X seed 0: already recorded",
        "table 4 row WE10 seed 0: resuming a at iteration 50",
        "table 4 row WE10 seed 0: training iterations 50-100 in runs/a",
        "table 4 row WE10 seed 0: iter 100/100 (100%), 100 img/s, 0s left, test acc 70.0% (best 70.0% @ 100)",
        "table 4 row WE10 seed 0: ok (final 70.00%, ...)",
        "progress: 2/3 runs done, 50/150 iterations trained, 20s left",
    ], lines
    shown.close()


def test_quiet_reporter_shows_only_failures():
    log = FakeTerminal()
    key = ("2", "8L", 0, "h")
    shown = progress.Reporter({key: 10}, 2, stream=log, quiet=True)
    shown.run_started(key, "table 2 row 8L seed 0", "runs/h")
    shown.note(key, "resuming h at iteration 5")
    shown.event(key, ev("eval", 10, iterations=10, train_s=1, wall_s=1, acc=1.0, best=1.0, best_iter=10))
    shown.run_finished(key, "ok", "table 2 row 8L seed 0: ok")
    shown.run_finished(("2", "9L", 0, "g"), "error", "table 2 row 9L seed 0: RuntimeError: CUDA out of memory")
    shown.close()
    assert log.getvalue() == "table 2 row 9L seed 0: RuntimeError: CUDA out of memory\n"


def test_packed_runs_report_through_a_queue_as_lines_under_the_overall_bar():
    """A worker's Forwarder queues its events (a step event at most once a second); the parent's Reporter
    shows each evaluation as a line above the command's bar, and no bar per run."""
    q: queue.Queue = queue.Queue()
    worker = progress.Forwarder(q)
    key = ("2", "8L", 0, "h")
    worker.run_started(key, "table 2 row 8L seed 0", "runs/h")
    worker.event(key, ev("start", 0))
    worker.event(key, ev("step", 10, train_s=1, wall_s=1))  # within a second of the last event: dropped
    worker.event(key, ev("eval", 50, train_s=5, wall_s=5, acc=40.0, best=40.0, best_iter=50))  # always sent
    assert q.qsize() == 3
    term = FakeTerminal()
    shown = progress.Reporter({key: 100}, 1, stream=term, run_bars=False)
    progress.drain(q, shown)
    assert q.empty() and shown.trained == 50
    text = term.getvalue()
    assert "table 2 row 8L seed 0: iter 50/100 (50%), 100 img/s, 5s left, test acc 40.0%" in text, text
    assert "runs 0/1 done" in text
    shown.close()


def test_durations():
    assert [progress.duration(s) for s in (None, 4.4, 59, 61, 599, 600, 2159, 3600, 7500, 90000)] == \
        ["?", "4s", "59s", "1m01s", "9m59s", "10m", "36m", "1h00m", "2h05m", "1d01h"]
