"""The training step: one function of the iteration that cuts, augments, forwards, backwards and updates.

On the CPU it runs eagerly. On a GPU the batch-100 step of these small networks is bound by kernel-launch
overhead, not arithmetic, so the whole step (gather + crop + flip + normalise, forward, loss, backward,
optimizer update, loss bookkeeping) is captured once into a CUDA graph and replayed: per iteration, three
small copies of the batch plan into the graph's inputs and one replay. The learning rate enters the captured optimizer kernels as a constant, so the graph is
captured again whenever the schedule changes the rate (a handful of times per run).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from simpnet_cli import data as D


class Step:
    """``step(iteration, lr)`` trains one batch; ``loss_sum`` and ``bad`` (a non-finite loss was seen)
    accumulate on the device, so nothing waits for the GPU until the caller reads them."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: D.DeviceData,
                 autocast: Callable[[], contextlib.AbstractContextManager], graphs: bool,
                 channels_last: bool = True):
        self.model, self.optimizer, self.data, self.autocast = model, optimizer, data, autocast
        dev = data.device
        self.loss_sum = torch.zeros((), device=dev)
        self.bad = torch.zeros((), dtype=torch.bool, device=dev)
        self.channels_last = channels_last and dev.type == "cuda"
        self.graphs = graphs and dev.type == "cuda"
        self._graph, self._graph_lr, self._static = None, None, None

    def reset_loss(self) -> None:
        self.loss_sum.zero_()

    def _body(self, idx, offsets, flips) -> None:
        x = self.data.images(idx, offsets, flips)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            loss = F.cross_entropy(self.model(x).float(), self.data.train_y[idx])
        loss.backward()
        self.optimizer.step()
        loss = loss.detach()
        self.loss_sum.add_(loss)
        self.bad.logical_or_(~torch.isfinite(loss))

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, iteration: int, lr: float) -> None:
        plan = self.data.batch_plan(iteration)
        if not self.graphs:
            self._set_lr(lr)
            self.optimizer.zero_grad(set_to_none=True)
            self._body(*plan)
            return
        if self._graph is None or lr != self._graph_lr:
            self._capture(plan, lr)  # trains this iteration's batch while capturing it
            return
        for static, value in zip(self._static, plan):
            static.copy_(value)
        self._graph.replay()

    def _capture(self, plan, lr: float) -> None:
        """Warm up on a side stream (allocates optimizer state, picks cuDNN kernels), then capture.

        The warm-up and the capture both consume this iteration's batch: the warm-up steps are real
        updates, so we run exactly one of them (it trains this iteration) and capture without replaying.
        """
        dev = self.data.device
        self._set_lr(lr)
        self._graph = None
        self.optimizer.zero_grad(set_to_none=True)
        self._static = tuple(t.clone() for t in plan)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self._body(*self._static)  # the real update of this iteration
        torch.cuda.current_stream(dev).wait_stream(side)
        # Capturing records kernels without running them, so the model is not updated twice.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body(*self._static)
        self._graph, self._graph_lr = graph, lr

