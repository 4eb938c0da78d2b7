"""Training steps that train k runs at once (issue 20): grouped (one stacked network) or branched (k networks).

On a GPU the step of the small networks is bound by kernel latency, not arithmetic; training k runs of the
same shapes in one step makes each launch do k times the work. Two exact ways:

* ``GroupedStep``: one ``nets.stacked.StackedNet`` holding the k models, its input the k runs' own batches
  concatenated along channels, its loss the sum of the k losses, one optimizer over the stacked parameters
  (elementwise solvers: each model gets exactly its own update);
* ``BranchedStep``: the k ordinary models and optimizers, each run's body one branch of the step (in a
  captured graph, each on its own stream), so one replay launches all of them with no grouped kernels.

Both are ``captured_step.Step``s: the capture and fall-back logic (with its snapshot and restore of a failed
warm-up) is that class's. As there, a run is captured once and a rate change is a fill of device tensors the
graph reads, never a re-capture: grouped, each run's rate fills its block of every parameter's rate tensor
(``GroupedStep.rates``); branched, each branch is a ``captured_step.Step`` whose groups read their own lr tensors.
Each run reads its own figures through a ``Member`` (its loss sum, non-finite flag and update count are one
entry of the step's per-model vectors). Each run's dropout draws from its own generator, holding exactly the
state a lone run's global RNG would have, so on the CPU a run's masks are those it draws when trained alone.

The runs' ordinary models and optimizers stay the record (checkpoints, evaluation, model.pt): ``take_over``
moves their state into the step after a resume, ``hand_back`` moves it out before they are read.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from simpnet_cli.nets import stacked as S
from simpnet_cli.train import captured_step
from simpnet_cli.train.solvers import Solver
from simpnet_cli.train import data as D


class Member:
    """One run's view of a shared step: what ``TrainState.step`` gives the loop and the callbacks."""

    def __init__(self, shared: "SharedStep", i: int):
        self.shared, self.i = shared, i
        self.loss_sum, self.bad, self.updates = shared.loss_sum[i], shared.bad[i], shared.updates[i]

    @property
    def step_mode(self) -> str:  # read late: a failed capture changes the shared step's mode
        return f"{self.shared.step_mode}, stacked {self.shared.k} ({self.shared.how})"

    def reset_loss(self) -> None:
        self.loss_sum.zero_()


class Batches:
    """The k runs' batch plans as one flat tuple (what ``captured_step.Step`` copies into a graph's inputs)."""

    def __init__(self, datas: Sequence[D.DeviceData]):
        self.datas = list(datas)

    @property
    def device(self) -> torch.device:
        return self.datas[0].device

    def batch_plan(self, iteration: int) -> tuple:
        return tuple(t for data in self.datas for t in data.batch_plan(iteration))

    def split(self, plan: Sequence) -> list[tuple]:
        return [tuple(plan[3 * i:3 * i + 3]) for i in range(len(self.datas))]


def generator_now(device: torch.device) -> torch.Generator:
    """A generator holding the state the global RNG has now: where a lone run's dropout would draw from."""
    g = torch.Generator(device=device)
    g.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    return g


def generator_to_global(g: torch.Generator, device: torch.device) -> None:
    """Put a run's generator state into the global RNG (where ``checkpoint.rng_state`` reads it)."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(g.get_state(), device)
    else:
        torch.set_rng_state(g.get_state())


class SharedStep(captured_step.Step):
    """A ``captured_step.Step`` for k runs: ``step(iteration, lrs)`` with one rate per run; per-model
    ``loss_sum``, ``bad`` and ``updates`` vectors; ``members[i]`` is run i's view."""
    how = ""

    def __init__(self, model, optimizer, datas: Sequence[D.DeviceData], autocast, graphs: bool,
                 generators: Sequence[torch.Generator], backend: captured_step.GraphBackend | None = None):
        batches = Batches(datas)
        super().__init__(model, optimizer, batches, autocast, graphs, backend=backend)
        self.k, self.batches, self.generators = len(datas), batches, list(generators)
        dev = batches.device
        self.loss_sum = torch.zeros(self.k, device=dev)
        self.bad = torch.zeros(self.k, dtype=torch.bool, device=dev)
        self.updates = torch.zeros(self.k, dtype=torch.int64, device=dev)
        self.members = [Member(self, i) for i in range(self.k)]
        self.lrs: list[float] = []  # of the last step, one per run

    def _count(self, losses: torch.Tensor) -> None:
        losses = losses.detach()
        self.loss_sum.add_(losses)
        self.bad.logical_or_(captured_step.not_finite(losses))
        self.updates.add_(1)

    def _snapshot(self) -> dict:
        saved = super()._snapshot()
        saved["generators"] = [g.get_state() for g in self.generators]  # the runs' dropout draws from them
        return saved

    def _restore(self, saved: dict) -> None:
        super()._restore(saved)
        for g, state in zip(self.generators, saved["generators"]):
            g.set_state(state)

    def take_over(self, models: Sequence[torch.nn.Module], optimizers: Sequence[Solver]) -> None:
        raise NotImplementedError

    def hand_back(self, i: int, model: torch.nn.Module, optimizer: Solver) -> None:
        raise NotImplementedError


# What the captured-step logic sees as the grouped step's rate: it never changes (each group's lr is its
# parameters' rate tensors); the runs' rates are in those tensors on the device, which the graph reads.
RATES_ON_DEVICE = "rates on the device"


class GroupedStep(SharedStep):
    """The k runs as one ``StackedNet`` with one optimizer (its param groups carry the runs' multipliers).

    Every parameter has a rate tensor of its own shape: its block of run i (the parameter's first dimension
    holds the k blocks) holds run i's rate times the group's lr_mult. Each group's lr is its parameters' rate
    tensors, so the solver scales each element's update by its own run's rate and subtracts it
    (solvers._apply): run i's own arithmetic, element for element, in the solver's two multi-tensor kernels.
    The rate tensors are filled in place when a run's rate changes, so a graph reads them at every replay."""
    how = "grouped"

    def __init__(self, net: S.StackedNet, optimizer, datas, autocast, graphs, generators, backend=None):
        super().__init__(net, optimizer, datas, autocast, graphs, generators, backend)
        net.use_generators(self.generators)
        self.rates = [[torch.zeros_like(p) for p in group["params"]] for group in optimizer.param_groups]

    def __call__(self, iteration: int, lrs) -> None:
        lrs = list(lrs)
        if lrs != self.lrs:  # no fill for unchanged rates (most steps), as captured_step.Step's _set_lr
            self._fill_rates(lrs)
            self.lrs = lrs
        super().__call__(iteration, RATES_ON_DEVICE)

    @torch.no_grad()
    def _fill_rates(self, lrs: list[float]) -> None:
        """Run i's block of every parameter at lrs[i] * its group's lr_mult: the product of two numbers rounded
        to the parameter's dtype once, as a lone run's step rounds its rate (captured_step.Step._set_lr)."""
        for group, rates in zip(self.optimizer.param_groups, self.rates):
            mult = group.get("lr_mult", 1)
            per_run = torch.tensor([lr * mult for lr in lrs], dtype=rates[0].dtype).to(rates[0].device)
            for rate in rates:
                rows = per_run.repeat_interleave(rate.shape[0] // self.k)
                rate.copy_(rows.view(-1, *[1] * (rate.dim() - 1)).expand_as(rate))

    def _set_lr(self, lr) -> None:
        """Each group's lr: its parameters' rate tensors (``lr`` is always RATES_ON_DEVICE). Set on every call,
        since a checkpoint's load_state_dict (or a restore after a failed warm-up) replaces the groups' entries."""
        for group, rates in zip(self.optimizer.param_groups, self.rates):
            group["lr"] = rates
        self._lr = lr

    def _body(self, *plan) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        plans = self.batches.split(plan)
        x = torch.cat([data.images(*p) for data, p in zip(self.batches.datas, plans)], 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.model(x).float()  # k, B, classes
        losses = torch.stack([F.cross_entropy(logits[i], data.train_y[p[0]])
                              for i, (data, p) in enumerate(zip(self.batches.datas, plans))])
        losses.sum().backward()  # disjoint parameters: each model's gradient is that of its own loss
        self.optimizer.step()  # each block at its run's rate (the groups' rate tensors)
        self._count(losses)

    def take_over(self, models, optimizers) -> None:
        S.stack_weights(self.model, [m.state_dict() for m in models])
        stack_optimizer_state(self.model, self.optimizer, models, optimizers)

    def hand_back(self, i, model, optimizer) -> None:
        model.load_state_dict(S.unstack_weights(self.model, i))
        unstack_optimizer_state(self.model, self.optimizer, i, model, optimizer)
        if self.lrs:  # the run's groups at the rate of the last step, as its own step would have left them
            for group in optimizer.param_groups:
                group["lr"] = self.lrs[i] * group.get("lr_mult", 1)


class BranchedStep(SharedStep):
    """The k runs' own models and optimizers, each run's body a branch of the step. In a captured graph each
    branch runs on its own stream, forked from and joined to the capture stream, so one replay launches all."""
    how = "branched"

    def __init__(self, models, optimizers, datas, autocast, graphs, generators, backend=None):
        super().__init__(None, None, datas, autocast, graphs, generators, backend)
        # Each branch a Step that is never captured itself (only its _body and _set_lr are used) but, where this
        # step captures, keeps its groups' rates in device tensors: the graph reads them, so a run's rate change
        # is a fill (a number would be baked into the graph at capture, and no re-capture comes).
        self.branches = [captured_step.Step(m, o, d, autocast, self.graphs, backend=backend)
                         for m, o, d in zip(models, optimizers, datas)]
        for branch, member in zip(self.branches, self.members):  # each branch counts into its run's entries
            branch.loss_sum, branch.bad, branch.updates = member.loss_sum, member.bad, member.updates
        self._branch_streams = None

    def _set_lr(self, lrs) -> None:
        lrs = list(lrs)
        if self.graphs and self._graph is not None and lrs == self._lr:
            return  # the branches' tensors already hold them: no kernel launch for unchanged rates
        for branch, lr in zip(self.branches, lrs):
            branch._set_lr(lr)
        self._lr = lrs

    def _snapshot(self) -> dict:
        """Each branch's model, optimizer, counters and RNGs (captured_step.Step's snapshot), and the runs'
        dropout generators: this step has no model or optimizer of its own."""
        return {"branches": [b._snapshot() for b in self.branches],
                "generators": [g.get_state() for g in self.generators]}

    def _restore(self, saved: dict) -> None:
        for branch, own in zip(self.branches, saved["branches"]):
            branch._restore(own)
        for g, state in zip(self.generators, saved["generators"]):
            g.set_state(state)
        self._lr = None

    def _branch(self, i: int, plan) -> None:
        dev = self.batches.device
        if dev.type == "cpu" or not self.graphs:
            # run i's dropout draws from its own state, swapped into the global RNG around its branch; a
            # captured CUDA graph cannot swap RNG states, so there the branches draw independent masks from
            # the device's generator instead (not those of lone runs)
            generator_to_global(self.generators[i], dev)
            self.branches[i]._body(*plan)
            self.generators[i].set_state(generator_now(dev).get_state())
        else:
            self.branches[i]._body(*plan)

    def _body(self, *plan) -> None:
        plans = self.batches.split(plan)
        if not self.graphs:
            for i, p in enumerate(plans):
                self._branch(i, p)
            return
        dev, api = self.batches.device, self.backend
        if self._branch_streams is None:
            self._branch_streams = [api.new_stream(dev) for _ in plans]
        origin = api.current_stream(dev)
        for i, (stream, p) in enumerate(zip(self._branch_streams, plans)):
            stream.wait_stream(origin)
            with api.stream_scope(stream):
                self._branch(i, p)
        for stream in self._branch_streams:
            origin.wait_stream(stream)

    def take_over(self, models, optimizers) -> None:
        pass  # the branches train the runs' own models and optimizers

    def hand_back(self, i, model, optimizer) -> None:
        pass


# --------------------------------------------------------------------------- optimizer state

def _per_element(value, param: torch.Tensor) -> bool:
    """A state entry with one value per parameter element (AdaDelta's averages, a momentum buffer), as opposed
    to a count shared by all (AdaDelta's step)."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape


@torch.no_grad()
def stack_optimizer_state(net: S.StackedNet, optimizer: Solver,
                          models: Sequence[torch.nn.Module], optimizers: Sequence[Solver]) -> None:
    """Set the stacked optimizer's state from the k ordinary ones' (ghost entries 0). Either every model has
    state (a resumed run) or none (iteration 0: the solver makes it at its first step)."""
    owned = [dict(m.named_parameters()) for m in models]
    for name, param in net.named_parameters():
        slot = net.slots[name]
        states = [opt.state.get(own[name], {}) for opt, own in zip(optimizers, owned)]
        if not any(states):
            optimizer.state.pop(param, None)
            continue
        if not all(states):
            raise ValueError(f"some stacked models have solver state for {name} and some have none")
        merged = {}
        for key, first in states[0].items():
            if _per_element(first, owned[0][name]):
                merged[key] = torch.zeros_like(param)
                for i, state in enumerate(states):
                    merged[key][slot.at(i)] = state[key]
            else:
                if any(not _same(state[key], first) for state in states):
                    raise ValueError(f"solver state {key} of {name} differs between the stacked models")
                merged[key] = first.clone() if torch.is_tensor(first) else first
        optimizer.state[param] = merged


@torch.no_grad()
def unstack_optimizer_state(net: S.StackedNet, optimizer: Solver, i: int,
                            model: torch.nn.Module, ordinary: Solver) -> None:
    """Set model i's ordinary optimizer's state from the stacked one's."""
    owned = dict(model.named_parameters())
    for name, param in net.named_parameters():
        state = optimizer.state.get(param)
        if not state:
            ordinary.state.pop(owned[name], None)
            continue
        slot = net.slots[name]
        ordinary.state[owned[name]] = {
            key: (value[slot.at(i)].clone() if _per_element(value, param) else
                  value.clone() if torch.is_tensor(value) else value)
            for key, value in state.items()}


def _same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def shared_step(how: str, models: Sequence[torch.nn.Module], optimizers: Sequence[Solver],
                datas: Sequence[D.DeviceData], autocast: Callable[[], contextlib.AbstractContextManager],
                graphs: bool, generators: Sequence[torch.Generator],
                make_optimizer: Callable[[torch.nn.Module], Solver] | None = None,
                net: S.StackedNet | None = None, backend: captured_step.GraphBackend | None = None) -> SharedStep:
    """The step of ``how`` ("grouped" or "branched") over the k runs' models, optimizers and data, holding
    their current state. Grouped needs the stacked network and ``make_optimizer`` (the runs' solver over it)."""
    if how == "branched":
        return BranchedStep(models, optimizers, datas, autocast, graphs, generators, backend)
    if how != "grouped":
        raise ValueError(f"a shared step is grouped or branched, not {how!r}")
    step = GroupedStep(net, make_optimizer(net), datas, autocast, graphs, generators, backend)
    step.take_over(models, optimizers)
    return step
