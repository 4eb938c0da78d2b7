"""PyTorch modules from a network spec (nets/specs.py), initialised and normalised as the authors' Caffe nets.

Each spec record maps to one small module builder, registered by record type. A ``Recipe`` (the run's
``net.bn_fraction`` and ``net.init``) says how: Caffe's "xavier" filler is uniform(+-sqrt(3/fan_in)), "msra" is
normal(0, sqrt(2/fan_in)), the convs listed in ``init.on_convs`` are drawn from normal(0, gaussian_std) instead,
and every bias starts at 0. BatchNorm keeps Caffe's moving-average fraction (PyTorch momentum = 1 - fraction) and
eps 1e-5, with a learned scale and shift. Every conv module is tagged with its 1-based index in the network
(``caffe_conv_index``) and the classifier with ``caffe_classifier``, so the optimizer can give them Caffe's
per-parameter multipliers (solvers.param_groups).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from simpnet_cli.nets import specs as N
from simpnet_cli.errors import UserError

MODULES: dict[type, Callable] = {}

DEFAULT_BN_FRACTION, DEFAULT_INIT = N.DEFAULT_BN_FRACTION, N.DEFAULT_INIT


def module_for(kind: type):
    def register(fn):
        MODULES[kind] = fn
        return fn
    return register


@dataclass
class Recipe:
    """How the modules are made: BatchNorm's moving-average fraction and the weight fillers. ``next_conv``
    numbers the convs in spec order as they are built (the reference's numbering)."""
    bn_fraction: float | None = DEFAULT_BN_FRACTION
    init: dict = field(default_factory=lambda: dict(DEFAULT_INIT))
    convs_built: int = 0

    @classmethod
    def of(cls, net: Mapping | None, spec: Sequence) -> "Recipe":
        """The recipe of a net config for ``spec`` (checked by schemas.NetRecipe and network.check_recipe)."""
        layers = N.recipe(spec, net)
        return cls((net or {}).get("bn_fraction", DEFAULT_BN_FRACTION), layers["init"])

    def fill_conv(self, conv: nn.Conv2d) -> None:
        self.convs_built += 1
        conv.caffe_conv_index = self.convs_built
        if self.convs_built in self.init["on_convs"]:
            nn.init.normal_(conv.weight, 0.0, float(self.init["gaussian_std"]))
        else:
            _fill(conv.weight, self.init["default"])
        nn.init.zeros_(conv.bias)

    def fill_classifier(self, fc: nn.Linear) -> None:
        fc.caffe_classifier = True
        _fill(fc.weight, self.init["classifier"] or self.init["default"])
        nn.init.zeros_(fc.bias)

    def batchnorm(self, c: int) -> nn.BatchNorm2d:
        if self.bn_fraction is None:
            raise UserError("net.bn_fraction is null but the network has BatchNorm layers: give their moving-average "
                            "fraction (e.g. net.bn_fraction=0.99)")
        return CaffeBatchNorm2d(c, float(self.bn_fraction))


def _fill(weight: torch.Tensor, filler: str) -> None:
    fan_in = weight[0].numel()  # Caffe's fan_in: input maps x kernel area (features for the classifier)
    if filler == "xavier":  # (schemas.Init allows xavier and msra)
        bound = math.sqrt(3.0 / fan_in)
        nn.init.uniform_(weight, -bound, bound)
    else:  # msra
        nn.init.normal_(weight, 0.0, math.sqrt(2.0 / fan_in))


class CaffeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose test-time statistics are Caffe's: a moving average with the layer's fraction f that is
    normalised by the weight it has accumulated, so it is an unbiased average from the first iterations on.

    PyTorch's running estimate r_t = f r_{t-1} + (1 - f) m_t starts from r_0 (0 for the mean, 1 for the
    variance); Caffe's equals (r_t - f^t r_0) / (1 - f^t). Without this, a short run is evaluated
    with statistics still near their initial values and its test accuracy is meaningless.
    """

    def __init__(self, c: int, fraction: float = DEFAULT_BN_FRACTION):
        super().__init__(c, eps=1e-5, momentum=1.0 - fraction)

    def forward(self, x):
        if self.training:
            return super().forward(x)
        decay = (1 - self.momentum) ** self.num_batches_tracked.clamp(min=1).to(self.running_mean.dtype)
        mean = self.running_mean / (1 - decay)
        var = (self.running_var - decay) / (1 - decay)
        return nn.functional.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


@module_for(N.Conv)
def _conv(rec: N.Conv, in_c: int, recipe: Recipe) -> tuple[nn.Module, int]:
    conv = nn.Conv2d(in_c, rec.out, rec.k, rec.s, rec.p, groups=rec.g or 1, bias=True)
    recipe.fill_conv(conv)
    layers = [conv]
    if rec.act.startswith("bn"):
        layers.append(recipe.batchnorm(rec.out))
    if rec.act in ("bn_relu", "relu"):
        layers.append(nn.ReLU(inplace=True))
    return (nn.Sequential(*layers) if len(layers) > 1 else conv), rec.out


@module_for(N.Norm)
def _norm(rec: N.Norm, in_c: int, recipe: Recipe):
    bn = recipe.batchnorm(in_c)
    return (nn.Sequential(bn, nn.ReLU(inplace=True)) if rec.relu else bn), in_c


@module_for(N.Pool)
def _pool(rec: N.Pool, in_c: int, recipe: Recipe):
    return nn.MaxPool2d(rec.k, rec.s, ceil_mode=True), in_c  # Caffe rounds pooled sizes up


@module_for(N.Dropout)
def _dropout(rec: N.Dropout, in_c: int, recipe: Recipe):
    return nn.Dropout(rec.rate), in_c


@module_for(N.GlobalPool)
def _global_pool(rec: N.GlobalPool, in_c: int, recipe: Recipe):
    pool = nn.AdaptiveMaxPool2d(1) if rec.kind == "max" else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(pool, nn.Flatten(1)), in_c  # N,C: SqueezeNet's pooled class maps are its logits


class Classifier(nn.Module):
    def __init__(self, in_features: int, out: int, recipe: Recipe):
        super().__init__()
        self.fc = nn.Linear(in_features, out)
        recipe.fill_classifier(self.fc)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class ResidualBlock(nn.Module):
    def __init__(self, main: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + self.shortcut(x)  # the authors' Eltwise SUM: no ReLU reads it


class FireModule(nn.Module):
    def __init__(self, squeeze: nn.Module, expand1: nn.Module, expand3: nn.Module):
        super().__init__()
        self.squeeze, self.expand1, self.expand3 = squeeze, expand1, expand3

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.expand1(x), self.expand3(x)], 1)


@module_for(N.Residual)
def _residual(rec: N.Residual, in_c: int, recipe: Recipe):
    main, c = _chain(rec.main, in_c, recipe)
    shortcut = _chain(rec.shortcut, in_c, recipe)[0] if rec.shortcut else nn.Identity()
    return ResidualBlock(main, shortcut), c


@module_for(N.Fire)
def _fire(rec: N.Fire, in_c: int, recipe: Recipe):
    squeeze, c = _conv(rec.squeeze, in_c, recipe)
    e1, c1 = _conv(rec.expand1, c, recipe)
    e3, c3 = _conv(rec.expand3, c, recipe)
    return FireModule(squeeze, e1, e3), c1 + c3


def _chain(spec: Sequence, in_c: int, recipe: Recipe,
           in_hw: tuple[int, int] | None = None) -> tuple[nn.Sequential, int]:
    layers, c = [], in_c
    shape = N.Shape(in_c, *in_hw) if in_hw else None
    for rec in spec:
        if isinstance(rec, N.Linear):
            # The classifier reads whatever map is left (1x1 after global pooling; Table 10 has none).
            layers.append(Classifier(shape.c * shape.h * shape.w, rec.out, recipe))
            c = rec.out
        else:
            module, c = MODULES[type(rec)](rec, c, recipe)
            layers.append(module)
        if shape:
            shape = N.check([rec], shape)
    return nn.Sequential(*layers), c


def build_model(spec: Sequence, in_shape: N.Shape, net: Mapping | None = None) -> nn.Sequential:
    """The network for ``spec`` on inputs of ``in_shape``, made as ``net`` (the run's net config: bn_fraction,
    init) says; raises network.NetworkError if it cannot run, UserError if the recipe does not fit it."""
    N.check(spec, in_shape)
    N.check_recipe(spec, net)
    recipe = Recipe.of(net, spec)
    return _chain(spec, in_shape.c, recipe, (in_shape.h, in_shape.w))[0]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
