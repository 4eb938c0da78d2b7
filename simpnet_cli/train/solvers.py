"""The authors' solvers: Caffe's learning-rate schedules, its per-parameter lr/decay multipliers, the optimizer,
and the arithmetic (fp32 or bf16 autocast) of the forward pass."""
from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from typing import Callable, Mapping

import torch

from simpnet_cli.config import schemas
from simpnet_cli.errors import UserError


def lr_at(solver: dict, iteration: int) -> float:
    """The learning rate Caffe uses at ``iteration``: multistep walks its step list in order (as Caffe does,
    even when the list is unsorted); piecewise reads {iteration: lr} points, and from ``poly.from_iter`` on
    follows Caffe's poly policy (a run the authors resumed with another lr_policy)."""
    sched = solver["schedule"]
    if sched["kind"] == "multistep":
        # Caffe's counter moves at most one step per iteration: the k-th step takes effect at
        # max(steps[k], iteration of the (k-1)-th + 1).
        n, last = 0, -1
        for step in sched["steps"]:
            last = max(step, last + 1)
            if iteration < last:
                break
            n += 1
        return solver["lr"] * sched["gamma"] ** n
    if sched["kind"] == "piecewise":
        poly = sched.get("poly")
        if poly is not None:
            try:
                start, base, power, max_iter = (int(poly["from_iter"]), float(poly["base_lr"]),
                                                float(poly["power"]), int(poly["max_iter"]))
            except (KeyError, TypeError, ValueError) as err:
                raise UserError(f"schedule.poly needs from_iter, base_lr, power and max_iter (numbers); "
                                f"got {poly!r} ({type(err).__name__}: {err})") from None
            if iteration >= start:
                # Caffe: base_lr * (1 - iter/max_iter)^power; Caffe stops at max_iter, so clamp past it at 0
                return base * max(0.0, 1.0 - iteration / max_iter) ** power
        lr = solver["lr"]
        for start, value in sorted((int(k), float(v)) for k, v in sched["points"].items()):
            if iteration >= start:
                lr = value
        return lr
    raise UserError(f"unknown schedule kind {sched['kind']!r} (multistep or piecewise)")


def _mults(part: Mapping) -> tuple[float, float]:
    """(lr_mult, decay_mult) of one ``{lr: .., decay: ..}`` entry; an absent key is 1, as in Caffe."""
    return float(part.get("lr", 1)), float(part.get("decay", 1))


def param_groups(model: torch.nn.Module, param_mults: Mapping | None) -> list[dict]:
    """Torch param groups carrying Caffe's lr_mult / decay_mult (``RunSpec.param_mults``).

    ``param_mults`` was checked when the run was composed (its keys and ranges by config/schemas.ParamMults, its
    conv indices and classifier against the network by nets/specs.check_recipe), so it is read here, not
    checked again. Parameters with equal multipliers share a group; groups come in the order their first
    parameter appears in ``model.parameters()``, so the optimizer state_dict (checkpoints) has a fixed layout.
    Everything not named in ``param_mults`` (conv weights, other conv biases, BatchNorm gamma/beta) is lr 1 /
    decay 1. Convs are found by their ``caffe_conv_index`` (1-based, network order) and the classifier by
    ``caffe_classifier``, both set by nets.modules.build_model."""
    mults = param_mults or {}
    own: dict[int, tuple[float, float]] = {}  # id(parameter) -> (lr_mult, decay_mult)
    classifier = mults.get("classifier") or {}
    for fc in (m for m in model.modules() if getattr(m, "caffe_classifier", False)):
        for name in ("weight", "bias"):
            if classifier.get(name) is not None and getattr(fc, name, None) is not None:
                own[id(getattr(fc, name))] = _mults(classifier[name])
    convs = mults.get("convs") or {}
    by_index = {m.caffe_conv_index: m for m in model.modules() if getattr(m, "caffe_conv_index", None) is not None}
    for i in convs.get("indices") or []:
        own[id(by_index[i].bias)] = _mults(convs["bias"])

    groups: dict[tuple[float, float], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(own.get(id(param), (1.0, 1.0)), []).append(param)
    return [{"params": params, "lr_mult": lr, "decay_mult": decay} for (lr, decay), params in groups.items()]


def _apply(params: list[torch.Tensor], updates: list[torch.Tensor], lr) -> None:
    """params -= lr * updates (Caffe's order: the scaled update, then the subtraction). A tensor lr is read by
    the kernel, never by the host: inside a CUDA graph it is read at every replay, so a schedule that changes it
    in place needs no new capture. A number takes the same two kernels, so an eager run and a graphed one
    round alike (``alpha=-lr`` would fuse them and round once). ``lr`` may also be one tensor per parameter, of
    its shape (``_rates``): each element at its own rate, by the same two multi-tensor kernels."""
    torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(params, updates)


def _rates(group: dict, params: list[torch.Tensor]):
    """The rate of ``params`` (a group's parameters that have a gradient): the group's lr (a number or a 0-dim
    tensor), or, where the group's lr is a list with one tensor per parameter of the group (a grouped step's
    runs, train/stacked_step.py), those of ``params``."""
    lr = group["lr"]
    if not isinstance(lr, (list, tuple)):
        return lr
    if len(params) == len(group["params"]):
        return list(lr)
    own = {id(p): rate for p, rate in zip(group["params"], lr)}
    return [own[id(p)] for p in params]


def _with_decay(group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A group's parameters that have a gradient, and their gradients plus the L2 decay (Caffe adds
    weight_decay * w to the gradient before either solver's update)."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    if params and group["weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    return params, grads


class Solver:
    """What torch.optim.Optimizer gives the two solvers below, and no more: param groups with their defaults,
    per-parameter state, ``zero_grad``, and ``state_dict``/``load_state_dict`` in torch's layout (parameters
    numbered in group order; on loading, state tensors go to their parameter's device and floating dtype), so
    checkpoints written when these subclassed torch's class load unchanged.

    Not torch's class: its methods are wrapped to turn TorchDynamo off, and the first call imports
    torch._dynamo, about 2 s of CPU in every process that trains (each packed worker, each cluster job, each
    test that runs the command), for a compiler simpnet does not use."""

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.state: defaultdict = defaultdict(dict)
        groups = list(params)
        if not groups:
            raise ValueError("a solver needs at least one parameter")
        if not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        self.param_groups: list[dict] = []
        for group in groups:
            params = group["params"]
            self.param_groups.append({**self.defaults, **group,
                                      "params": [params] if isinstance(params, torch.Tensor) else list(params)})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """torch's layout: ``{"state": {index: {...}}, "param_groups": [{..., "params": [index, ...]}]}``, the
        tensors themselves (not copies), as torch gives them."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [index[id(p)] for p in group["params"]]})
        return {"state": {index[id(p)]: st for p, st in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Each group's settings and each parameter's state from ``state_dict`` (torch's layout); the groups
        must hold as many parameters as the saved ones."""
        saved = copy.deepcopy(state_dict["param_groups"])
        if len(saved) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("loaded state dict does not match this optimizer's parameter groups")
        by_index = {i: p for s, g in zip(saved, self.param_groups) for i, p in zip(s["params"], g["params"])}
        self.state = defaultdict(dict)
        for i, st in state_dict["state"].items():
            param = by_index[i]
            self.state[param] = {key: value.to(dtype=param.dtype, device=param.device)
                                 if torch.is_tensor(value) and param.is_floating_point()
                                 else value.to(device=param.device) if torch.is_tensor(value) else value
                                 for key, value in st.items()}
        self.param_groups = [{**s, "params": g["params"]} for s, g in zip(saved, self.param_groups)]

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every group with gradients: Caffe's decay added to each gradient, then the solver's
        ``_update`` (its histories and the step scaled by the group's lr)."""
        for group in self.param_groups:
            params, grads = _with_decay(group)
            if params:
                self._update(group, params, grads, _rates(group, params))

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], lr) -> None:
        """Step ``params`` (with ``grads``, the decay included) at ``lr``: one rate, or one tensor each."""
        raise NotImplementedError


class AdaDelta(Solver):
    """Caffe's AdaDelta (rho = momentum, eps = delta): the decay added to the gradient, histories of the unscaled
    update, the step scaled by the group's lr. torch.optim.Adadelta's arithmetic, with the same state names (so
    its checkpoints load), written here because torch's reads a tensor lr with a host sync on every device but
    CUDA with capturable=True: the CPU proofs of the captured step would run other code than the GPU's graph."""

    def __init__(self, params, lr, rho: float, eps: float, weight_decay: float):
        super().__init__(params, {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay})

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], lr) -> None:
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["acc_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        square, acc = [st["square_avg"] for st in states], [st["acc_delta"] for st in states]
        rho, eps = group["rho"], group["eps"]
        torch._foreach_mul_(square, rho)
        torch._foreach_addcmul_(square, grads, grads, value=1 - rho)
        std = torch._foreach_add(square, eps)
        torch._foreach_sqrt_(std)
        delta = torch._foreach_add(acc, eps)
        torch._foreach_sqrt_(delta)
        torch._foreach_div_(delta, std)
        torch._foreach_mul_(delta, grads)
        torch._foreach_mul_(acc, rho)
        torch._foreach_addcmul_(acc, delta, delta, value=1 - rho)
        _apply(params, delta, lr)


class Nesterov(Solver):
    """Nesterov momentum as torch.optim.SGD(nesterov=True, dampening=0) computes it (state ``momentum_buffer``,
    so its checkpoints load): v = momentum * v + g, p -= lr * (g + momentum * v), with g the gradient plus the
    decay. torch's SGD reads a tensor lr with a host sync, which a captured step cannot hold."""

    def __init__(self, params, lr, momentum: float, weight_decay: float):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], lr) -> None:
        momentum, states = group["momentum"], [self.state[p] for p in params]
        # v = momentum * v + g for every buffer at once: two multi-tensor kernels, not two per parameter
        held = [(st["momentum_buffer"], g) for st, g in zip(states, grads) if st.get("momentum_buffer") is not None]
        if held:
            bufs, with_grads = map(list, zip(*held))
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, with_grads)
        for st, g in zip(states, grads):
            if st.get("momentum_buffer") is None:  # the first step: v = g (torch's SGD)
                st["momentum_buffer"] = g.clone()
        bufs = [st["momentum_buffer"] for st in states]
        _apply(params, torch._foreach_add(grads, bufs, alpha=momentum), lr)


# The optimizer of each solver ``type`` (conf/solver/*.yaml), timm's registry pattern: a new solver is its
# factory here, its schema in config/schemas.SOLVERS (the keys its YAML may hold) and a YAML file; a test keeps
# the two registries equal.
OPTIMIZERS: dict[str, Callable[[list[dict], Mapping], Solver]] = {}


def register(kind: str):
    """``@register("adadelta")``: ``make(groups, solver)`` builds the optimizer for solver configs of that type."""
    def add(make):
        OPTIMIZERS[kind] = make
        return make
    return add


@register("adadelta")
def _adadelta(groups: list[dict], solver: Mapping) -> Solver:
    return AdaDelta(groups, lr=solver["lr"], rho=solver["rho"], eps=solver["eps"], weight_decay=solver["weight_decay"])


@register("nesterov")
def _nesterov(groups: list[dict], solver: Mapping) -> Solver:
    return Nesterov(groups, lr=solver["lr"], momentum=solver["momentum"], weight_decay=solver["weight_decay"])


def make_optimizer(solver: dict, groups_or_params) -> Solver:
    """The run's solver over ``param_groups(...)`` (or plain parameters: one group at lr 1 / decay 1). Each
    group's lr is solver lr * lr_mult and its weight_decay solver weight_decay * decay_mult, as Caffe's
    local_rate and local_decay; ``captured_step.Step`` keeps lr_mult when the schedule changes the rate. Neither
    solver keeps a step count or reads its lr on the host, so the same optimizer runs eagerly or captured."""
    groups = list(groups_or_params)
    if not all(isinstance(g, Mapping) for g in groups):
        groups = [{"params": groups}]
    lr, decay = solver["lr"], solver["weight_decay"]
    groups = [{**g, "lr_mult": g.get("lr_mult", 1.0), "decay_mult": g.get("decay_mult", 1.0),
               "lr": lr * g.get("lr_mult", 1.0), "weight_decay": decay * g.get("decay_mult", 1.0)}
              for g in groups]
    make = OPTIMIZERS.get(solver["type"])
    if make is None:
        raise UserError(f"unknown solver type {solver['type']!r} ({' or '.join(sorted(OPTIMIZERS))})")
    return make(groups, solver)


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for the forward pass: fp32 (none), or bf16 autocast (mixed precision).

    fp16 is refused (schemas.check_precision): it needs loss scaling, whose overflow check (``found_inf.item()``)
    is a host sync that cannot live inside a captured CUDA graph; bf16 has fp32's exponent range and needs none."""
    schemas.check_precision("precision", precision)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    # No cast cache: a cached bf16 copy of a weight must not outlive one step inside a captured CUDA graph.
    return (lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)) if dtype \
        else contextlib.nullcontext


class CastOnce:
    """The model's forward pass, under bf16 autocast on low-precision copies of the weights autocast casts (the
    conv and linear weights and biases): one multi-tensor copy per step makes them all, where autocast alone
    casts each weight at each use (its cast cache is off, see autocast_for), and one more copies their
    gradients back into the parameters' own. The arithmetic is autocast's: the forward reads the same rounded
    weights, and a weight's low-precision gradient is rounded back to its dtype as autocast's cast would
    (a weight used twice in one step would have its two gradients summed in bf16 first; no network here has one).

    Outside autocast (fp32) it is the model itself. ``gradients_back()`` after the backward pass."""

    KINDS = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names = [f"{name}.{key}" if name else key for name, module in model.named_modules()
                      if isinstance(module, self.KINDS)
                      for key, p in module.named_parameters(recurse=False) if p.requires_grad]
        self.copies: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if not self.names or not torch.is_autocast_enabled(kind):
            self.copies = []
            return self.model(x)
        own = dict(self.model.named_parameters())
        params = [own[name] for name in self.names]
        dtype = torch.get_autocast_dtype(kind)
        if [(c.dtype, c.shape, c.device) for c in self.copies] != [(dtype, p.shape, p.device) for p in params]:
            self.copies = [torch.empty_like(p, dtype=dtype).requires_grad_() for p in params]
            self.grads = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self.copies, params)
        for copy_ in self.copies:
            copy_.grad = None
        return torch.func.functional_call(self.model, dict(zip(self.names, self.copies)), (x,))

    def gradients_back(self) -> None:
        """Each copied weight's gradient into its parameter's ``.grad`` (in the parameter's dtype)."""
        if not self.copies:
            return
        own = dict(self.model.named_parameters())
        held = [(own[name], grad, c.grad) for name, grad, c in zip(self.names, self.grads, self.copies)
                if c.grad is not None]
        if not held:
            return
        params, grads, low = map(list, zip(*held))
        torch._foreach_copy_(grads, low)
        for p, grad in zip(params, grads):
            p.grad = grad
        for copy_ in self.copies:
            copy_.grad = None


def effective_precision(precision: str, device: torch.device) -> str:
    """What the arithmetic really is: "fp32" convolutions on an NVIDIA GPU run as TF32 unless turned off."""
    if precision != "fp32" or device.type != "cuda":
        return precision
    tf32 = [name for name, on in (("convolutions", torch.backends.cudnn.allow_tf32),
                                  ("matmuls", torch.backends.cuda.matmul.allow_tf32)) if on]
    return f"fp32 (TF32 {' and '.join(tf32)})" if tf32 else "fp32"
