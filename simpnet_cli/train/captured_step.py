"""The training step: one function of the iteration that cuts, augments, forwards, backwards and updates.

On the CPU it runs eagerly. On a GPU the batch-100 step of these small networks is bound by kernel-launch
overhead, not arithmetic, so the whole step (gather + crop + flip + normalise, forward, loss, backward,
optimizer update, loss bookkeeping) is captured once into a CUDA graph and replayed: per iteration, three
small copies of the batch plan into the graph's inputs and one replay. In a graph each group's learning rate is a
0-dim tensor on the device that the optimizer's kernels read (train/solvers.py), so a schedule's change is one
in-place fill before the next replay, and a run is captured once: no re-capture, so no memory pool to share
between a destroyed graph and its successor.

Capture follows PyTorch's whole-network recipe, with what a multi-GPU, multi-version world needs: one capture
stream per run, made on the run's device inside ``torch.cuda.device(dev)``, used for the warm-up and the
capture alike (so per-stream library workspaces are allocated before capture, outside the graph's pool). If
capture fails, the run goes on eagerly from the same iteration and says so in its ``step_mode``; if the warm-up
failed midway, after some tensors were updated in place, everything it touched is restored first, so the eager
step applies this iteration's update once.

Every CUDA call the capture makes goes through a ``GraphBackend``, so the CPU tests run this exact control
flow with stand-ins (tests/test_gpu_path.py). ``updates`` counts the updates the step really applied; the
training loop compares it with the iteration at every evaluation, which catches an empty graph (replays that
do nothing) or a double-applied one before a wrong figure is recorded.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from simpnet_cli.train import data as D
from simpnet_cli.train.solvers import CastOnce, Solver

@dataclass(frozen=True)
class GraphBackend:
    """The device calls of a capture. ``capture(graph, body, stream)`` records ``body`` into ``graph``."""
    new_graph: Callable[[], Any]
    new_stream: Callable[[torch.device], Any]
    device_scope: Callable[[torch.device], contextlib.AbstractContextManager]
    stream_scope: Callable[[Any], contextlib.AbstractContextManager]
    current_stream: Callable[[torch.device], Any]
    capture: Callable[[Any, Callable[[], None], Any], None]


def _cuda_capture(graph, body, stream) -> None:
    with torch.cuda.graph(graph, stream=stream):
        body()


CUDA = GraphBackend(
    new_graph=lambda: torch.cuda.CUDAGraph(),
    new_stream=lambda dev: torch.cuda.Stream(device=dev),
    device_scope=lambda dev: torch.cuda.device(dev),
    stream_scope=lambda stream: torch.cuda.stream(stream),
    current_stream=lambda dev: torch.cuda.current_stream(dev),
    capture=_cuda_capture,
)


def not_finite(loss: torch.Tensor) -> torch.Tensor:
    """Non-zero where ``loss`` is infinite or NaN, in two kernels (``~torch.isfinite`` takes five): x - x is 0
    for every finite x and NaN otherwise, and NaN is true to ``logical_or``."""
    return loss - loss


class Step:
    """``step(iteration, lr)`` trains one batch. ``loss_sum``, ``bad`` (a non-finite loss was seen) and
    ``updates`` accumulate on the device, so nothing waits for the GPU until the caller reads them."""

    def __init__(self, model: torch.nn.Module, optimizer: Solver, data: D.DeviceData,
                 autocast: Callable[[], contextlib.AbstractContextManager], graphs: bool,
                 channels_last: bool = True, backend: GraphBackend | None = None, updates: int = 0):
        self.model, self.optimizer, self.data, self.autocast = model, optimizer, data, autocast
        # the forward pass: in bf16, on copies of the weights made once per step (solvers.CastOnce)
        self.forward = CastOnce(model) if model is not None else None
        dev = data.device
        self.loss_sum = torch.zeros((), device=dev)
        self.bad = torch.zeros((), dtype=torch.bool, device=dev)
        self.updates = torch.full((), updates, dtype=torch.int64, device=dev)
        self.channels_last = channels_last and dev.type == "cuda"
        # A backend given explicitly (a test's stand-in) captures on any device; the real one needs CUDA.
        self.backend = backend or CUDA
        self.graphs = graphs and (backend is not None or dev.type == "cuda")
        self.step_mode = "cuda-graph" if self.graphs else "eager"
        self._graph, self._static, self._stream, self._lr = None, None, None, None
        # In a graph, each group's lr lives in a tensor of its own that the captured kernels read at replay.
        # (A shared step of branches has no optimizer of its own: each branch is a Step; train/stacked_step.py.)
        self._lrs = [torch.zeros((), dtype=g["params"][0].dtype, device=dev) for g in optimizer.param_groups] \
            if self.graphs and optimizer is not None else None
        self._warmed_up = False

    def reset_loss(self) -> None:
        self.loss_sum.zero_()

    def _body(self, idx, offsets, flips) -> None:
        """One update. Inside a graph every op here is a kernel on static buffers: no host sync, no
        data-dependent shape (tests/test_gpu_path.py checks this for every row)."""
        self.optimizer.zero_grad(set_to_none=True)
        x = self.data.images(idx, offsets, flips)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            loss = F.cross_entropy(self.forward(x).float(), self.data.train_y[idx])
        loss.backward()
        self.forward.gradients_back()
        self.optimizer.step()
        loss = loss.detach()
        self.loss_sum.add_(loss)
        self.bad.logical_or_(not_finite(loss))
        self.updates.add_(1)

    def _set_lr(self, lr: float) -> None:
        """Each group at ``lr`` * its lr_mult (Caffe's per-parameter multipliers, solvers.param_groups). In a graph,
        in place into the tensors the captured kernels read; the group is pointed at its tensor again each time,
        since a checkpoint's load_state_dict replaces the group's entries."""
        if self.graphs and self._graph is not None and lr == self._lr:
            return  # the graph's tensors already hold it: no kernel launch for an unchanged rate
        for i, group in enumerate(self.optimizer.param_groups):
            rate = lr * group.get("lr_mult", 1)
            if self.graphs:
                self._lrs[i].fill_(rate)
                group["lr"] = self._lrs[i]
            else:
                group["lr"] = rate
        self._lr = lr

    def __call__(self, iteration: int, lr: float) -> None:
        plan = self.data.batch_plan(iteration)
        if not self.graphs:
            self._eager(plan, lr)
            return
        if self._graph is None:
            self._capture_or_fall_back(plan, lr)  # trains this iteration's batch either way
            return
        self._set_lr(lr)
        for static, value in zip(self._static, plan):
            static.copy_(value)
        self._graph.replay()

    def _capture_or_fall_back(self, plan, lr: float) -> None:
        saved = self._snapshot()
        try:
            self._capture(plan, lr)
        except Exception as err:  # noqa: BLE001 - any failure of a driver, a library or torch itself
            reason = " ".join(str(err).split())[:120] or type(err).__name__
            self.graphs, self._graph = False, None
            self.step_mode = f"eager (capture failed: {type(err).__name__}: {reason})"
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {reason}); this run continues "
                          f"eagerly from the same iteration", RuntimeWarning, stacklevel=2)
            if not self._warmed_up:
                # The warm-up may have stopped midway with some parameters (or optimizer state, BatchNorm
                # statistics, counters, RNG) already changed: put everything back, then train this iteration once.
                self._restore(saved)
                self._eager(plan, lr)

    def _snapshot(self) -> dict:
        """Copies of everything one step changes, taken before the warm-up (once per run: the capture)."""
        dev = self.data.device
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "counters": [t.clone() for t in (self.loss_sum, self.bad, self.updates)],
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}

    def _restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])  # copies into the same tensors
        self.optimizer.load_state_dict(saved["optimizer"])  # state made by the failed warm-up is dropped
        for tensor, value in zip((self.loss_sum, self.bad, self.updates), saved["counters"]):
            tensor.copy_(value)
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.data.device)
        self._lr = None

    def _eager(self, plan, lr: float) -> None:
        self._set_lr(lr)
        self._body(*plan)

    def _capture(self, plan, lr: float) -> None:
        """Warm up on the run's own capture stream (the real update of this iteration: it allocates optimizer
        state and picks cuDNN kernels), then capture the same body on that stream without running it."""
        dev, api = self.data.device, self.backend
        self._warmed_up = False
        self._set_lr(lr)
        self._static = tuple(t.clone() for t in plan)
        with api.device_scope(dev):
            self._stream = api.new_stream(dev)
            self._stream.wait_stream(api.current_stream(dev))
            with api.stream_scope(self._stream):
                self._body(*self._static)
                self._warmed_up = True
                graph = api.new_graph()
                api.capture(graph, lambda: self._body(*self._static), self._stream)
            api.current_stream(dev).wait_stream(self._stream)
        self._graph = graph
