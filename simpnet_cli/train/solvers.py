"""The authors' solvers: Caffe's learning-rate schedules, its per-parameter lr/decay multipliers, the optimizer,
and the arithmetic (fp32 or bf16 autocast) of the forward pass."""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch

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


def _mults(part, where: str) -> tuple[float, float]:
    """(lr_mult, decay_mult) of one ``{lr: .., decay: ..}`` entry; an absent key is 1, as in Caffe."""
    if not isinstance(part, Mapping) or set(part) - {"lr", "decay"}:
        raise UserError(f"param_mults.{where} must be {{lr: <number>, decay: <number>}}, got {part!r}")
    out = []
    for key in ("lr", "decay"):
        value = part.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise UserError(f"param_mults.{where}.{key} must be a number >= 0, got {value!r}")
        out.append(float(value))
    return out[0], out[1]


def param_groups(model: torch.nn.Module, param_mults: Mapping | None) -> list[dict]:
    """Torch param groups carrying Caffe's lr_mult / decay_mult (``run.net["param_mults"]``).

    Parameters with equal multipliers share a group; groups come in the order their first parameter appears
    in ``model.parameters()``, so the optimizer state_dict (checkpoints) has a fixed layout. Everything not
    named in ``param_mults`` (conv weights, other conv biases, BatchNorm gamma/beta) is lr 1 / decay 1. Convs
    are found by their ``caffe_conv_index`` (1-based, network order) and the classifier by
    ``caffe_classifier``, both set by nets.modules.build_model."""
    mults = param_mults or {}
    if not isinstance(mults, Mapping) or set(mults) - {"classifier", "convs"}:
        raise UserError(f"param_mults takes the keys classifier and convs, got {param_mults!r}")
    own: dict[int, tuple[float, float]] = {}  # id(parameter) -> (lr_mult, decay_mult)

    classifier = mults.get("classifier")
    if classifier is not None:
        if not isinstance(classifier, Mapping) or set(classifier) - {"weight", "bias"}:
            raise UserError(f"param_mults.classifier takes the keys weight and bias, got {classifier!r}")
        fcs = [m for m in model.modules() if getattr(m, "caffe_classifier", False)]
        if not fcs:
            raise UserError("param_mults.classifier is given but this network has no fc classifier "
                            "(write classifier: null)")
        for fc in fcs:
            for name in ("weight", "bias"):
                param = getattr(fc, name, None)
                if classifier.get(name) is not None and param is not None:
                    own[id(param)] = _mults(classifier[name], f"classifier.{name}")

    convs = mults.get("convs") or {}
    if not isinstance(convs, Mapping) or set(convs) - {"indices", "bias"}:
        raise UserError(f"param_mults.convs takes the keys indices and bias, got {convs!r}")
    indices = list(convs.get("indices") or [])
    if indices:
        if convs.get("bias") is None:
            raise UserError(f"param_mults.convs.bias is null but convs {indices} are listed")
        bias = _mults(convs["bias"], "convs.bias")
        by_index = {m.caffe_conv_index: m for m in model.modules()
                    if getattr(m, "caffe_conv_index", None) is not None}
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i not in by_index]
        if bad:
            raise UserError(f"param_mults.convs.indices {bad} name no conv of this network "
                            f"(it has convs 1-{len(by_index)}, numbered from 1 in network order)")
        for i in indices:
            if by_index[i].bias is None:
                raise UserError(f"param_mults.convs.indices: conv {i} has no bias")
            own[id(by_index[i].bias)] = bias

    groups: dict[tuple[float, float], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(own.get(id(param), (1.0, 1.0)), []).append(param)
    return [{"params": params, "lr_mult": lr, "decay_mult": decay} for (lr, decay), params in groups.items()]


def _apply(params: list[torch.Tensor], updates: list[torch.Tensor], lr) -> None:
    """params -= lr * updates (Caffe's order: the scaled update, then the subtraction). A tensor lr is read by
    the kernel, never by the host: inside a CUDA graph it is read at every replay, so a schedule that changes it
    in place needs no new capture. A number takes the same two kernels, so an eager run and a graphed one
    round alike (``alpha=-lr`` would fuse them and round once)."""
    torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(params, updates)


def _with_decay(group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A group's parameters that have a gradient, and their gradients plus the L2 decay (Caffe adds
    weight_decay * w to the gradient before either solver's update)."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    if params and group["weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    return params, grads


class AdaDelta(torch.optim.Optimizer):
    """Caffe's AdaDelta (rho = momentum, eps = delta): the decay added to the gradient, histories of the unscaled
    update, the step scaled by the group's lr. torch.optim.Adadelta's arithmetic, with the same state names (so
    its checkpoints load), written here because torch's reads a tensor lr with a host sync on every device but
    CUDA with capturable=True: the CPU proofs of the captured step would run other code than the GPU's graph."""

    def __init__(self, params, lr, rho: float, eps: float, weight_decay: float):
        super().__init__(params, {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads = _with_decay(group)
            if not params:
                continue
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
            _apply(params, delta, group["lr"])


class Nesterov(torch.optim.Optimizer):
    """Nesterov momentum as torch.optim.SGD(nesterov=True, dampening=0) computes it (state ``momentum_buffer``,
    so its checkpoints load): v = momentum * v + g, p -= lr * (g + momentum * v), with g the gradient plus the
    decay. torch's SGD reads a tensor lr with a host sync, which a captured step cannot hold."""

    def __init__(self, params, lr, momentum: float, weight_decay: float):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads = _with_decay(group)
            if not params:
                continue
            momentum, bufs = group["momentum"], []
            for p, g in zip(params, grads):
                st = self.state[p]
                if st.get("momentum_buffer") is None:  # the first step: v = g (torch's SGD)
                    st["momentum_buffer"] = g.clone()
                else:
                    st["momentum_buffer"].mul_(momentum).add_(g)
                bufs.append(st["momentum_buffer"])
            _apply(params, torch._foreach_add(grads, bufs, alpha=momentum), group["lr"])


def make_optimizer(solver: dict, groups_or_params) -> torch.optim.Optimizer:
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
    kind = solver["type"]
    if kind == "adadelta":
        return AdaDelta(groups, lr=lr, rho=solver["rho"], eps=solver["eps"], weight_decay=decay)
    if kind == "nesterov":
        return Nesterov(groups, lr=lr, momentum=solver["momentum"], weight_decay=decay)
    raise UserError(f"unknown solver type {kind!r} (adadelta or nesterov)")


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for the forward pass: fp32 (none), or bf16 autocast (mixed precision).

    fp16 is refused: it needs loss scaling, whose overflow check (``found_inf.item()``) is a host sync that
    cannot live inside a captured CUDA graph; bf16 has fp32's exponent range and needs none."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    if precision == "fp16":
        raise UserError("precision=fp16 is not supported (it needs loss scaling, which cannot run inside a CUDA "
                        "graph); use precision=bf16 for mixed precision")
    if precision not in dtypes:
        raise UserError(f"precision must be one of {', '.join(dtypes)}, got {precision!r}")
    dtype = dtypes[precision]
    # No cast cache: a cached bf16 copy of a weight must not outlive one step inside a captured CUDA graph.
    return (lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)) if dtype \
        else contextlib.nullcontext


def effective_precision(precision: str, device: torch.device) -> str:
    """What the arithmetic really is: "fp32" convolutions on an NVIDIA GPU run as TF32 unless turned off."""
    if precision != "fp32" or device.type != "cuda":
        return precision
    tf32 = [name for name, on in (("convolutions", torch.backends.cudnn.allow_tf32),
                                  ("matmuls", torch.backends.cuda.matmul.allow_tf32)) if on]
    return f"fp32 (TF32 {' and '.join(tf32)})" if tf32 else "fp32"
