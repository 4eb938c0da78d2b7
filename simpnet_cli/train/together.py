"""Runs trained together: k runs of one network, solver and length (each with its own seed, rate and
schedule) stepped by one shared step (issue 20).

Each run stays a run: its own ``TrainState`` (ordinary model and optimizer, its data order, curve, clock), its
own callbacks (checkpoint and resume, divergence guard, update audit, loggers, progress) and its own files,
exactly those ``loop.train_run`` writes. Only the step is shared (``stacked_step``: grouped or branched); the
runs' models and optimizers are handed back from it before anyone reads them (a check that may stop a run,
an evaluation, a checkpoint, the end), so the callbacks and ``loop.evaluate`` work unchanged.

A run that stops early (diverged) is finished at once and leaves the group; the others go on. The runs of a
group must stand at the same iteration when they start (the runner resumes a group whose checkpoints disagree
one run at a time).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from simpnet_cli.config.tables import RunSpec
from simpnet_cli.errors import UserError
from simpnet_cli.nets import stacked as S
from simpnet_cli.train import callbacks as C
from simpnet_cli.train import captured_step
from simpnet_cli.train import loop
from simpnet_cli.train import stacked_step

HOWS = ("grouped", "branched")
TIMED = ("separate",) + HOWS  # the ways k runs can be trained, as time_steps measures them


def build_together(runs: Sequence[RunSpec], run_dirs: Sequence[Path], device: torch.device, data_dir: Path,
                   download: bool, how: str, log: Callable[[str], None],
                   backend: captured_step.GraphBackend | None = None) -> tuple[list[loop.TrainState], stacked_step.SharedStep]:
    """The runs' states (each as ``loop.build`` makes it alone) and their shared step, at iteration 0."""
    if how not in HOWS:
        raise UserError(f"runs are trained together grouped or branched, not {how!r}")
    states, generators, data = [], [], None
    for run, run_dir in zip(runs, run_dirs):
        state = loop.build(run, Path(run_dir), device, data_dir, download, log, backend, data)
        data = state.data
        states.append(state)
        generators.append(stacked_step.generator_now(device))  # where this run's dropout draws from, alone
    first = states[0]
    graphs = bool(first.run.train.get("graphs", True)) and (device.type == "cuda" or backend is not None)
    net = None
    if how == "grouped":
        net = S.build_stacked(first.run.spec, first.run.in_shape, len(runs), first.run.net).to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
    step = stacked_step.shared_step(
        how, [s.model for s in states], [s.optimizer for s in states], [s.data for s in states], first.autocast,
        graphs, generators, net=net, backend=backend,
        make_optimizer=lambda n: loop.make_optimizer(first.run.solver, loop.param_groups(n, first.run.param_mults)))
    for state, member in zip(states, step.members):
        state.step = member
    return states, step


class _Group:
    """The runs still training and their hooks; moves the shared step's state to a run before it is read."""

    def __init__(self, states, step: stacked_step.SharedStep, callbacks):
        self.states, self.step = list(states), step
        self.hooks = [loop.Hooks(cbs) for cbs in callbacks]
        self.active = list(range(len(self.states)))
        self.results: list[dict | None] = [None] * len(self.states)

    def hand_back(self, i: int) -> None:
        self.step.hand_back(i, self.states[i].model, self.states[i].optimizer)

    def call(self, hook: str, *args) -> None:
        for i in self.active:
            self.hooks[i](hook, self.states[i], *args)

    def clocks(self, running: bool) -> None:
        for i in self.active:
            (self.states[i].start_clock if running else self.states[i].stop_clock)()

    def finish(self, i: int) -> None:
        state = self.states[i]
        state.stop_clock()
        self.hand_back(i)
        self.results[i] = loop.result_of(state)
        self.active.remove(i)
        self.hooks[i]("on_end", state, self.results[i])


def fit_together(states: Sequence[loop.TrainState], step: stacked_step.SharedStep,
                 callbacks: Sequence[Iterable]) -> list[dict]:
    """Train the runs of ``states`` to their last iteration with their one shared ``step`` (``callbacks[i]``:
    run i's); return their results. The loop is ``loop.fit``'s, once per iteration for all runs."""
    group = _Group(states, step, callbacks)
    device = states[0].device
    try:
        for i, state in enumerate(group.states):
            group.hooks[i]("on_start", state)
            if state.start:  # resumed: its checkpoint restored the global RNG to where its dropout stood
                step.generators[i].set_state(stacked_step.generator_now(device).get_state())
        starts = {s.iteration for s in states}
        if len(starts) != 1:
            raise UserError(f"runs trained together must resume from the same iteration, got {sorted(starts)}")
        step.take_over([s.model for s in states], [s.optimizer for s in states])
        group.clocks(True)
        while group.active and states[group.active[0]].iteration < states[group.active[0]].iterations:
            lead = states[group.active[0]]  # the runs still training stand at its iteration
            it = lead.iteration
            for state in states:  # (a stopped run is still stepped, unread: the step's shape is fixed)
                state.lr = loop.lr_at(state.run.solver, it)
            step(it, [s.lr for s in states])
            for i in group.active:
                states[i].iteration += 1
                states[i].loss_n += 1
            if lead.iteration % lead.check_every == 0 or lead.eval_due:
                for i in list(group.active):
                    state = group.states[i]
                    state.loss_finite = not state.step.bad.item()
                    group.hooks[i]("on_check", state)
                    if state.status != "ok":
                        group.finish(i)  # a stopped run records its real time and speed, the others go on
            if lead.eval_due and group.active:
                group.clocks(False)
                for i in group.active:
                    group.hand_back(i)
                    acc, loss = loop.evaluate(group.states[i].model, group.states[i].data, group.states[i].autocast)
                    group.states[i].record_eval(acc, loss)
                    group.hooks[i]("on_eval", group.states[i], acc, loss)
                group.clocks(True)
            if lead.iteration % lead.checkpoint_every == 0 and lead.iteration < lead.iterations and group.active:
                group.clocks(False)  # the steps so far count; writing the checkpoints does not
                for i in group.active:
                    group.hand_back(i)
                    # the checkpoint saves the global RNG: make it this run's dropout generator's state
                    stacked_step.generator_to_global(step.generators[i], device)
                    group.hooks[i]("on_checkpoint", group.states[i])
                group.clocks(True)
        for i in list(group.active):
            group.finish(i)
    except BaseException:
        for i in group.active:
            group.hooks[i].failed(group.states[i])
        raise
    return group.results


def train_together(runs: Sequence[RunSpec], run_dirs: Sequence[Path], device: torch.device, data_dir: Path,
                   download: bool, how: str = "grouped", log: Callable[[str], None] = lambda s: None,
                   backend: captured_step.GraphBackend | None = None,
                   progress: Sequence[Callable[[C.Event], None]] | None = None,
                   loggers: str | Iterable[str] | None = ("csv",), callbacks: Iterable = ()) -> list[dict]:
    """Train ``runs`` (one network, schedule and length; other seeds) together, each into its own run folder
    exactly as ``loop.train_run`` would; ``progress[i]`` gets run i's events. Returns their results."""
    run_dirs = [Path(d) for d in run_dirs]
    if any(loop.read_result(d) for d in run_dirs):
        raise UserError("a run trained together is already finished: train the unfinished ones only")
    names = C.logger_names(loggers)
    extra = list(callbacks)
    for run, run_dir in zip(runs, run_dirs):
        loop.write_config(run, run_dir)
    states, step = build_together(runs, run_dirs, device, data_dir, download, how, log, backend)
    per_run = [loop.run_callbacks(C.loggers_for(names), progress[i] if progress else None, extra)
               for i in range(len(states))]
    results = fit_together(states, step, per_run)
    for state, result in zip(states, results):
        loop.write_outcome(state, result)
    return results


def time_steps(run: RunSpec, device: torch.device, how: str, k: int, iters: int, warmup: int,
               seen: list | None = None) -> float:
    """Total training images per second of ``k`` seeds of ``run`` (its network, solver and batch, on synthetic
    data of its dataset's shape: speed does not depend on pixel values) trained ``how``: "separate" (one run's
    step, k of them one after another) or in one "grouped" or "branched" step. ``warmup`` steps come first
    (capture, cuDNN's choice of kernels). The data holds every step's batch, so no epoch boundary (a reshuffle)
    falls in the timed window. The step mode it really ran in is appended to ``seen``."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as a run: fixed shapes
    batch = int(run.train["batch_size"])
    ds = {**run.dataset, "source": "synthetic", "train_size": max((warmup + iters + 1) * batch, 2000),
          "test_size": batch}
    runs = [dataclasses.replace(run, dataset=ds, seed=seed) for seed in range(1 if how == "separate" else k)]
    if how == "separate":
        step = loop.build(runs[0], Path("."), device, Path("."), False, lambda s: None, None).step
        lr = loop.lr_at(run.solver, 0)
    else:
        step = build_together(runs, [Path(".")] * k, device, Path("."), False, how, lambda s: None)[1]
        lr = [loop.lr_at(run.solver, 0)] * k
    for i in range(warmup):
        step(i, lr)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + iters):
        step(i, lr)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if seen is not None:
        seen.append(step.step_mode)
    return len(runs) * iters * batch / (time.perf_counter() - t0)
