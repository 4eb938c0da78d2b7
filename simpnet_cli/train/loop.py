"""The training loop: one ``fit`` for k >= 1 runs that share one step (a run trained alone is a group of one).

``train`` builds each run's ``TrainState`` (train/state.py: the model, optimizer, data and counters of one run)
and the step they train with: a run's own (``captured_step.Step``), or one step shared by k runs of one network
(train/together.py: grouped or branched), then hands them to ``fit``: per iteration each run's learning rate
and one step; at intervals the non-finite check, the evaluations and the checkpoints. What happens at those
moments beyond the arithmetic (resume, the divergence guard, the update audit, progress, loggers) is a
callback's (train/callbacks.py), each run with its own.

A run's folder holds ``config.yaml`` (the resolved run), ``checkpoint.pt`` (written atomically every
``checkpoint_every`` iterations), ``curve.csv`` (one line per evaluation, from the default csv logger; also
``tb/`` or ``mlflow_run_id`` with the other loggers), ``model.pt`` (final weights) and, last of all,
``result.json``: a run is finished exactly when that file exists. Training the same runs again continues from
their checkpoints (callbacks.Checkpoints).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from simpnet_cli.config.tables import RunSpec
from simpnet_cli.errors import UserError
from simpnet_cli.train import callbacks as C
from simpnet_cli.train import captured_step
from simpnet_cli.train import solvers
from simpnet_cli.train import stacked_step
from simpnet_cli.train import together
from simpnet_cli.train.callbacks import Callback, Event
from simpnet_cli.train.state import (TrainState, build, evaluate, read_result, result_of, write_config,
                                     write_outcome)


class Hooks:
    """Calls one hook on every callback that has it, in order."""

    def __init__(self, callbacks: Iterable):
        self.callbacks = list(callbacks)

    def __call__(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    def failed(self, state: TrainState) -> None:
        """on_end(state, None) on every callback; a second failure must not hide why the run stopped."""
        for cb in self.callbacks:
            try:
                fn = getattr(cb, "on_end", None)
                if fn is not None:
                    fn(state, None)
            except Exception:  # noqa: BLE001
                pass


class Alone:
    """A run's own step (``captured_step.Step``) as a shared step of one: what ``fit`` drives. Its model and
    optimizer are the run's, so there is nothing to take over or hand back; its dropout draws from the global
    RNG, which the run's checkpoint saves and restores."""
    how, k, generators = "separate", 1, ()

    def __init__(self, step: captured_step.Step):
        self.step = step
        self.members = [step]

    def __call__(self, iteration: int, lrs: Sequence[float]) -> None:
        self.step(iteration, lrs[0])

    def take_over(self, models, optimizers) -> None:
        pass

    def hand_back(self, i: int, model, optimizer) -> None:
        pass


class _Group:
    """The runs still training and their hooks; moves the shared step's state to a run before it is read."""

    def __init__(self, states, step, callbacks):
        self.states, self.step = list(states), step
        self.hooks = [Hooks(cbs) for cbs in callbacks]
        self.active = list(range(len(self.states)))
        self.results: list[dict | None] = [None] * len(self.states)

    def hand_back(self, i: int) -> None:
        self.step.hand_back(i, self.states[i].model, self.states[i].optimizer)

    def clocks(self, running: bool) -> None:
        for i in self.active:
            (self.states[i].start_clock if running else self.states[i].stop_clock)()

    def finish(self, i: int) -> None:
        state = self.states[i]
        state.stop_clock()
        self.hand_back(i)
        self.results[i] = result_of(state)
        self.active.remove(i)
        self.hooks[i]("on_end", state, self.results[i])


def fit(states: Sequence[TrainState], step, callbacks: Sequence[Iterable]) -> list[dict]:
    """Train the runs of ``states`` to their last iteration with their one ``step`` (``Alone`` for a run by
    itself, or a ``stacked_step.SharedStep``; ``callbacks[i]``: run i's); return their results. A run that a
    callback stops (diverged) is finished at once and leaves the group; the others go on."""
    group = _Group(states, step, callbacks)
    device = states[0].device
    try:
        for i, state in enumerate(group.states):
            group.hooks[i]("on_start", state)
            if state.start and step.generators:  # its checkpoint restored the global RNG to its dropout's state
                step.generators[i].set_state(stacked_step.generator_now(device).get_state())
        starts = {s.iteration for s in states}
        if len(starts) != 1:
            raise UserError(f"runs trained together must resume from the same iteration, got {sorted(starts)}")
        step.take_over([s.model for s in states], [s.optimizer for s in states])
        group.clocks(True)
        while group.active and states[group.active[0]].iteration < states[group.active[0]].iterations:
            lead = states[group.active[0]]  # the runs still training stand at its iteration
            it = lead.iteration
            for state in states:  # (a stopped run is still stepped, unread: a shared step's shape is fixed)
                state.lr = solvers.lr_at(state.run.solver, it)
            step(it, [s.lr for s in states])
            for i in group.active:
                states[i].iteration += 1
                states[i].loss_n += 1
            if lead.iteration % lead.check_every == 0 or lead.eval_due:
                for i in list(group.active):
                    state = group.states[i]
                    state.loss_finite = not state.step.bad.item()  # the host waits for the device here only
                    group.hooks[i]("on_check", state)
                    if state.status != "ok":
                        group.finish(i)  # a stopped run records its real time and speed
            if lead.eval_due and group.active:
                group.clocks(False)
                for i in group.active:
                    group.hand_back(i)
                    acc, loss = evaluate(group.states[i].model, group.states[i].data, group.states[i].autocast)
                    group.states[i].record_eval(acc, loss)
                    group.hooks[i]("on_eval", group.states[i], acc, loss)
                group.clocks(True)
            if lead.iteration % lead.checkpoint_every == 0 and lead.iteration < lead.iterations and group.active:
                group.clocks(False)  # the steps so far count; writing the checkpoints does not
                for i in group.active:
                    group.hand_back(i)
                    if step.generators:
                        # the checkpoint saves the global RNG: make it this run's dropout generator's state, and
                        # keep the run's last checkpoint until the group's are all written
                        stacked_step.generator_to_global(step.generators[i], device)
                        keep_previous_checkpoint(group.states[i].run_dir)
                    group.hooks[i]("on_checkpoint", group.states[i])
                group.clocks(True)
        for i in list(group.active):
            group.finish(i)
    except BaseException:
        for i in group.active:
            group.hooks[i].failed(group.states[i])
        raise
    return group.results


def keep_previous_checkpoint(run_dir: Path) -> None:
    """The run's checkpoint kept as the previous one before a new one is written: a group's writes are one
    after another, so a kill between two leaves some runs one checkpoint ahead (runner.align_checkpoints)."""
    current = run_dir / C.CHECKPOINT
    if current.exists():
        current.replace(run_dir / C.PREVIOUS_CHECKPOINT)


def run_callbacks(loggers: list[Callback], progress: Callable[[Event], None] | None,
                  extra: Iterable[Callback]) -> list[Callback]:
    """A run's callbacks. Order matters: a resume restores the state before anyone reads it; the guard and the
    audit stop a run before its figures are logged or shown."""
    return [C.Checkpoints(), C.DivergenceGuard(), C.UpdateAudit(), *loggers,
            *([C.Progress(progress)] if progress is not None else []), *extra]


def train(runs: Sequence[RunSpec], run_dirs: Sequence[Path], device: torch.device, data_dir: Path, download: bool,
          how: str = "separate", log: Callable[[str], None] = lambda s: None,
          backend: captured_step.GraphBackend | None = None,
          progress: Sequence[Callable[[Event], None] | None] | None = None,
          loggers: str | Iterable[str] | None = ("csv",), callbacks: Iterable[Callback] = (),
          passengers: int = 0) -> list[dict]:
    """Train ``runs`` (resuming each from ``run_dirs[i]/checkpoint.pt`` if present) into their folders and
    return their results: one run (``how="separate"``), or k runs of one network, solver and length (each with
    its own seed, rate and schedule) in one "grouped" or "branched" step. Runs that are all finished return their
    results; a group of which only some are finished is refused (train the unfinished ones).

    ``log`` gets messages (resumed, diverged); ``progress[i]`` gets run i's ``Event``s (before the first step,
    every few iterations and at each evaluation: rendering is progress.Reporter's business); ``loggers`` names
    the loggers (callbacks.logger_names: "csv", "tensorboard", "mlflow" or several); ``callbacks`` run after the
    built-in ones. The last ``passengers`` runs only fill places of a shared step (runner.passengers): they
    checkpoint and resume, and log, show and judge nothing."""
    run_dirs, callbacks = [Path(d) for d in run_dirs], list(callbacks)
    if how == "separate" and len(runs) != 1:
        raise ValueError(f"{len(runs)} runs trained separately: give them one at a time, or a shared step")
    done = [read_result(d) for d in run_dirs]
    if all(done):
        return done
    if any(done):
        raise UserError("a run trained together is already finished: train the unfinished ones only")
    names, own = C.logger_names(loggers), len(runs) - passengers
    chosen = [C.loggers_for(names) for _ in range(own)]  # an unknown logger or a missing package stops here
    for run, run_dir in zip(runs, run_dirs):
        write_config(run, run_dir)
    if how == "separate":
        states = [build(runs[0], run_dirs[0], device, data_dir, download, log, backend)]
        step = Alone(states[0].step)
    else:
        states, step = together.build_together(runs, run_dirs, device, data_dir, download, how, log, backend)
    per_run = [run_callbacks(chosen[i], progress[i] if progress else None, callbacks) if i < own else
               run_callbacks([], None, ()) for i in range(len(states))]
    results = fit(states, step, per_run)
    for state, result in zip(states, results):
        write_outcome(state, result)
    return results


def train_run(run: RunSpec, run_dir: Path, device: torch.device, data_dir: Path, download: bool,
              log: Callable[[str], None] = lambda s: None, backend: captured_step.GraphBackend | None = None,
              progress: Callable[[Event], None] | None = None, loggers: str | Iterable[str] | None = ("csv",),
              callbacks: Iterable[Callback] = ()) -> dict:
    """``train`` of one run by itself: its result."""
    return train([run], [run_dir], device, data_dir, download, "separate", log, backend, [progress], loggers,
                 callbacks)[0]
