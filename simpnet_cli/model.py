"""PyTorch modules from a network spec (network.py), initialised as the authors' Caffe definitions.

Each spec record maps to one small module builder, registered by record type. Conv weights and the
classifier use Caffe's "xavier" filler, uniform(-sqrt(3/fan_in), +sqrt(3/fan_in)), biases start at 0;
BatchNorm keeps Caffe's moving-average fraction 0.99 (PyTorch momentum 0.01) and eps 1e-5, with a
learned scale and shift.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from simpnet_cli import network as N

MODULES: dict[type, Callable] = {}


def module_for(kind: type):
    def register(fn):
        MODULES[kind] = fn
        return fn
    return register


def _xavier(layer: nn.Module) -> None:
    fan_in = layer.weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)


class CaffeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose test-time statistics are Caffe's: a moving average with fraction 0.99 that is
    normalised by the weight it has accumulated, so it is an unbiased average from the first iterations on.

    PyTorch's running estimate r_t = 0.99 r_{t-1} + 0.01 m_t starts from r_0 (0 for the mean, 1 for the
    variance); Caffe's equals (r_t - 0.99^t r_0) / (1 - 0.99^t). Without this, a short run is evaluated
    with statistics still near their initial values and its test accuracy is meaningless.
    """

    def __init__(self, c: int):
        super().__init__(c, eps=1e-5, momentum=0.01)

    def forward(self, x):
        if self.training:
            return super().forward(x)
        decay = (1 - self.momentum) ** self.num_batches_tracked.clamp(min=1).to(self.running_mean.dtype)
        mean = self.running_mean / (1 - decay)
        var = (self.running_var - decay) / (1 - decay)
        return nn.functional.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def _bn(c: int) -> nn.BatchNorm2d:
    return CaffeBatchNorm2d(c)


@module_for(N.Conv)
def _conv(rec: N.Conv, in_c: int) -> tuple[nn.Module, int]:
    conv = nn.Conv2d(in_c, rec.out, rec.k, rec.s, rec.p, groups=rec.g or 1, bias=True)
    _xavier(conv)
    layers = [conv]
    if rec.act.startswith("bn"):
        layers.append(_bn(rec.out))
    if rec.act in ("bn_relu", "relu"):
        layers.append(nn.ReLU(inplace=True))
    return (nn.Sequential(*layers) if len(layers) > 1 else conv), rec.out


@module_for(N.Pool)
def _pool(rec: N.Pool, in_c: int):
    return nn.MaxPool2d(rec.k, rec.s, ceil_mode=True), in_c  # Caffe rounds pooled sizes up


@module_for(N.Dropout)
def _dropout(rec: N.Dropout, in_c: int):
    return nn.Dropout(rec.rate), in_c


@module_for(N.GlobalPool)
def _global_pool(rec: N.GlobalPool, in_c: int):
    pool = nn.AdaptiveMaxPool2d(1) if rec.kind == "max" else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(pool, nn.Flatten(1)), in_c  # N,C: SqueezeNet's pooled class maps are its logits


class Classifier(nn.Module):
    def __init__(self, in_features: int, out: int):
        super().__init__()
        self.fc = nn.Linear(in_features, out)
        _xavier(self.fc)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class ResidualBlock(nn.Module):
    def __init__(self, main: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return torch.relu(self.main(x) + self.shortcut(x))


class FireModule(nn.Module):
    def __init__(self, squeeze: nn.Module, expand1: nn.Module, expand3: nn.Module):
        super().__init__()
        self.squeeze, self.expand1, self.expand3 = squeeze, expand1, expand3

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.expand1(x), self.expand3(x)], 1)


@module_for(N.Residual)
def _residual(rec: N.Residual, in_c: int):
    main, c = _chain(rec.main, in_c)
    shortcut = _chain(rec.shortcut, in_c)[0] if rec.shortcut else nn.Identity()
    return ResidualBlock(main, shortcut), c


@module_for(N.Fire)
def _fire(rec: N.Fire, in_c: int):
    squeeze, c = _conv(rec.squeeze, in_c)
    e1, c1 = _conv(rec.expand1, c)
    e3, c3 = _conv(rec.expand3, c)
    return FireModule(squeeze, e1, e3), c1 + c3


def _chain(spec: Sequence, in_c: int, in_hw: tuple[int, int] | None = None) -> tuple[nn.Sequential, int]:
    layers, c = [], in_c
    shape = N.Shape(in_c, *in_hw) if in_hw else None
    for rec in spec:
        if isinstance(rec, N.Linear):
            # The classifier reads whatever map is left (1x1 after global pooling; Table 10 has none).
            layers.append(Classifier(shape.c * shape.h * shape.w, rec.out))
            c = rec.out
        else:
            module, c = MODULES[type(rec)](rec, c)
            layers.append(module)
        if shape:
            shape = N.check([rec], shape)
    return nn.Sequential(*layers), c


def build_model(spec: Sequence, in_shape: N.Shape) -> nn.Sequential:
    """The network for ``spec`` on inputs of ``in_shape``; raises network.NetworkError if it cannot run."""
    N.check(spec, in_shape)
    return _chain(spec, in_shape.c, (in_shape.h, in_shape.w))[0]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
