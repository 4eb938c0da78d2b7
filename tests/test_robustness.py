"""Runs survive interruption, concurrency and bad input without losing a result.

* A training process killed with SIGKILL mid-run resumes from its last checkpoint when the same command is
  run again, finished runs are skipped, the CSV holds one row per run, and the figures equal those of an
  uninterrupted run with the same seed (CPU, smoke-sized runs).
* Several commands at once on overlapping rows leave every finished run in each table's CSV exactly once
  (the CSV is an index rebuilt from the run folders, never appended to); a line torn by an older crash is
  reported (by ``results.read`` and in ``simpnet report``) and the rebuild keeps it in a backup, never
  duplicates it.
* A NaN loss stops its run with status ``diverged``; the table's other rows go on.
* Each kind of bad input gets one line on stderr, a non-zero exit and no traceback, and leaves what was
  already recorded untouched.

The bad tables (unparsable C_x{y} notation, networks that cannot be built, a solver that diverges) live
in a copy of conf/ that the real ``simpnet`` command reads through SIMPNET_CONF_DIR.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simpnet_cli import cli, commands
from simpnet_cli.train import checkpoint
from simpnet_cli.runs import index, results
from simpnet_cli.config import tables
from simpnet_cli.train import loop as train

from conftest import TINY

SCRIPT = Path(sys.executable).with_name("simpnet")
SIMPNET = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "simpnet_cli.cli"]

# Smoke-sized overrides (synthetic CIFAR-shaped data on the CPU) long enough to be killed part-way.
RESUME_ARGS = ["run", "table=5", "row=[P5,P3]", "profile=smoke", "profile.train.iterations=60",
               "profile.train.eval_every=10", "profile.train.checkpoint_every=3", "profile.data.test_size=8"]
# The smoke profile on a quarter of its data, for tests about what is recorded rather than what is learnt.
CURVE_FIGURES = ["iter", "test_acc", "test_loss", "train_loss", "lr"]  # wall_s is a time, not a figure
CSV_FIGURES = ["final_acc", "best_acc", "best_iter", "iterations", "epochs", "counted_params", "params_total",
               "status", "config_hash"]

BAD_TABLE = """\
table: "90"
title: Broken rows for the robustness tests
row_defaults:
  arch: arch3
  dataset: cifar10
  solver: nesterov_50k
  iterations: 4
rows:
  - id: NOTATION
    label: an unbalanced brace in the widths
    net: {widths: "C6, C12{3, C19{5}", pools_after: [5, 10]}
  - id: KERNEL
    label: a 35x35 kernel, no padding, on a 32x32 image
    net: {widths: "C6, C12{3}, C19{5}, C28{2}, C35, C43", pools_after: [5, 10], kernels: {"1": 35}, paddings: {"1": 0}}
  - id: POOLING
    label: seven poolings of a 32x32 image
    net: {widths: "C8{8}", pools_after: [1, 2, 3, 4, 5, 6, 7]}
  - id: BOOM
    label: learning rate 1e30
    net: {widths: "C6, C12{3}, C19{5}, C28{2}, C35, C43", pools_after: [5, 10]}
    solver: {base: nesterov_50k, lr: 1.0e+30}
  - id: FINE
    label: the same network with the usual solver
    net: {widths: "C6, C12{3}, C19{5}, C28{2}, C35, C43", pools_after: [5, 10]}
"""


# --------------------------------------------------------------------------- helpers

def subprocess_env(conf_dir: Path | None = None) -> dict:
    """One CPU thread per training process: two processes with a thread per core each (or any other load on
    a small machine) make OpenMP's spinning threads run many times slower. Runs compared with each other
    must use the same thread count, which this fixes as well."""
    env = {k: v for k, v in os.environ.items() if k != "SIMPNET_CONF_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    if conf_dir is not None:
        env["SIMPNET_CONF_DIR"] = str(conf_dir)
    return env


def simpnet(*args: str, cwd: Path, conf_dir: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real console script in a subprocess, so exit code and stderr are what a user sees."""
    return subprocess.run([*SIMPNET, *args], cwd=cwd, env=subprocess_env(conf_dir), capture_output=True, text=True,
                          timeout=timeout)


def in_process(capsys, monkeypatch, tmp_path: Path, *args: str, conf_dir: Path | None = None
               ) -> subprocess.CompletedProcess:
    """The same command through ``cli.main`` in this process (the console script exits with what it returns),
    for tests about what a command does and says rather than about its process: one subprocess test per
    concern is enough to pay a fresh interpreter's imports."""
    monkeypatch.chdir(tmp_path)
    if conf_dir is None:
        monkeypatch.delenv("SIMPNET_CONF_DIR", raising=False)
    else:
        monkeypatch.setenv("SIMPNET_CONF_DIR", str(conf_dir))
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    finally:
        monkeypatch.delenv("SIMPNET_CONF_DIR", raising=False)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def assert_one_line_error(proc_or_rc, stderr: str | None = None, *needles: str) -> str:
    rc, err = (proc_or_rc.returncode, proc_or_rc.stderr) if stderr is None else (proc_or_rc, stderr)
    assert rc != 0, f"expected a failure, got exit 0; stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err and lines[0].startswith("simpnet: error: "), err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def fake_row(row_id: str = "P7", table: str = "5", seed: int = 0, config_hash: str = "0123456789abcdef",
             **over) -> dict:
    row = {"table": table, "row": f"row {row_id}", "row_id": row_id, "variant": "", "seed": seed, "dataset": "cifar10",
           "counted_params": 53370, "params_total": 53912, "paper_params": "53K", "paper_acc": 79.44,
           "final_acc": 61.5, "best_acc": 62.25, "best_iter": 4, "iterations": 4, "epochs": 0.5, "wall_s": 1.25,
           "img_per_s": 100.0, "device": "cpu (2 threads)", "precision": "fp32", "step_mode": "eager",
           "profile": "smoke", "status": "ok", "config_hash": config_hash, "run_dir": "experiments/x",
           "finished_at": "2025-01-01T00:00:00Z"}
    return {**row, **over}


def record_earlier(results_dir: Path, *tables_: str) -> dict[Path, bytes]:
    """Results recorded before the failing command: one row in each table's CSV. Returns their bytes."""
    for t in tables_:
        results.write(results.csv_path(results_dir, t), [results.format_line(fake_row(table=t, row_id="EARLIER"))])
    return {p: p.read_bytes() for p in sorted(results_dir.glob("table*.csv"))}


def assert_untouched(snapshot: dict[Path, bytes]) -> None:
    assert snapshot
    for path, data in snapshot.items():
        assert path.read_bytes() == data, f"{path} changed"
    for path in snapshot:
        assert sorted(p.name for p in path.parent.glob("table*.csv")) == sorted(p.name for p in snapshot)


def planned(args: list[str], **dirs: Path):
    """The RunSpecs a `simpnet run` command line plans (hashes name the run folders)."""
    cfg, variant = commands.compose(args[1:] + [f"{k}={v}" for k, v in dirs.items()])
    return commands.plan_runs(cfg, variant)


def read_curve(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in r.items() if k in CURVE_FIGURES} for r in csv.DictReader(fh)]


def close(a, b, tol: float = 1e-6) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a == b or abs(float(a) - float(b)) <= tol * max(1.0, abs(float(a)))


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory) -> Path:
    """A copy of conf/ with a table of broken rows, for SIMPNET_CONF_DIR."""
    root = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(tables.DEFAULT_CONF_DIR, root)
    (root / "tables" / "table90.yaml").write_text(BAD_TABLE)
    return root


# --------------------------------------------------------------------------- interruption and resume

def _checkpoint_iteration(path: Path) -> int | None:
    return checkpoint.iteration(path)  # None while it is not there yet, or replaced while we read it


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_checkpoint_and_matches_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir(), clean.mkdir()
    dirs = dict(results_dir=Path("results"), runs_dir=Path("experiments"))
    args = RESUME_ARGS + [f"{k}={v}" for k, v in dirs.items()]
    runs = planned(RESUME_ARGS, **dirs)
    assert [r.row_id for r in runs] == ["P5", "P3"]
    p5, p3 = runs
    ckpt = killed / "experiments" / p3.config_hash / "checkpoint.pt"

    env = subprocess_env()
    # The uninterrupted run trains beside the one we kill (same seed, its own folders).
    reference = subprocess.Popen([*SIMPNET, *args], cwd=clean, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*SIMPNET, *args], cwd=killed, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:  # P5 is finished and recorded; P3 is part-way, past a checkpoint off the eval grid
            it = _checkpoint_iteration(ckpt) if ckpt.exists() else None
            if it is not None and it >= 9:
                break
            assert victim.poll() is None, "the run finished before it could be killed: make it longer"
            assert time.monotonic() < deadline, "no checkpoint of the second run appeared"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    resume_at = _checkpoint_iteration(ckpt)
    assert resume_at is not None and 0 < resume_at < 60, resume_at
    assert not (ckpt.parent / "result.json").exists()
    rows, bad = results.read(killed / "results" / "table5.csv")
    assert [r["row_id"] for r in rows] == ["P5"] and not bad

    again = simpnet(*args, cwd=killed)
    assert again.returncode == 0, again.stderr
    log = again.stderr
    assert "Traceback" not in log
    assert "table 5 row P5 seed 0: already recorded" in log
    assert f"resuming {p3.config_hash} at iteration {resume_at}" in log, log
    first_eval = next(int(line.split("iter ")[1].split("/")[0]) for line in log.splitlines()
                      if line.startswith(f"table 5 row {p3.row_id} seed 0: iter "))
    assert first_eval > resume_at, "the resumed run evaluated an iteration it had already passed"
    assert not ckpt.exists(), "a finished run keeps no checkpoint"
    assert not list(ckpt.parent.glob(".*.tmp*"))

    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err
    got, _ = results.read(killed / "results" / "table5.csv")
    want, _ = results.read(clean / "results" / "table5.csv")
    assert sorted((r["row_id"], r["seed"]) for r in got) == [("P3", 0), ("P5", 0)], "one row per run"
    for run in runs:
        g = next(r for r in got if r["row_id"] == run.row_id)
        w = next(r for r in want if r["row_id"] == run.row_id)
        for col in CSV_FIGURES:
            assert close(g[col], w[col]), (run.row_id, col, g[col], w[col])
        gc = read_curve(killed / "experiments" / run.config_hash / "curve.csv")
        wc = read_curve(clean / "experiments" / run.config_hash / "curve.csv")
        assert len(gc) == len(wc) == 6
        for a, b in zip(gc, wc):
            assert all(close(a[k], b[k]) for k in CURVE_FIGURES), (run.row_id, a, b)
        gm = torch.load(killed / "experiments" / run.config_hash / "model.pt", weights_only=True)
        wm = torch.load(clean / "experiments" / run.config_hash / "model.pt", weights_only=True)
        assert gm.keys() == wm.keys()
        for k in gm:
            assert torch.allclose(gm[k].float(), wm[k].float(), rtol=1e-5, atol=1e-6), (run.row_id, k)


@pytest.mark.slow
def test_resume_restores_dropout_rng_and_the_partial_training_loss(tmp_path, one_thread, monkeypatch):
    """A network with dropout (so the restored RNG state matters), interrupted right after a checkpoint
    that falls between two evaluations (so the training-loss sum since the last one matters)."""
    table = tables.load_table("5")
    row = table.row("P5")
    row = {**row, "net": {**row["net"], "dropout": {"conv": {"1-12": 0.3}, "pool": {"1-2": 0.3}}}}
    profile = {"train": {"iterations": 20, "batch_size": 8, "eval_every": 5, "checkpoint_every": 4,
                         "precision": "fp32"},
               "data": {"source": "synthetic", "train_size": 40, "test_size": 16}}
    run = tables.resolve(table, row, 1, profile)
    assert any(type(layer).__name__ == "Dropout" for layer in run.spec)
    cpu = torch.device("cpu")
    want = train.train_run(run, tmp_path / "clean", cpu, tmp_path, False)

    real_atomic_write = checkpoint.atomic_write

    def die_after_checkpoint_12(path, write):
        real_atomic_write(path, write)
        if path.name == "checkpoint.pt" and _checkpoint_iteration(path) == 12:
            raise KeyboardInterrupt  # the process dies somewhere between iterations 12 and 16

    monkeypatch.setattr(checkpoint, "atomic_write", die_after_checkpoint_12)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, tmp_path / "killed", cpu, tmp_path, False)
    monkeypatch.undo()
    assert _checkpoint_iteration(tmp_path / "killed" / "checkpoint.pt") == 12
    log: list[str] = []
    got = train.train_run(run, tmp_path / "killed", cpu, tmp_path, False, log.append)
    assert "resuming killed at iteration 12" in log
    for key in ("final_acc", "best_acc", "best_iter", "iterations", "epochs", "status"):
        assert close(got[key], want[key]), (key, got[key], want[key])
    gc, wc = read_curve(tmp_path / "killed" / "curve.csv"), read_curve(tmp_path / "clean" / "curve.csv")
    assert [c["iter"] for c in gc] == [5, 10, 15, 20]
    for a, b in zip(gc, wc):
        assert all(close(a[k], b[k]) for k in CURVE_FIGURES), (a, b)
    gm = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    wm = torch.load(tmp_path / "clean" / "model.pt", weights_only=True)
    assert all(torch.allclose(gm[k].float(), wm[k].float(), rtol=1e-5, atol=1e-6) for k in wm)


def test_checkpoint_holds_the_whole_training_state(tmp_path, one_thread):
    """Model, optimizer, RNG, data position and partial curve; the LR schedule and data order are pure
    functions of the iteration, so the iteration is the scheduler's whole state."""
    run = tables.resolve(tables.load_table("5"), tables.load_table("5").row("P5"), 3,
                         {"train": {"iterations": 9, "batch_size": 8, "eval_every": 4, "checkpoint_every": 3,
                                    "precision": "fp32"},
                          "data": {"source": "synthetic", "train_size": 20, "test_size": 16}})
    real_save, saved = torch.save, []

    def spy(obj, f, *a, **k):
        if isinstance(obj, dict) and "iteration" in obj:
            saved.append({**obj, "curve": list(obj["curve"])})
        return real_save(obj, f, *a, **k)

    torch.save = spy
    try:
        train.train_run(run, tmp_path / "run", torch.device("cpu"), tmp_path / "data", False)
    finally:
        torch.save = real_save
    assert [s["iteration"] for s in saved] == [3, 6]
    last = saved[-1]
    for key in ("model", "optimizer", "rng", "curve", "best", "data_position", "iteration"):
        assert key in last, key
    assert last["optimizer"]["state"], "the momentum buffers are part of the optimizer state"
    assert [c["iter"] for c in last["curve"]] == [4]
    assert last["data_position"] == {"epoch": 6 * 8 // 20, "offset": 6 * 8 % 20}
    from simpnet_cli.train import data as D

    a = D.load(run.dataset, tmp_path, False, torch.device("cpu"), 8, run.seed)
    b = D.load(run.dataset, tmp_path, False, torch.device("cpu"), 8, run.seed)
    for _ in range(3):
        a.batch(0)  # walking one stream does not change what another returns for an iteration
    for i in (7, 2, 5):
        assert all(torch.equal(x, y) for x, y in zip(a.batch_plan(i), b.batch_plan(i)))


# --------------------------------------------------------------------------- results files

@pytest.mark.slow
def test_concurrent_commands_on_overlapping_rows_leave_every_run_in_each_csv_once(tmp_path):
    """Table 2, Table 7 (whose 3x3-300K is Table 2's 8L) and Table 2 again, all at once. Each command writes
    only run folders and rebuilds the CSVs from them: every finished run is in each of its tables once."""
    out, runs = tmp_path / "results", tmp_path / "experiments"
    common = ["profile=smoke", "quiet=true", f"results_dir={out}", f"runs_dir={runs}", *TINY]
    procs = [subprocess.Popen([*SIMPNET, "run", f"table={t}", *common], cwd=tmp_path, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in ("2", "7", "2")]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0 and "Traceback" not in log, log
    hashes = {}
    for name in ("2", "7"):
        path = results.csv_path(out, name)
        rows, bad = results.read(path)
        assert not bad, [str(b) for b in bad]
        want = sorted(r["id"] for r in tables.load_table(name).rows)
        assert sorted(r["row_id"] for r in rows) == want and len(path.read_text().splitlines()) == 1 + len(want)
        for r in rows:
            saved = json.loads((Path(r["run_dir"]) / "result.json").read_text())
            assert r["status"] == "ok" and saved["config_hash"] == r["config_hash"] == Path(r["run_dir"]).name
            assert saved["final_acc"] == r["final_acc"] and saved["params_total"] == r["params_total"]
        hashes[name] = {r["row_id"]: r["config_hash"] for r in rows}
    assert hashes["2"]["8L"] == hashes["7"]["3x3-300K"]
    assert len(list(runs.iterdir())) == 4 + 6 - 1  # the shared network trained once
    # The two Table 2 commands met on the same rows: one found them busy or already recorded.
    assert any(w in logs[0] + logs[2] for w in ("busy", "skipped")), logs


@pytest.mark.parametrize("cut", ["middle", "in_last_field", "after_last_comma"])
def test_torn_line_is_reported_and_the_next_rebuild_is_intact(tmp_path, cut, finished_run):
    out, runs = tmp_path / "results", tmp_path / "runs"
    p5, p3, p7 = planned(["run", "table=5", "row=[P5,P3,P7]", "profile=smoke"], results_dir=out, runs_dir=runs)
    finished_run(p5, out, runs, "2025-01-01T00:00:01Z")
    index.rebuild(out, "5", runs)
    path = results.csv_path(out, "5")
    torn_full = results.format_line(fake_row("P3", config_hash=p3.config_hash))
    at = {"middle": len(torn_full) // 2, "in_last_field": len(torn_full) - 6,
          "after_last_comma": torn_full.rindex(",") + 1}[cut]
    with open(path, "a") as fh:
        fh.write(torn_full[:at])  # an older crash: no newline
    rows, bad = results.read(path)
    assert [r["row_id"] for r in rows] == ["P5"]
    assert len(bad) == 1 and bad[0].lineno == 3 and bad[0].text == torn_full[:at]
    torn_file = path.read_text()
    finished_run(p7, out, runs, "2025-01-01T00:00:02Z")  # P3's folder is gone: its line is lost in the tear
    index.rebuild(out, "5", runs)
    rows, bad = results.read(path)
    assert [r["row_id"] for r in rows] == ["P5", "P7"] and not bad
    assert index.recorded(out, "5", runs) == {("P5", p5.config_hash, 0), ("P7", p7.config_hash, 0)}
    (backup,) = path.parent.glob("table5.csv.damaged-*")
    assert backup.read_text() == torn_file and torn_full[:at] not in path.read_text()  # kept once, aside


def test_run_warns_about_a_torn_line_and_indexes_that_run_again_without_training(tmp_path, capsys, one_thread):
    """A crash tore the line of a finished run: the next `simpnet run` says so, keeps the torn file aside, and
    indexes the run once more from its folder instead of training it again."""
    out, runs = tmp_path / "results", tmp_path / "runs"
    args = ["run", "table=5", "row=P5", "profile=smoke", f"results_dir={out}", f"runs_dir={runs}"]
    assert cli.main(args) == 0
    path = results.csv_path(out, "5")
    text = path.read_text()
    torn = text[: len(text) - 30]  # the row lost its last 30 characters and its newline
    path.write_text(torn)
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"simpnet: warning: {path}:2:" in err and "torn" in err
    assert " iter " not in err, "a finished run is not trained again"
    rows, bad = results.read(path)
    assert [r["row_id"] for r in rows] == ["P5"] and not bad
    assert path.read_text() == text
    (backup,) = path.parent.glob("table5.csv.damaged-*")
    assert backup.read_text() == torn  # kept for inspection
    assert cli.main(args) == 0  # and now it is recorded: skipped, nothing written
    assert "already recorded" in capsys.readouterr().err
    assert results.read(path)[0] == rows and path.read_text() == text


@pytest.mark.slow
def test_report_lists_a_torn_line_as_skipped(tmp_path):
    out = tmp_path / "results"
    results.write(results.csv_path(out, "5"), [results.format_line(fake_row("P5"))])
    torn = results.format_line(fake_row("P3"))[:40]
    with open(results.csv_path(out, "5"), "a") as fh:
        fh.write(torn)
    proc = simpnet("report", "table=5", f"results_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = (out / "REPORT.md").read_text()
    assert "table5.csv:3" in report and torn[:20] in report
    assert "table5.csv:3" in proc.stderr  # and warned about


def test_full_disk_while_rebuilding_leaves_the_csv_as_it_was(tmp_path, monkeypatch, finished_run):
    out, runs = tmp_path / "results", tmp_path / "runs"
    snapshot = record_earlier(out, "5")
    (p5,) = planned(["run", "table=5", "row=P5", "profile=smoke"], results_dir=out, runs_dir=runs)
    finished_run(p5, out, runs, "2025-06-01T00:00:00Z")
    real_write, calls = os.write, []

    def filling(fd, data):  # the disk fills part-way through the file
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(results.os, "write", filling)
    with pytest.raises(results.UserError, match="cannot write results.*disk is full"):
        index.rebuild(out, "5", runs)
    monkeypatch.undo()
    assert calls, "the rebuild did not write"
    assert_untouched(snapshot)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no half-written file is left behind"
    index.rebuild(out, "5", runs)
    rows, bad = results.read(results.csv_path(out, "5"))
    assert [r["row_id"] for r in rows] == ["EARLIER", "P5"] and not bad


# --------------------------------------------------------------------------- divergence

@pytest.mark.slow
def test_nan_loss_marks_the_run_diverged_and_the_table_goes_on(tmp_path, conf_dir, capsys, monkeypatch, one_thread):
    out = tmp_path / "results"
    snapshot = record_earlier(out, "90")
    proc = in_process(capsys, monkeypatch, tmp_path, "run", "table=90", "row=[BOOM,FINE]", "profile=smoke",
                      f"results_dir={out}", f"runs_dir={tmp_path / 'runs'}", conf_dir=conf_dir)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "NaN or infinite" in proc.stderr
    rows, bad = results.read(results.csv_path(out, "90"))
    assert not bad
    assert [(r["row_id"], r["status"]) for r in rows] == [("EARLIER", "ok"), ("BOOM", "diverged"), ("FINE", "ok")]
    fine = rows[2]
    assert fine["iterations"] == 4 and 0 <= fine["final_acc"] <= 100
    assert rows[1]["iterations"] <= 4
    path = results.csv_path(out, "90")
    assert path.read_bytes().startswith(snapshot[path])


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, needles", [
    (["table=90", "row=NOTATION"], ["table 90, row NOTATION", "C_x{y}", "C12{3"]),
    (["table=90", "row=KERNEL"], ["row KERNEL", "35x35 kernel", "32x32"]),
    (["table=90", "row=POOLING"], ["row POOLING", "pooling a 1x1 map"]),
    (["table=99"], ["unknown table '99'"]),
    (["table=5", "row=P9"], ["table 5 has no row 'P9'"]),
    (["table=5", "row=P5", "no_such_key=1"], ["no_such_key", "unknown config key"]),
    (["table=5", "row=P5", "profile.train.no_such_key=1"], ["profile.train.no_such_key"]),
], ids=["notation", "kernel-too-large", "pooling-past-1x1", "unknown-table", "unknown-row", "unknown-key",
        "unknown-profile-key"])
def test_bad_config_is_one_line_and_keeps_results(tmp_path, conf_dir, args, needles, capsys, monkeypatch):
    out, runs = tmp_path / "results", tmp_path / "runs"
    snapshot = record_earlier(out, "5", "90")
    argv = ["run", *args, "profile=smoke", f"results_dir={out}", f"runs_dir={runs}"]
    if "row=NOTATION" in args:  # the real console script for one case (exit status and stderr of the process)
        proc = simpnet(*argv, cwd=tmp_path, conf_dir=conf_dir)
    else:
        proc = in_process(capsys, monkeypatch, tmp_path, *argv, conf_dir=conf_dir)
    assert proc.returncode == 2
    assert_one_line_error(proc, None, *needles)
    assert_untouched(snapshot)
    assert not runs.exists() or not any(runs.iterdir()), "nothing may train"


def test_debug_flag_shows_the_traceback(tmp_path, conf_dir, capsys, monkeypatch):
    # In-process: with --debug the error leaves main() as the exception itself, which the interpreter of the
    # console script prints as a traceback (exit 1); without it, the same command is one line (above).
    from simpnet_cli.nets.notation import NotationError

    with pytest.raises(NotationError):
        in_process(capsys, monkeypatch, tmp_path, "run", "table=90", "row=NOTATION", "--debug", conf_dir=conf_dir)


@pytest.mark.slow
def test_missing_dataset(tmp_path, capsys, monkeypatch):
    out = tmp_path / "results"
    snapshot = record_earlier(out, "5")
    proc = in_process(capsys, monkeypatch, tmp_path, "run", "table=5", "row=P5", "device=cpu",
                      f"data_dir={tmp_path / 'nodata'}", f"results_dir={out}", f"runs_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2
    assert_one_line_error(proc, None, "dataset cifar10 not found", "download=true")
    assert_untouched(snapshot)


@pytest.mark.parametrize("content", [b"\x00" * 16, b"this is not an idx file at all" * 40], ids=["zeros", "text"])
@pytest.mark.slow
def test_corrupt_dataset(tmp_path, content, capsys, monkeypatch):
    out, data = tmp_path / "results", tmp_path / "data"
    snapshot = record_earlier(out, "13")
    raw = data / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(content)
    proc = in_process(capsys, monkeypatch, tmp_path, "run", "table=13", "row=slim-300K", "device=cpu",
                      f"data_dir={data}", f"results_dir={out}", f"runs_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2
    assert_one_line_error(proc, None, "dataset mnist", "corrupt")
    assert_untouched(snapshot)


@pytest.mark.parametrize("which", ["results_dir", "runs_dir"])
def test_unwritable_output_directory_fails_before_training(tmp_path, which, capsys, monkeypatch):
    # Tests may run as root, which writes through any mode bits: a folder under a regular file is unwritable
    # for everyone (ENOTDIR).
    (tmp_path / "afile").write_text("a file, not a folder\n")
    dirs = {"results_dir": tmp_path / "results", "runs_dir": tmp_path / "runs"}
    snapshot = record_earlier(dirs["results_dir"], "5")
    dirs[which] = tmp_path / "afile" / which
    t0 = time.monotonic()
    proc = in_process(capsys, monkeypatch, tmp_path, "run", "table=5", "row=[P5,P3]", "profile=smoke",
                      *(f"{k}={v}" for k, v in dirs.items()))
    assert proc.returncode == 2
    assert_one_line_error(proc, None, which, "not writable", str(dirs[which]))
    assert time.monotonic() - t0 < 60
    if which == "results_dir":
        runs = dirs["runs_dir"]
        assert not runs.exists() or not any(runs.iterdir()), "nothing may train"
    else:
        assert_untouched(snapshot)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, one_thread):
    out, runs = tmp_path / "results", tmp_path / "runs"
    snapshot = record_earlier(out, "5")
    args = ["run", "table=5", "row=P5", "profile=smoke", "profile.train.iterations=8",
            "profile.train.checkpoint_every=2", "profile.train.eval_every=2", f"results_dir={out}",
            f"runs_dir={runs}"]
    run_dir = runs / planned(args, results_dir=out, runs_dir=runs)[0].config_hash
    real_save = torch.save

    def filling_disk(obj, f, *a, **k):
        """torch.save as it behaves when the disk fills during the second checkpoint: through a Python file
        the write raises OSError(ENOSPC); given a file name, torch's C++ writer raises a RuntimeError."""
        if isinstance(obj, dict) and obj.get("iteration", 0) >= 4:
            if hasattr(f, "write"):
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_disk)
    rc = cli.main([*args, "quiet=true"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2
    assert_one_line_error(rc, err, "disk is full", "checkpoint")
    assert _checkpoint_iteration(run_dir / "checkpoint.pt") == 2, "the previous checkpoint must survive"
    assert not list(run_dir.glob(".*.tmp*")), "no half-written file is left behind"
    assert not (run_dir / "result.json").exists()
    assert_untouched(snapshot)

    assert cli.main(args) == 0  # space again: the same command continues from iteration 2
    err = capsys.readouterr().err
    assert f"resuming {run_dir.name} at iteration 2" in err
    rows, bad = results.read(results.csv_path(out, "5"))
    assert [r["row_id"] for r in rows] == ["EARLIER", "P5"] and not bad
    assert rows[1]["iterations"] == 8


# --------------------------------------------------------------------------- packed runs (issue 17, items 7 and 8)

def _locker(lock: Path) -> int | None:
    """The pid holding the flock on ``lock`` (runner.RunLock), read from /proc/locks."""
    ino = os.stat(lock).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and fields[-3].endswith(f":{ino}"):
            return int(fields[-4])
    return None


@pytest.mark.slow
def test_sigkill_of_a_packed_worker_fails_its_run_only_and_it_resumes_next_time(tmp_path):
    """jobs_per_device=2 on the CPU: the process training P3 is killed with SIGKILL past its first checkpoint
    (what the out-of-memory killer does). The command goes on with the other rows, names the dead run and its
    cause, exits 2; the same command again resumes P3 from its checkpoint and records it."""
    args = ["run", "table=5", "profile=smoke", "profile.train.iterations=16", "profile.train.eval_every=8",
            "profile.train.checkpoint_every=2", "jobs_per_device=2", "device=cpu", "results_dir=results",
            "runs_dir=experiments"]
    runs = planned(args, results_dir=Path("results"), runs_dir=Path("experiments"))
    p3 = next(r for r in runs if r.row_id == "P3")
    folder = tmp_path / "experiments" / p3.config_hash
    command = subprocess.Popen([*SIMPNET, *args], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            it = _checkpoint_iteration(folder / "checkpoint.pt") if (folder / "checkpoint.pt").exists() else None
            pid = _locker(folder / ".lock") if it and (folder / ".lock").exists() else None
            if pid is not None:
                break
            assert command.poll() is None, "the command finished before P3 could be killed: make it longer"
            assert time.monotonic() < deadline, "no checkpoint of P3 appeared"
            time.sleep(0.05)
        assert pid != command.pid  # the worker, not the command
        os.kill(pid, signal.SIGKILL)
        _, err = command.communicate(timeout=240)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 2, err
    assert "table 5 row P3 seed 0: its process was killed by SIGKILL (the kernel's out-of-memory killer" in err
    assert "1 run(s) failed" in err and "Traceback" not in err
    rows, _ = results.read(tmp_path / "results" / "table5.csv")
    assert sorted(r["row_id"] for r in rows) == sorted(r.row_id for r in runs if r.row_id != "P3")
    assert all(r["status"] == "ok" for r in rows)
    resume_at = _checkpoint_iteration(folder / "checkpoint.pt")

    again = simpnet(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resuming {p3.config_hash} at iteration {resume_at}" in again.stderr
    rows, _ = results.read(tmp_path / "results" / "table5.csv")
    assert sorted(r["row_id"] for r in rows) == sorted(r.row_id for r in runs)


def test_a_dead_workers_cause_is_named_from_its_exit_code():
    from simpnet_cli.runs import pool

    assert pool.death_cause(-signal.SIGKILL) == ("its process was killed by SIGKILL (the kernel's "
                                                  "out-of-memory killer, or a kill -9)")
    assert pool.death_cause(-signal.SIGSEGV).endswith("SIGSEGV (a crash in native code)")
    assert "SIGABRT (an abort, e.g. in the CUDA driver" in pool.death_cause(-signal.SIGABRT)
    assert pool.death_cause(1) == "its process exited with status 1 before it reported"


def test_packed_runs_download_each_dataset_once_in_the_parent_before_the_workers(tmp_path, monkeypatch):
    """download=true with jobs_per_device=2: the parent fetches CIFAR-10 and CIFAR-100 (both splits) once each,
    and the workers get download=false, so none of them writes into the data folder."""
    from conftest import resolve_row
    from simpnet_cli.runs import planning, pool, runner

    runs = [resolve_row("2", "8L"), resolve_row("2", "9L"), resolve_row("2", "8L", seed=1),
            resolve_row("2", "8L", dataset="cifar100")]
    fetched, handed = [], {}
    monkeypatch.setattr(runner.D, "load_split",
                        lambda cfg, data_dir, train, download: fetched.append((cfg["name"], train, download)))
    monkeypatch.setattr(pool, "execute_packed",
                        lambda execute_group, first, twins, opts, *rest: handed.update(opts=opts, runs=len(first)))
    opts = planning.Options(data_dir=tmp_path / "data", download=True, results_dir=tmp_path / "results",
                          runs_dir=tmp_path / "runs", device="cpu", jobs_per_device=2, profile="default", quiet=True)
    runner.execute(runs, opts)
    names = sorted({r.dataset["name"] for r in runs})
    assert len(names) == 2 and sorted(fetched) == sorted((n, t, True) for n in names for t in (False, True))
    assert handed["runs"] == 4 and handed["opts"].download is False
# --------------------------------------------------------------------------- issue 19, class 9: orphaned workers

def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its entry waits to be reaped


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.slow
def test_sigkill_of_the_parent_stops_its_packed_workers(tmp_path):
    """Killing only the parent of a jobs_per_device=2 command left its workers training for minutes."""
    runs = tmp_path / "runs"
    parent = subprocess.Popen([*SIMPNET, "run", "table=5", "row=[P5,P3]", "profile=smoke", "quiet=true",
                               "profile.train.iterations=1000000", "jobs_per_device=2", "device=cpu",
                               f"results_dir={tmp_path / 'results'}", f"runs_dir={runs}"],
                              cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while len(list(runs.glob("*/config.yaml"))) < 2:  # both workers are training
            assert parent.poll() is None, parent.stderr.read().decode()
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        workers = _children(parent.pid)
        assert len(workers) >= 2, workers
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in workers if _alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"workers {left} went on training after their parent was killed"
    finally:
        if parent.poll() is None:
            parent.kill()
