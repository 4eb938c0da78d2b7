"""One network that is k models of one spec side by side, so that one training step trains all k (issue 20).

Model i's channels are the i-th block of every activation: the k models' inputs enter concatenated along
channels, every conv is grouped (``groups = k``) so model i's filters read only model i's block, BatchNorm,
ReLU and the pools work per channel (so over the concatenation they are k of each), the classifier is a
batched matmul over the k blocks, and residual sums and fire concats are taken per block. The output is
(k, batch, classes). The parameters of the models are disjoint, so with loss = the sum of the k losses every
model gets exactly its own gradient, and the elementwise solvers (AdaDelta, Nesterov, L2 decay) give it
exactly its own update. Dropout draws each model's mask from that model's own generator, with the shape a
single model's ``nn.Dropout`` would draw, so a model's masks are those it would draw alone.

Ghost channels: every model's conv outputs are padded with zero channels up to a multiple of ``align`` (8:
tensor-core kernels want group widths that are multiples of 8). A ghost channel has zero weights, bias, and
BatchNorm scale and shift, so its activation is 0; every gradient that reaches a ghost parameter is a product
with a zero weight or a zero activation, so the solvers leave it at 0 and no real channel's arithmetic changes.
The real channels of a block are always its first ones (a fire module pads only its 3x3 expand, after the
1x1 one), so model i's copy of an ordinary tensor is a plain slice of the stacked tensor: its ``Slot``.

Module names mirror ``modules.build_model``'s, so a stacked state_dict has exactly an ordinary one's keys
and ``stack_weights`` / ``unstack_weights`` convert key by key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from simpnet_cli.errors import UserError
from simpnet_cli.nets import modules as M
from simpnet_cli.nets import specs as N

ALIGN = 8


def padded(c: int, align: int) -> int:
    return -(-c // align) * align


@dataclass(frozen=True)
class Width:
    """One model's channels in a stacked activation: ``real`` of them, in a block of ``block``."""
    real: int
    block: int


@dataclass(frozen=True)
class Slot:
    """Where model i's copy of one ordinary tensor lies in the stacked tensor.

    ``kind``: "channels" (conv weight or bias, BatchNorm vectors: rows i*block .. i*block+real, and for a conv
    weight its first ``inner`` input columns), "model" (the classifier: index i, then its first ``inner``
    features) or "shared" (BatchNorm's batch counter: one value for all models)."""
    kind: str
    real: int = 0
    block: int = 0
    inner: int | None = None

    def at(self, i: int) -> tuple:
        if self.kind == "shared":
            return ()
        if self.kind == "model":
            return (i,) if self.inner is None else (i, slice(None), slice(0, self.inner))
        rows = slice(i * self.block, i * self.block + self.real)
        return (rows,) if self.inner is None else (rows, slice(0, self.inner))


class _Build:
    """What the stacked builder carries through the spec: k, the alignment, the Caffe recipe (BatchNorm
    fraction; conv numbering for the per-parameter multipliers), the dropout generators and the slots."""

    def __init__(self, k: int, align: int, recipe: M.Recipe, generators: list):
        self.k, self.align, self.recipe, self.generators = k, align, recipe, generators
        self.slots: dict[str, Slot] = {}
        self.convs_built = 0

    def bn(self, prefix: str, width: Width) -> nn.Module:
        bn = self.recipe.batchnorm(self.k * width.block)
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.slots[f"{prefix}.{name}"] = Slot("channels", width.real, width.block)
        self.slots[f"{prefix}.num_batches_tracked"] = Slot("shared")
        return bn


class StackedDropout(nn.Module):
    """Dropout with each model's mask drawn from its own generator (``generators[i]``; None: the default
    one), over its real channels only, in the shape and dtype that model's ``nn.Dropout`` would draw."""

    def __init__(self, rate: float, k: int, width: Width, generators: list):
        super().__init__()
        self.rate, self.k, self.width, self.generators = rate, k, width, generators

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        keep = 1.0 - self.rate
        mask = torch.zeros_like(x)
        b, rest = x.shape[0], x.shape[2:]
        for i in range(self.k):
            noise = torch.empty((b, self.width.real, *rest), dtype=x.dtype, device=x.device)
            # as ATen's CPU dropout: bernoulli(1 - p), divided by 1 - p in place, then multiplied in
            noise.bernoulli_(keep, generator=self.generators[i] if self.generators else None).div_(keep)
            start = i * self.width.block
            mask[:, start:start + self.width.real] = noise
        return x * mask


class StackedClassifier(nn.Module):
    """k fc classifiers as one batched matmul: weight (k, out, features), bias (k, out); the input is the
    stacked map, each model's block flattened (its real features first: channel-major, real channels first)."""

    def __init__(self, k: int, features: int, out: int):
        super().__init__()
        self.k = k
        self.fc = nn.Module()  # the ordinary Classifier's ``fc``, so the state_dict keys match
        self.fc.weight = nn.Parameter(torch.zeros(k, out, features))
        self.fc.bias = nn.Parameter(torch.zeros(k, out))
        self.fc.caffe_classifier = True  # solvers.param_groups finds the classifier's multipliers by this tag

    def forward(self, x):
        x = x.reshape(x.shape[0], self.k, -1).transpose(0, 1)  # k, B, features
        return torch.baddbmm(self.fc.bias.unsqueeze(1), x, self.fc.weight.transpose(1, 2))


class StackedFire(nn.Module):
    """SqueezeNet's fire module per model: model i's output block is [its 1x1 expand, its 3x3 expand]."""

    def __init__(self, k: int, squeeze: nn.Module, expand1: nn.Module, expand3: nn.Module):
        super().__init__()
        self.k, self.squeeze, self.expand1, self.expand3 = k, squeeze, expand1, expand3

    def forward(self, x):
        x = self.squeeze(x)
        e1, e3 = self.expand1(x), self.expand3(x)
        b, _, h, w = e1.shape
        both = torch.cat([e1.view(b, self.k, -1, h, w), e3.view(b, self.k, -1, h, w)], 2)
        return both.view(b, -1, h, w)


def _conv(rec: N.Conv, width: Width, build: _Build, prefix: str, pad_to: int | None = None) -> tuple[nn.Module, Width]:
    """``pad_to``: the block width of the output (default: ``rec.out`` rounded up to the alignment)."""
    g = rec.g or 1
    out = Width(rec.out, pad_to if pad_to is not None else padded(rec.out, build.align))
    conv = nn.Conv2d(build.k * width.block, build.k * out.block, rec.k, rec.s, rec.p, groups=build.k * g, bias=True)
    build.convs_built += 1
    conv.caffe_conv_index = build.convs_built  # solvers.param_groups finds the convs' multipliers by this tag
    has_bn, has_relu = rec.act.startswith("bn"), rec.act in ("bn_relu", "relu")
    name = f"{prefix}.0" if has_bn or has_relu else prefix
    build.slots[f"{name}.weight"] = Slot("channels", out.real, out.block, width.real // g)
    build.slots[f"{name}.bias"] = Slot("channels", out.real, out.block)
    layers = [conv]
    if has_bn:
        layers.append(build.bn(f"{prefix}.1", out))
    if has_relu:
        layers.append(nn.ReLU(inplace=True))
    return (nn.Sequential(*layers) if len(layers) > 1 else conv), out


def _chain(spec: Sequence, width: Width, build: _Build, prefix: str, shape: N.Shape | None,
           logits_conv: N.Conv | None = None) -> tuple[nn.Sequential, Width]:
    layers = []
    for j, rec in enumerate(spec):
        name = f"{prefix}{j}"
        if isinstance(rec, N.Conv):
            module, width = _conv(rec, width, build, name, rec.out if rec is logits_conv else None)
        elif isinstance(rec, N.Norm):
            bn = build.bn(f"{name}.0" if rec.relu else name, width)
            module = nn.Sequential(bn, nn.ReLU(inplace=True)) if rec.relu else bn
        elif isinstance(rec, N.Pool):
            module = nn.MaxPool2d(rec.k, rec.s, ceil_mode=True)
        elif isinstance(rec, N.Dropout):
            module = StackedDropout(rec.rate, build.k, width, build.generators)
        elif isinstance(rec, N.GlobalPool):
            pool = nn.AdaptiveMaxPool2d(1) if rec.kind == "max" else nn.AdaptiveAvgPool2d(1)
            module = nn.Sequential(pool, nn.Flatten(1))
        elif isinstance(rec, N.Linear):
            area = shape.h * shape.w  # the classifier reads whatever map is left (1x1 after global pooling)
            module = StackedClassifier(build.k, width.block * area, rec.out)
            build.slots[f"{name}.fc.weight"] = Slot("model", inner=width.real * area)
            build.slots[f"{name}.fc.bias"] = Slot("model")
            width = Width(rec.out, rec.out)
        elif isinstance(rec, N.Residual):
            main, out = _chain(rec.main, width, build, f"{name}.main.", None)
            if rec.shortcut:
                shortcut, short = _chain(rec.shortcut, width, build, f"{name}.shortcut.", None)
                assert short == out, "residual branches with different blocks"
            else:
                shortcut = nn.Identity()
            module, width = M.ResidualBlock(main, shortcut), out
        elif isinstance(rec, N.Fire):
            squeeze, mid = _conv(rec.squeeze, width, build, f"{name}.squeeze")
            e1, w1 = _conv(rec.expand1, mid, build, f"{name}.expand1", rec.expand1.out)
            # Only the 3x3 expand is padded, so the block's real channels (1x1's, then 3x3's) come first.
            e3_block = padded(w1.real + rec.expand3.out, build.align) - w1.real
            e3, w3 = _conv(rec.expand3, mid, build, f"{name}.expand3", e3_block)
            module, width = StackedFire(build.k, squeeze, e1, e3), Width(w1.real + w3.real, w1.block + w3.block)
        else:
            raise UserError(f"a stacked network cannot hold a {type(rec).__name__} layer")
        layers.append(module)
        if shape is not None:
            shape = N.check([rec], shape)
    return nn.Sequential(*layers), width


class StackedNet(nn.Sequential):
    """k models of one spec as one network (see the module's docstring): the ordinary model's layers, stacked.
    ``forward`` takes the k inputs concatenated along channels and returns logits (k, batch, classes).
    ``generators`` (k of them, or empty for the default generator) are the models' dropout generators;
    ``slots`` maps every state_dict key (the ordinary model's keys) to where each model's tensor lies."""

    def __init__(self, chain: nn.Sequential, k: int, slots: dict[str, Slot], generators: list, align: int):
        super().__init__(*chain)
        self.k, self.align, self.slots, self.generators = k, align, slots, generators

    def forward(self, x):
        out = super().forward(x)
        if out.dim() == 2:  # global-pooled class maps (SqueezeNet): B, k*classes
            out = out.view(out.shape[0], self.k, -1).transpose(0, 1)
        return out

    def use_generators(self, generators: Sequence[torch.Generator | None]) -> None:
        if len(generators) != self.k:
            raise ValueError(f"{len(generators)} dropout generators for {self.k} models")
        self.generators[:] = list(generators)  # the dropout layers hold this very list


def build_stacked(spec: Sequence, in_shape: N.Shape, k: int, net: Mapping | None = None,
                  align: int = ALIGN) -> StackedNet:
    """The stacked network of k models of ``spec`` (built as ``net`` says: bn_fraction, the conv numbering of
    the multipliers), all parameters zero until ``stack_weights`` fills them. Convs that are grouped within a
    model (``g`` > 1) keep their width (no ghost channels: padding would shift their groups)."""
    if k < 1:
        raise UserError(f"a stack holds at least 1 model, got {k}")
    N.check(spec, in_shape)
    N.check_recipe(spec, net)
    if any((c.g or 1) > 1 for c in N.convs(spec)):
        align = 1
    # A network with no fc classifier ends in a conv whose maps are the class scores: never padded.
    logits_conv = None if any(isinstance(r, N.Linear) for r in spec) else next(
        (r for r in reversed(spec) if isinstance(r, N.Conv)), None)
    build = _Build(k, align, M.Recipe.of(net, spec), [])
    chain, _ = _chain(spec, Width(in_shape.c, in_shape.c), build, "", in_shape, logits_conv)
    stacked = StackedNet(chain, k, build.slots, build.generators, align)
    with torch.no_grad():
        for p in stacked.parameters():
            p.zero_()  # ghosts are zero; stack_weights fills the real channels
    missing = set(stacked.state_dict()) ^ set(stacked.slots)
    assert not missing, f"stacked state_dict and slots disagree on {sorted(missing)}"
    return stacked


@torch.no_grad()
def stack_weights(stacked: StackedNet, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Copy the k models' ordinary state_dicts (``build_model(...).state_dict()``) into ``stacked``. A shared
    tensor (BatchNorm's batch counter) must be equal in every model."""
    if len(states) != stacked.k:
        raise ValueError(f"{len(states)} models for a stack of {stacked.k}")
    own = stacked.state_dict(keep_vars=True)
    for name, slot in stacked.slots.items():
        for i, state in enumerate(states):
            if slot.kind == "shared" and i and not torch.equal(state[name], states[0][name]):
                raise ValueError(f"{name} differs between the stacked models")
            own[name][slot.at(i)] = state[name]


@torch.no_grad()
def unstack_weights(stacked: StackedNet, i: int) -> dict[str, torch.Tensor]:
    """Model i's ordinary state_dict (fresh tensors), loadable by ``build_model(...).load_state_dict``."""
    own = stacked.state_dict()
    return {name: own[name][slot.at(i)].clone() for name, slot in stacked.slots.items()}
