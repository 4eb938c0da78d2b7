"""The training step: one function of the iteration that cuts, augments, forwards, backwards and updates.

On the CPU it runs eagerly. On a GPU the batch-100 step of these small networks is bound by kernel-launch
overhead, not arithmetic, so the whole step (gather + crop + flip + normalise, forward, loss, backward,
optimizer update, loss bookkeeping) is captured once into a CUDA graph and replayed: per iteration, three
small copies of the batch plan into the graph's inputs and one replay. The learning rate enters the captured
optimizer kernels as a constant, so the graph is captured again whenever the schedule changes the rate (a
handful of times per run), into the same memory pool.

Capture follows PyTorch's whole-network recipe, with what a multi-GPU, multi-version world needs: one capture
stream per run, made on the run's device inside ``torch.cuda.device(dev)``, used for the warm-up and the
capture alike (so per-stream library workspaces are allocated before capture, outside the graph's pool). If
capture fails, the run goes on eagerly from the same iteration and says so in its ``step_mode``.

Every CUDA call the capture makes goes through a ``GraphBackend``, so the CPU tests run this exact control
flow with stand-ins (tests/test_gpu_path.py). ``updates`` counts the updates the step really applied; the
training loop compares it with the iteration at every evaluation, which catches an empty graph (replays that
do nothing) or a double-applied one before a wrong figure is recorded.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from simpnet_cli.train import data as D

# A capturable optimizer warns on every step taken outside capture (the one warm-up step per capture, and
# every step after a fallback); the message is expected here and would only flood the log.
CAPTURABLE_WARNING = r".*capturable=True.*"


@dataclass(frozen=True)
class GraphBackend:
    """The device calls of a capture. ``capture(graph, body, stream, pool)`` records ``body`` into ``graph``."""
    new_graph: Callable[[], Any]
    new_stream: Callable[[torch.device], Any]
    device_scope: Callable[[torch.device], contextlib.AbstractContextManager]
    stream_scope: Callable[[Any], contextlib.AbstractContextManager]
    current_stream: Callable[[torch.device], Any]
    capture: Callable[[Any, Callable[[], None], Any, Any], None]


def _cuda_capture(graph, body, stream, pool) -> None:
    with torch.cuda.graph(graph, stream=stream, pool=pool):
        body()


CUDA = GraphBackend(
    new_graph=lambda: torch.cuda.CUDAGraph(),
    new_stream=lambda dev: torch.cuda.Stream(device=dev),
    device_scope=lambda dev: torch.cuda.device(dev),
    stream_scope=lambda stream: torch.cuda.stream(stream),
    current_stream=lambda dev: torch.cuda.current_stream(dev),
    capture=_cuda_capture,
)


class Step:
    """``step(iteration, lr)`` trains one batch. ``loss_sum``, ``bad`` (a non-finite loss was seen) and
    ``updates`` accumulate on the device, so nothing waits for the GPU until the caller reads them."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: D.DeviceData,
                 autocast: Callable[[], contextlib.AbstractContextManager], graphs: bool,
                 channels_last: bool = True, backend: GraphBackend | None = None, updates: int = 0):
        self.model, self.optimizer, self.data, self.autocast = model, optimizer, data, autocast
        dev = data.device
        self.loss_sum = torch.zeros((), device=dev)
        self.bad = torch.zeros((), dtype=torch.bool, device=dev)
        self.updates = torch.full((), updates, dtype=torch.int64, device=dev)
        self.channels_last = channels_last and dev.type == "cuda"
        # A backend given explicitly (a test's stand-in) captures on any device; the real one needs CUDA.
        self.backend = backend or CUDA
        self.graphs = graphs and (backend is not None or dev.type == "cuda")
        self.step_mode = "cuda-graph" if self.graphs else "eager"
        self._graph, self._graph_lr, self._static, self._stream, self._pool = None, None, None, None, None
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
            loss = F.cross_entropy(self.model(x).float(), self.data.train_y[idx])
        loss.backward()
        self.optimizer.step()
        loss = loss.detach()
        self.loss_sum.add_(loss)
        self.bad.logical_or_(~torch.isfinite(loss))
        self.updates.add_(1)

    def _set_lr(self, lr: float) -> None:
        # Caffe's lr_mult scales the schedule's rate per group (train.param_groups); a captured graph bakes
        # each group's rate in, so a re-capture at an lr change keeps the multipliers.
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1)

    def __call__(self, iteration: int, lr: float) -> None:
        plan = self.data.batch_plan(iteration)
        if not self.graphs:
            self._eager(plan, lr)
            return
        if self._graph is None or lr != self._graph_lr:
            self._capture_or_fall_back(plan, lr)  # trains this iteration's batch either way
            return
        for static, value in zip(self._static, plan):
            static.copy_(value)
        self._graph.replay()

    def _capture_or_fall_back(self, plan, lr: float) -> None:
        try:
            self._capture(plan, lr)
        except Exception as err:  # noqa: BLE001 - any failure of a driver, a library or torch itself
            reason = " ".join(str(err).split())[:120] or type(err).__name__
            self.graphs, self._graph = False, None
            self.step_mode = f"eager (capture failed: {type(err).__name__}: {reason})"
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {reason}); this run continues "
                          f"eagerly from the same iteration", RuntimeWarning, stacklevel=2)
            if not self._warmed_up:  # the failure came before the warm-up's update: train this iteration now
                self._eager(plan, lr)

    def _eager(self, plan, lr: float) -> None:
        self._set_lr(lr)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CAPTURABLE_WARNING)
            self._body(*plan)

    def _capture(self, plan, lr: float) -> None:
        """Warm up on the run's own capture stream (the real update of this iteration: it allocates optimizer
        state and picks cuDNN kernels), then capture the same body on that stream without running it."""
        dev, api = self.data.device, self.backend
        self._warmed_up = False
        self._set_lr(lr)
        self._graph = None  # the previous graph's memory goes back to the shared pool before the new capture
        self._static = tuple(t.clone() for t in plan)
        with api.device_scope(dev):
            if self._stream is None:
                self._stream = api.new_stream(dev)
            self._stream.wait_stream(api.current_stream(dev))
            with api.stream_scope(self._stream), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=CAPTURABLE_WARNING)
                self._body(*self._static)
                self._warmed_up = True
                graph = api.new_graph()
                api.capture(graph, lambda: self._body(*self._static), self._stream, self._pool)
            api.current_stream(dev).wait_stream(self._stream)
        if self._pool is None and hasattr(graph, "pool"):
            self._pool = graph.pool()  # re-captures share one pool, so memory stays flat across lr changes
        self._graph, self._graph_lr = graph, lr
