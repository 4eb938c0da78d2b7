"""ATen ops per training step: how many kernels one step of a row launches (issue 26, item 3).

On a GPU the step of the small networks is bound by kernel launches, not arithmetic, and each ATen op of the
step body is (about) one kernel in its captured graph. The count is of exactly the body ``captured_step.Step``
captures (forward, backward, optimizer update, loss bookkeeping): the step is built as a run builds it, with
graphs on and a backend whose capture only records the body, and then the recorded body runs once under a
``TorchDispatchMode`` that counts every op it dispatches. The step's warm-up (the first update, which makes
the solver's state) runs before, uncounted, as it does before a real capture. The count depends on the
network, the solver and the way of stepping, not on the batch or the device, so the CPU checks it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from simpnet_cli.config import tables
from simpnet_cli.train import captured_step
from simpnet_cli.train import together

# The ways a step is counted: (precision, how k runs are stepped: None for one run).
MODES = {"single": ("fp32", None), "bf16": ("bf16", None), "grouped": ("fp32", "grouped"),
         "branched": ("fp32", "branched")}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it, by name. Views (detach, view, unsqueeze, t, select, ...) are
    left out: they make a new tensor header over the same memory on the host and launch no kernel."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class _Stream:
    def wait_stream(self, other) -> None:
        pass


def recording_backend(bodies: list) -> captured_step.GraphBackend:
    """A capture that records the body into ``bodies`` without running it (as CUDA capture records kernels)."""
    return captured_step.GraphBackend(
        new_graph=lambda: None, new_stream=lambda dev: _Stream(), device_scope=lambda dev: contextlib.nullcontext(),
        stream_scope=lambda stream: contextlib.nullcontext(), current_stream=lambda dev: _Stream(),
        capture=lambda graph, body, stream: bodies.append(body))


def _synthetic(run: tables.RunSpec, precision: str, batch: int) -> tables.RunSpec:
    ds = {**run.dataset, "source": "synthetic", "train_size": 4 * batch, "test_size": batch}
    return dataclasses.replace(run, dataset=ds, train={**run.train, "precision": precision, "batch_size": batch,
                                                         "graphs": True})


def count_step(run: tables.RunSpec, mode: str = "single", k: int = 1, device: torch.device | str = "cpu",
               batch: int = 4) -> Counter:
    """The ATen ops (name: count) of one captured step body of ``run`` in ``mode`` (MODES): one run, or ``k`` runs
    grouped or branched, on synthetic data of the run's shape at ``batch`` images (the count does not depend on
    it). The step's warm-up and capture run first, uncounted."""
    if mode not in MODES:
        raise ValueError(f"ops mode {mode!r}: one of {', '.join(MODES)}")
    precision, how = MODES[mode]
    device = torch.device(device)
    run = _synthetic(run, precision, batch)
    bodies: list = []
    backend = recording_backend(bodies)
    runs = [dataclasses.replace(run, seed=seed) for seed in range(1 if how is None else k)]
    step, lr = together.step_of(runs, device, how or "separate", backend)
    step(0, lr)  # the warm-up (uncounted) and the capture, which records the body
    if len(bodies) != 1:
        raise RuntimeError(f"the step of {run.row_id} ({mode}) was not captured: {step.step_mode}")
    with OpCounter() as counter:
        bodies[0]()
    return counter.ops


def ops_per_step(run: tables.RunSpec, mode: str = "single", k: int = 1, device: torch.device | str = "cpu") -> int:
    return sum(count_step(run, mode, k, device).values())
