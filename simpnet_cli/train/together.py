"""The shared steps of runs trained together: k runs of one network, solver and length (each with its own
seed, rate and schedule) stepped by one step (issue 20), and a timing of the ways to train k runs.

Each run stays a run: its own ``TrainState`` (ordinary model and optimizer, its data order, curve, clock), its
own callbacks and its own files, as ``loop.train`` writes them for any run. Only the step is shared
(``stacked_step``: grouped or branched); ``loop.fit`` hands the runs' models and optimizers back from it before
anyone reads them (a check that may stop a run, an evaluation, a checkpoint, the end), so the callbacks and
``state.evaluate`` work unchanged.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from simpnet_cli.config.tables import RunSpec
from simpnet_cli.errors import UserError
from simpnet_cli.nets import stacked as S
from simpnet_cli.train import captured_step
from simpnet_cli.train import solvers
from simpnet_cli.train import state as run_state
from simpnet_cli.train import stacked_step

HOWS = ("grouped", "branched")
TIMED = ("separate",) + HOWS  # the ways k runs can be trained, as time_steps measures them


def build_together(runs: Sequence[RunSpec], run_dirs: Sequence[Path], device: torch.device, data_dir: Path,
                   download: bool, how: str, log: Callable[[str], None],
                   backend: captured_step.GraphBackend | None = None) -> tuple[list[run_state.TrainState], stacked_step.SharedStep]:
    """The runs' states (each as ``state.build`` makes it alone) and their shared step, at iteration 0."""
    if how not in HOWS:
        raise UserError(f"runs are trained together grouped or branched, not {how!r}")
    states, generators, data = [], [], None
    for run, run_dir in zip(runs, run_dirs):
        state = run_state.build(run, Path(run_dir), device, data_dir, download, log, backend, data)
        data = state.data
        states.append(state)
        generators.append(stacked_step.generator_now(device))  # where this run's dropout draws from, alone
    first = states[0]
    graphs = first.run.training.graphs and (device.type == "cuda" or backend is not None)
    net = None
    if how == "grouped":
        net = S.build_stacked(first.run.spec, first.run.in_shape, len(runs), first.run.net).to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
    step = stacked_step.shared_step(
        how, [s.model for s in states], [s.optimizer for s in states], [s.data for s in states], first.autocast,
        graphs, generators, net=net, backend=backend,
        make_optimizer=lambda n: solvers.make_optimizer(first.run.solver, solvers.param_groups(n, first.run.param_mults)))
    for state, member in zip(states, step.members):
        state.step = member
    return states, step


def step_of(runs: Sequence[RunSpec], device: torch.device, how: str,
            backend: captured_step.GraphBackend | None = None) -> tuple:
    """(the training step of ``runs``, the rate(s) it takes at iteration 0): one run's own step ("separate"), or
    one grouped or branched step of k runs, built with no run folder. What a timing or an op count drives."""
    nowhere = lambda s: None  # noqa: E731
    if how == "separate":
        return run_state.build(runs[0], Path("."), device, Path("."), False, nowhere, backend).step, \
            solvers.lr_at(runs[0].solver, 0)
    step = build_together(runs, [Path(".")] * len(runs), device, Path("."), False, how, nowhere, backend)[1]
    return step, [solvers.lr_at(r.solver, 0) for r in runs]


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
    step, lr = step_of(runs, device, how)
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
