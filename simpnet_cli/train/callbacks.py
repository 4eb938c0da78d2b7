"""What a training run does besides training: checkpoints and resume, the divergence guard, the update audit,
progress events and the loggers (curve.csv, TensorBoard, MLflow), each a ``Callback`` of ``loop.fit``.

The loop calls, in the order the callbacks are given (``loop.run_callbacks`` fixes it: checkpoints first, so
that the others see a resumed run's state; the guard and the audit before anything is logged):

* ``on_start(state)``: before the first step of this session (``state.iteration == state.start``);
* ``on_check(state)``: every ``state.check_every`` iterations and before each evaluation, after the host has
  read the device's non-finite flag (``state.loss_finite``). There is no per-iteration hook: on a GPU the
  steps are queued without waiting, and the host meets the device only at these checks;
* ``on_eval(state, acc, loss)``: after a test evaluation, its row already in ``state.curve``;
* ``on_checkpoint(state)``: every ``checkpoint_every`` iterations (not at the last);
* ``on_end(state, result)``: after the last step (``result`` as ``result.json`` will hold it), or with
  ``result=None`` when the run stops on an exception, so that writers are closed either way.

The training time does not run during any hook but ``on_check``. Callbacks change only the fields of the
state their job owns (the guard sets ``status``; ``Checkpoints`` restores the counters on resume).
"""
from __future__ import annotations

import csv
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from simpnet_cli.errors import UserError
from simpnet_cli.files import atomic_write
from simpnet_cli.train import checkpoint

from simpnet_cli.train.state import CHECKPOINT, TrainState
CURVE_COLUMNS = ["iter", "test_acc", "test_loss", "train_loss", "lr", "wall_s"]
# What TensorBoard and MLflow get: the test figures and the rate at each evaluation (curve.csv's columns), and the
# training loss at every check (every ``check_every`` iterations, at most 50): its mean over the iterations since
# the previous check, so a long interval between evaluations still shows how the loss moves.
EVAL_LOGGED = {"test_acc": "test/acc", "test_loss": "test/loss", "lr": "train/lr"}
CHECK_LOGGED = {"train_loss": "train/loss"}
LOGGED = {**EVAL_LOGGED, **CHECK_LOGGED}  # curve.csv column -> tag


class Callback(Protocol):
    """Hooks of a training run (see the module's docstring). Subclass it and override what you need; the loop
    also takes any object with some of these methods."""

    def on_start(self, state: TrainState) -> None: ...

    def on_check(self, state: TrainState) -> None: ...

    def on_eval(self, state: TrainState, acc: float, loss: float) -> None: ...

    def on_checkpoint(self, state: TrainState) -> None: ...

    def on_end(self, state: TrainState, result: dict | None) -> None: ...


# --------------------------------------------------------------------------- checkpoints, guard, audit

class Checkpoints(Callback):
    """``run_dir/checkpoint.pt``: the whole training state every ``checkpoint_every`` iterations, and the
    resume from it. Data order, augmentation and learning rate are functions of the iteration and the RNG
    states (dropout) are restored, so a resumed CPU run equals an uninterrupted one."""

    def on_start(self, state: TrainState) -> None:
        path = state.run_dir / CHECKPOINT
        if not path.exists():
            return
        ckpt = checkpoint.read(path, state.run.config_hash)  # on the CPU, checksummed; refused if damaged
        optimizer = state.optimizer
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        checkpoint.restore(path, ckpt, state.model, optimizer)
        # load_state_dict also replaces each group's settings with the saved ones; the run's own are the truth
        # (the checkpoint may come from a run with(out) CUDA graphs, or predate the lr/decay multipliers).
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        start = int(ckpt["iteration"])
        state.iteration = state.start = start
        state.curve, state.train_time, state.best = ckpt["curve"], ckpt["train_time"], tuple(ckpt["best"])
        state.loss_n = start % state.eval_every
        state.step.updates.fill_(start)
        state.step.loss_sum.fill_(ckpt.get("loss_sum", 0.0))  # the partial sum since the last evaluation
        checkpoint.set_rng_state(ckpt["rng"], state.device)
        check_resumed(state, path)
        state.log(f"resuming {state.run_dir.name} at iteration {start}")

    def on_checkpoint(self, state: TrainState) -> None:
        it, epoch_len = state.iteration, state.data.epoch_len
        checkpoint.save(state.run_dir / CHECKPOINT, {
            "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(), "iteration": it,
            "curve": state.curve, "best": state.best, "train_time": state.train_time,
            "rng": checkpoint.rng_state(state.device),
            "data_position": {"epoch": it * state.batch_size // epoch_len, "offset": it * state.batch_size % epoch_len},
            "loss_sum": state.step.loss_sum.item(), "config_hash": state.run.config_hash,
        }, state.run.config_hash)


def check_resumed(state: TrainState, path: Path) -> None:
    """A checkpoint that passed its checksum may still hold NaN or infinite numbers (written so): its weights,
    its solver's buffers and the loss of its weights on the next batch are checked when it is restored. A
    checkpoint that passes is healthy, so a NaN after the resume is the run's own divergence, recorded as such,
    even when it comes at once (a run killed between its last checkpoint and the NaN, issue 19 class 8)."""
    why = f"NaN or infinite right after resuming at iteration {state.start}, so it is corrupt"
    for name, value in state.model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise checkpoint.unreadable(path, f"its weights ({name}) are {why}")
    for opt_state in state.optimizer.state.values():
        for name, value in opt_state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise checkpoint.unreadable(path, f"its solver state ({name}) is {why}")
    x, y = state.data.batch(state.start)
    state.model.eval()  # (running BatchNorm statistics: the forward pass must not move them)
    try:
        with torch.no_grad(), state.autocast():
            loss = torch.nn.functional.cross_entropy(state.model(x).float(), y)
    finally:
        state.model.train()
    if not bool(torch.isfinite(loss)):
        raise checkpoint.unreadable(path, f"the loss of its weights is {why}")


class DivergenceGuard(Callback):
    """A non-finite training loss stops the run with status "diverged" (recorded, with its real time). A
    resumed run's checkpoint was checked when it was restored (check_resumed), so a NaN right after a resume
    is a divergence too, never taken for a damaged checkpoint (which would refuse the run for ever)."""

    def on_check(self, state: TrainState) -> None:
        if state.loss_finite:
            return
        state.status = "diverged"
        state.log(f"loss became NaN or infinite by iteration {state.iteration}; stopping this run")


class UpdateAudit(Callback):
    """The step's own count of applied updates must equal the iteration: an empty CUDA graph (replays that do
    nothing) or a double-applied one stops the run before a wrong figure is recorded. Checked at every check,
    so before each evaluation (the device is idle then: the read costs one tiny copy)."""

    def on_check(self, state: TrainState) -> None:
        applied = int(state.step.updates.item())
        if applied != state.iteration:
            raise UserError(f"{state.run_dir.name}: the training step applied {applied} updates in "
                            f"{state.iteration} iterations ({state.step.step_mode}); stopping before a wrong "
                            f"figure is recorded. Re-run with profile.train.graphs=false to train without CUDA "
                            f"graphs")


# --------------------------------------------------------------------------- progress

@dataclass(frozen=True)
class Event:
    """One report from a training run (rendered by runs.progress.Reporter).

    kind: "start" (about to train, ``iteration == start``), "step" (a few iterations later) or "eval"
    (a test evaluation at ``iteration``). ``train_s`` is the training time and ``wall_s`` the wall time
    (evaluations and checkpoints included) since *this session* of the run started at ``start``."""
    kind: str
    iteration: int
    iterations: int
    start: int
    batch_size: int
    train_s: float
    wall_s: float
    test_acc: float | None = None  # the last evaluation's, if any (also one before a resume)
    best_acc: float | None = None
    best_iter: int | None = None


class Progress(Callback):
    """Calls ``report(Event)`` before the first step, at each check between evaluations and at each
    evaluation. Rates count this session only: a resumed run's earlier iterations and time are in neither."""

    def __init__(self, report: Callable[[Event], None]):
        self.report = report

    def _send(self, kind: str, state: TrainState) -> None:
        best = state.best[0] >= 0
        self.report(Event(kind, state.iteration, state.iterations, state.start, state.batch_size,
                          state.trained_s() - self.session[1], time.perf_counter() - self.session[0],
                          state.curve[-1]["test_acc"] if state.curve else None,
                          state.best[0] if best else None, state.best[1] if best else None))

    def on_start(self, state: TrainState) -> None:
        self.session = (time.perf_counter(), state.train_time)
        self._send("start", state)

    def on_check(self, state: TrainState) -> None:
        if state.status == "ok" and not state.eval_due:  # an evaluation reports this iteration itself
            self._send("step", state)

    def on_eval(self, state: TrainState, acc: float, loss: float) -> None:
        self._send("eval", state)


# --------------------------------------------------------------------------- the authors' runs as yardstick

@dataclass(frozen=True)
class AuthorsBand:
    """The authors' runs of one table row along training (runs/authors.py builds it from their logs): at each
    iteration they tested, the lowest and highest of their runs' test accuracies (%) and the noise of one of
    their evaluations there (``noise``, in points: the curves' scatter between neighbouring tests)."""
    label: str            # the row ("8L")
    iters: tuple          # ascending iterations
    low: tuple
    high: tuple
    noise: tuple
    runs: int             # logs behind the band

    def at(self, iteration: int) -> tuple[float, float, float] | None:
        """(lowest, highest, noise) interpolated at ``iteration``; None outside the iterations they tested."""
        import numpy as np

        if not self.iters or not self.iters[0] <= iteration <= self.iters[-1]:
            return None
        return tuple(float(np.interp(iteration, self.iters, ys)) for ys in (self.low, self.high, self.noise))


class Yardstick(Callback):
    """At each evaluation, the run's test accuracy against the authors' runs of its row at the same iteration.

    ``band_of(run)`` gives the row's ``AuthorsBand``, or None where there is no yardstick (a variant, a smoke
    run, a row without logs): one instance serves every run of a group trained together. A run is *below* when
    its accuracy is under the authors' lowest run by more than ``margin`` for ``STREAK`` evaluations in a row;
    the log says so once, and ``result.json`` records ``yardstick``: ``inside``, ``below at iteration N`` (the
    first of those evaluations) or ``above`` (over their highest by the margin, as many times in a row).

    The margin is ``SIGMAS`` standard errors of one comparison: the binomial standard error of an accuracy on
    the run's test set (100 * sqrt(p (1 - p) / n): 0.3 points at 90% on 10,000 images) and the noise of the
    authors' curve there, in quadrature. The authors' spread between runs is inside the band already (the
    comparison is with their lowest). For a run that trains as theirs did, one evaluation three standard errors
    under is a 1-in-740 chance, three in a row about 1 in 4 * 10^8 were they independent (neighbouring tests are
    correlated, so it is less rare, still rare); a real gap of a point or more after the lr drops is caught."""

    STREAK = 3
    SIGMAS = 3.0

    def __init__(self, band_of: Callable[[object], AuthorsBand | None]):
        self.band_of = band_of
        self.runs: dict = {}  # run folder -> where its comparison stands

    def margin(self, low: float, noise: float, test_size: int) -> float:
        p = min(max(low / 100.0, 0.0), 1.0)
        se = 100.0 * (p * (1.0 - p) / max(test_size, 1)) ** 0.5
        return self.SIGMAS * (se * se + noise * noise) ** 0.5

    def on_start(self, state: TrainState) -> None:
        try:
            band = self.band_of(state.run)
        except Exception as err:  # noqa: BLE001 - a yardstick that cannot be read must never cost the run
            state.log(f"no yardstick for this run: the authors' runs are unreadable ({type(err).__name__}: {err})")
            band = None
        if band is None:
            self.runs.pop(state.run_dir, None)
            return
        self.runs[state.run_dir] = {"band": band, "below": 0, "above": 0, "compared": 0, "verdict": None}
        for point in state.curve:  # a resumed run: its earlier evaluations, judged again without a word
            self._judge(state, int(point["iter"]), float(point["test_acc"]), speak=False)

    def on_eval(self, state: TrainState, acc: float, loss: float) -> None:
        self._judge(state, state.iteration, acc, speak=True)

    def _judge(self, state: TrainState, iteration: int, acc: float, speak: bool) -> None:
        mine = self.runs.get(state.run_dir)
        if mine is None:
            return
        got = mine["band"].at(iteration)
        if got is None:
            return
        low, high, noise = got
        margin = self.margin(low, noise, len(state.data.test_y))
        mine["compared"] += 1
        mine["below"] = mine["below"] + 1 if acc < low - margin else 0
        mine["above"] = mine["above"] + 1 if acc > high + margin else 0
        if mine["verdict"] is not None and mine["verdict"].startswith("below"):
            return  # said once; the first fall is what result.json keeps
        if mine["below"] >= self.STREAK:
            first = [int(p["iter"]) for p in state.curve if int(p["iter"]) <= iteration][-self.STREAK:]
            mine["verdict"] = f"below at iteration {first[0] if len(first) == self.STREAK else iteration}"
            if speak:
                run = state.run
                # (the display names the run before it; runs trained together share one log, so the seed is said)
                span = f"{low:.1f}%" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f}%"
                theirs = "the authors' run" if mine["band"].runs == 1 else "the authors' runs"
                state.log(f"{acc:.1f}% at {iteration:,}, {theirs} {span} (seed {run.seed}: "
                          f"more than {margin:.1f} points under their lowest for {self.STREAK} evaluations in a "
                          f"row; yardstick: {mine['verdict']})")
        elif mine["above"] >= self.STREAK:
            mine["verdict"] = "above"

    def on_end(self, state: TrainState, result: dict | None) -> None:
        mine = self.runs.get(state.run_dir)
        if result is not None and mine is not None and mine["compared"]:
            result["yardstick"] = mine["verdict"] or "inside"


# --------------------------------------------------------------------------- loggers

def write_curve(path: Path, curve: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, CURVE_COLUMNS)
            w.writeheader()
            w.writerows(curve)
    atomic_write(path, write)


class CsvLogger(Callback):
    """``run_dir/curve.csv``, one line per evaluation (CURVE_COLUMNS), appended as each evaluation ends, so the
    file grows during the run. The checkpoint's curve is the truth: a (resumed) run starts by writing the file
    anew from it, so lines a killed session appended after its last checkpoint, torn or not, are dropped before
    they are evaluated again; the finished run writes it whole once more."""

    def on_start(self, state: TrainState) -> None:
        write_curve(state.run_dir / "curve.csv", state.curve)

    def on_eval(self, state: TrainState, acc: float, loss: float) -> None:
        with open(state.run_dir / "curve.csv", "a", newline="") as fh:
            csv.DictWriter(fh, CURVE_COLUMNS).writerow(state.curve[-1])

    def on_end(self, state: TrainState, result: dict | None) -> None:
        if result is not None:
            write_curve(state.run_dir / "curve.csv", state.curve)


class CheckLoss:
    """The mean training loss over the iterations since the previous check, for the loggers. Read at a check,
    where the host has just waited for the device (the non-finite flag): one scalar copy more, no extra wait.
    The step's sum restarts at each evaluation (``TrainState.record_eval``), so the window does too."""

    def start(self, state: TrainState) -> None:
        self.window = (state.step.loss_sum.item(), state.loss_n)  # a resumed run: its partial sum

    def restart(self) -> None:
        self.window = (0.0, 0)

    def mean(self, state: TrainState) -> float | None:
        total, n = state.step.loss_sum.item(), state.loss_n
        before, before_n = self.window
        self.window = (total, n)
        if n <= before_n or not state.loss_finite:
            return None
        return (total - before) / (n - before_n)


def _missing(package: str) -> UserError:
    return UserError(f"logger={package} needs the {package} package, which is not installed: "
                     f"pip install -e '.[{package}]' (in a clone; pip install 'simpnet[{package}]' otherwise)")


class TensorBoardLogger(Callback):
    """Event files in ``run_dir/tb/`` (``tensorboard --logdir <runs_dir>`` shows every run). A resumed run
    writes into the same folder and purges what the interrupted session logged after its checkpoint, so each
    step appears once; the writer is flushed at each checkpoint, so a killed run loses nothing before it."""

    def on_start(self, state: TrainState) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        # purge_step hides logged steps >= it: the resumed session logs every step after its checkpoint again
        self.writer = SummaryWriter(log_dir=str(state.run_dir / "tb"), purge_step=state.start + 1)
        self.loss = CheckLoss()
        self.loss.start(state)

    def on_check(self, state: TrainState) -> None:
        mean = self.loss.mean(state)
        if mean is not None:
            self.writer.add_scalar(CHECK_LOGGED["train_loss"], mean, state.iteration)

    def on_eval(self, state: TrainState, acc: float, loss: float) -> None:
        row = state.curve[-1]
        for column, tag in EVAL_LOGGED.items():
            self.writer.add_scalar(tag, row[column], state.iteration)
        self.loss.restart()

    def on_checkpoint(self, state: TrainState) -> None:
        self.writer.flush()

    def on_end(self, state: TrainState, result: dict | None) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()
            self.writer = None


class MlflowLogger(Callback):
    """One MLflow run per training run, in the experiment ``simpnet`` of the tracking store that mlflow's own
    settings name (MLFLOW_TRACKING_URI; ./mlruns by default). Its id is kept in ``run_dir/mlflow_run_id``, so a
    resumed run continues the same MLflow run; steps it already holds are not logged twice."""

    ID_FILE = "mlflow_run_id"
    EXPERIMENT = "simpnet"

    def on_start(self, state: TrainState) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        self.client, self.run_id, self.logged, self.logged_checks = MlflowClient(), None, set(), set()
        self.loss = CheckLoss()
        self.loss.start(state)
        id_file = state.run_dir / self.ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.logged = {m.step for m in self.client.get_metric_history(run_id, EVAL_LOGGED["test_acc"])}
                self.logged_checks = {m.step for m in self.client.get_metric_history(run_id, CHECK_LOGGED["train_loss"])}
            except Exception as err:  # noqa: BLE001 - mlflow raises its own MlflowException for a missing run
                raise UserError(f"cannot continue MLflow run {run_id} (named in {id_file}): "
                                f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}; "
                                f"delete that file to log this run as a new MLflow run") from None
            self.run_id = run_id
            return
        experiment = self.client.get_experiment_by_name(self.EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.EXPERIMENT)
        run = state.run
        self.run_id = self.client.create_run(
            experiment_id, run_name=f"table{run.table}-{run.row_id}-seed{run.seed}",
            tags={"table": str(run.table), "row": str(run.row_id), "seed": str(run.seed),
                  "config_hash": run.config_hash}).info.run_id
        for key, value in (("iterations", state.iterations), ("batch_size", state.batch_size),
                           ("solver", run.solver.get("type")), ("lr", run.solver.get("lr"))):
            self.client.log_param(self.run_id, key, value)
        atomic_write(id_file, lambda tmp: Path(tmp).write_text(self.run_id + "\n"))

    def on_check(self, state: TrainState) -> None:
        mean = self.loss.mean(state)
        if mean is not None and state.iteration not in self.logged_checks:  # (a resumed run's steps: once)
            self.client.log_metric(self.run_id, CHECK_LOGGED["train_loss"], mean, step=state.iteration)

    def on_eval(self, state: TrainState, acc: float, loss: float) -> None:
        self.loss.restart()
        if state.iteration in self.logged:
            return
        row = state.curve[-1]
        for column, key in EVAL_LOGGED.items():
            self.client.log_metric(self.run_id, key, float(row[column]), step=state.iteration)

    def on_end(self, state: TrainState, result: dict | None) -> None:
        if getattr(self, "run_id", None) is None:
            return
        if result is not None:
            self.client.set_tag(self.run_id, "status", result["status"])
        self.client.set_terminated(self.run_id, "FINISHED" if result is not None else "KILLED")
        self.run_id = None


LOGGERS: dict[str, tuple[type, str | None]] = {  # name -> (callback, the package it needs)
    "csv": (CsvLogger, None),
    "tensorboard": (TensorBoardLogger, "tensorboard"),
    "mlflow": (MlflowLogger, "mlflow"),
}


def logger_names(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``logger=`` as a tuple of known names: "csv", "tensorboard,mlflow" or a list of them. "csv" is always
    among them: curve.csv is part of the run's record (the report draws the curves from it), and the other
    loggers come in addition. Unknown names and missing packages are one UserError line each, so a command can
    check before anything trains."""
    items = [] if value is None else value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(["csv"] + [str(n).strip() for n in items if str(n).strip()]))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise UserError(f"logger={','.join(unknown)}: use {' | '.join(LOGGERS)}, or a list such as "
                        f"logger=[csv,tensorboard]")
    for name in names:
        package = LOGGERS[name][1]
        if package and not _installed(package):
            raise _missing(package)
    return names


def _installed(package: str) -> bool:
    """Found, not imported (mlflow takes seconds to import); a module already imported (or set to None in
    sys.modules, as a test does to hide one) answers for itself."""
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def loggers_for(value: str | Iterable[str] | None) -> list[Callback]:
    """Fresh logger callbacks for one run (see ``logger_names`` for what ``value`` may be)."""
    return [LOGGERS[name][0]() for name in logger_names(value)]
