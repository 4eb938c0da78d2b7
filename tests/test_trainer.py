"""The trainer's callbacks (train/callbacks.py): a custom callback's hooks, the TensorBoard logger (through the
command and across a resume), the MLflow logger (a stand-in client; mlflow itself is an optional extra) and
the one-line refusal when a logger's package is missing. Tiny synthetic runs on the CPU, a few seconds each."""
from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import pytest
import torch

from simpnet_cli import cli
from simpnet_cli.config import tables
from simpnet_cli.errors import UserError
from simpnet_cli.train import callbacks as C
from simpnet_cli.train import loop as train
from simpnet_cli.train import state as run_state

CPU = torch.device("cpu")
TAGS = sorted(C.LOGGED.values())


def tiny_run(iterations: int, eval_every: int, checkpoint_every: int) -> tables.RunSpec:
    table = tables.load_table("5")
    profile = {"train": {"iterations": iterations, "batch_size": 8, "eval_every": eval_every,
                         "checkpoint_every": checkpoint_every, "precision": "fp32"},
               "data": {"source": "synthetic", "train_size": 40, "test_size": 16}}
    return tables.resolve(table, table.row("P5"), 0, profile)


def read_curve(run_dir: Path) -> list[dict]:
    with open(run_dir / "curve.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------- hooks

class Recorder(C.Callback):
    def __init__(self):
        self.seen = []

    def on_start(self, state):
        self.seen.append(("start", state.iteration, state.start, [r["iter"] for r in state.curve]))

    def on_eval(self, state, acc, loss):
        assert state.curve[-1]["iter"] == state.iteration and state.curve[-1]["test_acc"] == round(acc, 4)
        self.seen.append(("eval", state.iteration))

    def on_checkpoint(self, state):
        self.seen.append(("checkpoint", state.iteration))

    def on_end(self, state, result):
        self.seen.append(("end", state.iteration, result and result["status"]))


def test_a_custom_callback_sees_its_hooks_in_order_also_across_a_resume(tmp_path, monkeypatch, one_thread,
                                                                        crash_at):
    run = tiny_run(iterations=6, eval_every=2, checkpoint_every=2)
    first = Recorder()
    crash_at(5)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, tmp_path / "run", CPU, tmp_path, False, callbacks=[first])
    monkeypatch.undo()
    # a run that stops on an exception still ends (result None), so that writers are closed
    assert first.seen == [("start", 0, 0, []), ("eval", 2), ("checkpoint", 2), ("eval", 4), ("checkpoint", 4),
                          ("end", 5, None)]
    second = Recorder()
    result = train.train_run(run, tmp_path / "run", CPU, tmp_path, False, callbacks=[second])
    # it resumes at the checkpoint of iteration 4, its curve restored before on_start
    assert second.seen == [("start", 4, 4, [2, 4]), ("eval", 6), ("end", 6, "ok")]
    assert result["iterations"] == 6 and [int(r["iter"]) for r in read_curve(tmp_path / "run")] == [2, 4, 6]


# --------------------------------------------------------------------------- TensorBoard

def test_logger_tensorboard_through_the_command_writes_the_scalars_at_each_evaluation(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    runs = tmp_path / "runs"
    rc = cli.main(["run", "table=2", "row=8L", "profile=smoke", "logger=tensorboard", "quiet=true",
                   f"results_dir={tmp_path}/results", f"runs_dir={runs}"])
    assert rc == 0
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    logged = scalars(run_dir / "tb")
    assert sorted(logged) == TAGS
    assert all([step for step, _ in points] == [2, 4] for points in logged.values()), logged  # smoke: eval every 2
    result = run_state.read_result(run_dir)
    assert logged["test/acc"][-1][1] == pytest.approx(result["final_acc"], abs=1e-4)
    assert (run_dir / "curve.csv").is_file()  # the run's own record: written whatever else logs


def test_a_resumed_run_continues_the_same_tensorboard_log_without_duplicate_steps(tmp_path, monkeypatch,
                                                                                  one_thread, crash_at):
    """Evaluate every iteration, checkpoint every 3, die before iteration 6: the first session has logged
    steps 1-5, the resumed one (from 3) logs 4-6 again; each step appears once, with the values of curve.csv."""
    pytest.importorskip("tensorboard")
    run = tiny_run(iterations=7, eval_every=1, checkpoint_every=3)
    run_dir = tmp_path / "run"
    crash_at(5)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, run_dir, CPU, tmp_path, False, loggers=("csv", "tensorboard"))
    monkeypatch.undo()
    assert [s for s, _ in scalars(run_dir / "tb")["test/acc"]] == [1, 2, 3, 4, 5]
    train.train_run(run, run_dir, CPU, tmp_path, False, loggers=["csv", "tensorboard"])
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2  # one file per session, one folder
    logged = scalars(run_dir / "tb")
    assert sorted(logged) == TAGS
    curve = read_curve(run_dir)
    for column, tag in C.LOGGED.items():
        assert [s for s, _ in logged[tag]] == list(range(1, 8)), (tag, logged[tag])
        assert [v for _, v in logged[tag]] == pytest.approx([float(r[column]) for r in curve], rel=1e-6), tag


# --------------------------------------------------------------------------- MLflow

def test_a_missing_mlflow_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not importable, whether or not it is installed here
    rc = cli.main(["run", "table=5", "row=P5", "profile=smoke", "logger=[csv,mlflow]",
                   f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("simpnet: error: ") and "pip install 'simpnet[mlflow]'" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "nothing may train"
    with pytest.raises(UserError, match=r"pip install 'simpnet\[mlflow\]'"):
        train.train_run(tiny_run(2, 1, 1), tmp_path / "run", CPU, tmp_path, False, loggers="mlflow")


def test_an_unknown_logger_is_one_line(tmp_path, capsys):
    rc = cli.main(["run", "table=5", "row=P5", "profile=smoke", "logger=wandb",
                   f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [err] and "logger=wandb: use csv | tensorboard | mlflow" in err, err


class StandInMlflowClient:
    """What MlflowLogger calls of mlflow.tracking.MlflowClient, kept in one class-level store."""
    runs: dict = {}
    calls: list = []

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        return "7"

    def create_run(self, experiment_id, run_name=None, tags=None):
        run_id = f"r{len(self.runs)}"
        self.runs[run_id] = {"metrics": {}, "status": "RUNNING", "name": run_name, "tags": dict(tags or {})}
        self.calls.append(("create_run", run_id))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

    def update_run(self, run_id, status=None):
        self.runs[run_id]["status"] = status
        self.calls.append(("update_run", run_id, status))

    def get_metric_history(self, run_id, key):
        return [types.SimpleNamespace(step=s) for s, _ in self.runs[run_id]["metrics"].get(key, [])]

    def log_param(self, run_id, key, value):
        pass

    def log_metric(self, run_id, key, value, step=None):
        self.runs[run_id]["metrics"].setdefault(key, []).append((step, value))

    def set_tag(self, run_id, key, value):
        self.runs[run_id]["tags"][key] = value

    def set_terminated(self, run_id, status=None):
        self.runs[run_id]["status"] = status
        self.calls.append(("set_terminated", run_id, status))


def test_mlflow_resumes_its_run_from_the_id_in_the_run_folder(tmp_path, monkeypatch, one_thread, crash_at):
    StandInMlflowClient.runs, StandInMlflowClient.calls = {}, []
    fake = types.ModuleType("mlflow")
    fake.tracking = types.ModuleType("mlflow.tracking")
    fake.tracking.MlflowClient = StandInMlflowClient
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", fake.tracking)
    run = tiny_run(iterations=7, eval_every=1, checkpoint_every=3)
    crash_at(5)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, tmp_path / "run", CPU, tmp_path, False, loggers="mlflow")
    crash_at(None)
    assert (tmp_path / "run" / "mlflow_run_id").read_text().strip() == "r0"
    train.train_run(run, tmp_path / "run", CPU, tmp_path, False, loggers="mlflow")
    assert StandInMlflowClient.calls == [("create_run", "r0"), ("set_terminated", "r0", "KILLED"),
                                         ("update_run", "r0", "RUNNING"), ("set_terminated", "r0", "FINISHED")]
    stored = StandInMlflowClient.runs["r0"]
    assert sorted(stored["metrics"]) == TAGS and stored["tags"]["status"] == "ok"
    for points in stored["metrics"].values():
        assert [s for s, _ in points] == list(range(1, 8))  # steps 4 and 5, logged before the crash, once
