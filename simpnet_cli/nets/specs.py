"""Network specs: a row's config becomes a flat, checkable description of the authors' network.

A spec is a tuple of layer records (``Conv``, ``Norm``, ``Pool``, ``Dropout``, ``GlobalPool``, ``Linear`` and the
two graph blocks ``Residual`` and ``Fire``). It is what ``simpnet show`` prints, in the token grammar of
../shared/reference/experiments.yaml, and what ``nets.modules.build_model`` turns into PyTorch modules. Builders are
registered by name (``builder:`` in conf/arch/*.yaml), so a new family is one function, not a new branch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from simpnet_cli.errors import UserError
from simpnet_cli.nets.notation import parse_widths


class NetworkError(UserError):
    """A network that cannot be built: the message names the layer and the shapes involved."""


@dataclass(frozen=True)
class Conv:
    out: int
    k: int = 3
    s: int = 1
    p: int = 1
    g: int | None = None  # groups; kept as None unless the authors wrote it, so tokens match theirs
    act: str = "bn_relu"  # what follows the conv: one of ACTS (the reference's token suffixes)

    def token(self) -> str:
        return (f"conv{self.out}k{self.k}" + (f"s{self.s}" if self.s != 1 else "") + f"p{self.p}"
                + (f"g{self.g}" if self.g is not None else "") + ACTS[self.act])


# What follows a conv, and its suffix in the reference's grammar: BatchNorm+Scale+ReLU (plain token), BatchNorm+Scale
# only (-norelu: the last conv of a residual branch), ReLU only (-nobn: SqueezeNet, Table 10's convs 11-13), or
# nothing (-linear: Table 6's conv before a pool, a conv whose BatchNorm comes after the pool that follows it).
ACTS = {"bn_relu": "", "bn": "-norelu", "relu": "-nobn", "none": "-linear"}
SUFFIX_ACTS = {suffix.lstrip("-") or "plain": act for act, suffix in ACTS.items()}  # net.conv_suffix values


@dataclass(frozen=True)
class Norm:
    """BatchNorm + Scale (and ReLU) on the previous layer's output: the authors' conv -> max pool -> BatchNorm."""
    relu: bool = True

    def token(self) -> str:
        return "bn-relu" if self.relu else "bn"


@dataclass(frozen=True)
class Pool:
    k: int = 2
    s: int = 2

    def token(self) -> str:
        return f"pool-MAXk{self.k}s{self.s}"


@dataclass(frozen=True)
class Dropout:
    rate: float

    def token(self) -> str:
        return f"drop{self.rate:g}"


@dataclass(frozen=True)
class GlobalPool:
    kind: str  # "max" | "avg"

    def token(self) -> str:
        return {"max": "GP-MAX", "avg": "GP-AVE"}[self.kind]


@dataclass(frozen=True)
class Linear:
    out: int

    def token(self) -> str:
        return f"fc{self.out}"


@dataclass(frozen=True)
class Residual:
    """``main(x) + shortcut(x)``, a plain sum (the authors put no ReLU after it); an empty shortcut is the identity."""
    main: tuple
    shortcut: tuple = ()

    def tokens(self) -> list[str]:
        return tokens(self.main) + tokens(self.shortcut) + ["add"]


@dataclass(frozen=True)
class Fire:
    """SqueezeNet's fire module: squeeze 1x1, then expand 1x1 and 3x3 side by side, concatenated."""
    squeeze: Conv
    expand1: Conv
    expand3: Conv

    def tokens(self) -> list[str]:
        return [self.squeeze.token(), self.expand1.token(), self.expand3.token(), "concat"]


def tokens(spec: Sequence) -> list[str]:
    """The reference's token list for a spec (graph blocks flatten to branch, branch, add/concat)."""
    out: list[str] = []
    for layer in spec:
        out += layer.tokens() if hasattr(layer, "tokens") else [layer.token()]
    return out


def convs(spec: Sequence) -> list[Conv]:
    """Every conv of a spec in the order of its tokens (branch before shortcut, squeeze before expands): the
    numbering of ``init.on_convs`` and ``param_mults.convs.indices``, 1-based as the reference writes them."""
    out: list[Conv] = []
    for layer in spec:
        if isinstance(layer, Conv):
            out.append(layer)
        elif isinstance(layer, Residual):
            out += convs(layer.main) + convs(layer.shortcut)
        elif isinstance(layer, Fire):
            out += [layer.squeeze, layer.expand1, layer.expand3]
    return out


def has_batchnorm(spec: Sequence) -> bool:
    return any(c.act.startswith("bn") for c in convs(spec)) or any(
        isinstance(layer, Norm) or isinstance(layer, Residual) and (has_batchnorm(layer.main)
                                                                    or has_batchnorm(layer.shortcut))
        for layer in spec)


# --------------------------------------------------------------------------- the training recipe of the layers

# What a net config that names no recipe gets: the authors' most common one (Tables 2, 6, 7, 9, 11, 14b).
DEFAULT_BN_FRACTION = 0.99
DEFAULT_INIT = {"default": "xavier", "gaussian_std": None, "on_convs": [], "classifier": "xavier"}


def conv_indices(indices, n: int, key: str) -> list[int]:
    """1-based conv indices as the reference writes them; a negative index counts from the last conv (-1 is the
    last), so a row's "the last two convs" stays true when a variant changes the depth."""
    out = []
    for i in indices or []:
        if isinstance(i, bool) or not isinstance(i, int) or not (1 <= i <= n or -n <= i <= -1):
            raise UserError(f"{key}: conv {i!r} does not exist (the network has {n} convs: 1..{n}, or -1 for the "
                            f"last)")
        out.append(i if i > 0 else n + 1 + i)
    return sorted(set(out))


def check_recipe(spec: Sequence, net: Mapping | None) -> None:
    """Raise UserError where a net config's recipe (bn_fraction, init, param_mults) names convs or layers that
    ``spec`` does not have: checked before training, so a bad index never waits for the model to be built."""
    recipe(spec, net)
    net = net or {}
    if has_batchnorm(spec) and net.get("bn_fraction", DEFAULT_BN_FRACTION) is None:
        raise UserError("net.bn_fraction is null but the network has BatchNorm layers: give their moving-average "
                        "fraction (e.g. net.bn_fraction=0.99)")
    if (net.get("param_mults") or {}).get("classifier") and not any(isinstance(layer, Linear) for layer in spec):
        raise UserError("net.param_mults.classifier is set but the network has no fc classifier (set it to null)")


def recipe(spec: Sequence, net: Mapping | None) -> dict:
    """The layers' part of a run's recipe in the reference's keys: bn_fraction, init, param_mults, with conv
    indices resolved (1-based). Bias multipliers apply to the convs listed, so with none listed they are shown
    as null, as the reference does."""
    net = net or {}
    n = len(convs(spec))
    mults = net.get("param_mults") or {}
    conv_mults = mults.get("convs") or {}
    indices = conv_indices(conv_mults.get("indices"), n, "net.param_mults.convs.indices")
    init = {**DEFAULT_INIT, **(net.get("init") or {})}
    init["on_convs"] = conv_indices(init["on_convs"], n, "net.init.on_convs")
    return {"bn_fraction": net.get("bn_fraction", DEFAULT_BN_FRACTION) if has_batchnorm(spec) else None,
            "init": init,
            "param_mults": {"classifier": mults.get("classifier"),
                            "convs": {"indices": indices, "bias": conv_mults.get("bias") if indices else None}}}


# --------------------------------------------------------------------------- shapes and parameter counts

@dataclass(frozen=True)
class Shape:
    c: int
    h: int
    w: int


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _pool_out(size: int, k: int, s: int) -> int:
    return math.ceil((size - k) / s) + 1  # Caffe rounds pooled sizes up


def _walk(spec: Sequence, shape: Shape, where: str, norms: list | None = None) -> tuple[Shape, int, int]:
    """Propagate a shape through a spec; return (out shape, paper params, BatchNorm params). ``norms`` (if
    given) gets (layer, map height x width) for every BatchNorm, in order."""
    paper = bn = 0
    for i, layer in enumerate(spec, 1):
        at = f"{where}layer {i} ({layer.tokens()[-1] if hasattr(layer, 'tokens') else layer.token()})"
        if isinstance(layer, Conv):
            g = layer.g or 1
            if shape.c % g or layer.out % g:
                raise NetworkError(f"{at}: {shape.c} input maps do not split into {g} groups")
            if layer.k > min(shape.h, shape.w) + 2 * layer.p:
                raise NetworkError(f"{at}: a {layer.k}x{layer.k} kernel is larger than the "
                                   f"{shape.h}x{shape.w} map it meets (padding {layer.p})")
            paper += layer.out * (shape.c // g) * layer.k * layer.k + layer.out
            bn += 2 * layer.out if layer.act.startswith("bn") else 0
            shape = Shape(layer.out, _conv_out(shape.h, layer.k, layer.s, layer.p),
                          _conv_out(shape.w, layer.k, layer.s, layer.p))
            if norms is not None and layer.act.startswith("bn"):
                norms.append((at, shape.h * shape.w))
        elif isinstance(layer, Norm):
            bn += 2 * shape.c
            if norms is not None:
                norms.append((at, shape.h * shape.w))
        elif isinstance(layer, Pool):
            if layer.k > min(shape.h, shape.w):
                raise NetworkError(f"{at}: pooling a {shape.h}x{shape.w} map with a {layer.k}x{layer.k} window "
                                   f"(too many poolings for this input size)")
            shape = Shape(shape.c, _pool_out(shape.h, layer.k, layer.s), _pool_out(shape.w, layer.k, layer.s))
        elif isinstance(layer, GlobalPool):
            shape = Shape(shape.c, 1, 1)
        elif isinstance(layer, Linear):
            paper += layer.out * shape.c * shape.h * shape.w + layer.out
            shape = Shape(layer.out, 1, 1)
        elif isinstance(layer, Residual):
            main, p1, b1 = _walk(layer.main, shape, f"{at}, main branch ", norms)
            short, p2, b2 = _walk(layer.shortcut, shape, f"{at}, shortcut ", norms) if layer.shortcut else (shape, 0, 0)
            if main != short:
                raise NetworkError(f"{at}: residual branches disagree: {main} vs {short}")
            shape, paper, bn = main, paper + p1 + p2, bn + b1 + b2
        elif isinstance(layer, Fire):
            sq, p1, b1 = _walk([layer.squeeze], shape, f"{at} ", norms)
            e1, p2, b2 = _walk([layer.expand1], sq, f"{at} ", norms)
            e3, p3, b3 = _walk([layer.expand3], sq, f"{at} ", norms)
            if (e1.h, e1.w) != (e3.h, e3.w):
                raise NetworkError(f"{at}: fire expand branches disagree: {e1} vs {e3}")
            shape, paper, bn = Shape(e1.c + e3.c, e1.h, e1.w), paper + p1 + p2 + p3, bn + b1 + b2 + b3
        if shape.h < 1 or shape.w < 1:
            raise NetworkError(f"{at}: the feature map shrinks to {shape.h}x{shape.w}")
    return shape, paper, bn


def layer_table(spec: Sequence, in_shape: Shape) -> list[tuple[str, Shape, int]]:
    """Per top-level record: its tokens, its output shape and its conv/fc parameters (as torchinfo lists a
    model; a residual block or fire module is one line)."""
    out, shape = [], in_shape
    for layer in spec:
        toks = layer.tokens() if hasattr(layer, "tokens") else [layer.token()]
        new_shape, params, _ = _walk([layer], shape, "")
        out.append((" ".join(toks), new_shape, params))
        shape = new_shape
    return out


def check(spec: Sequence, in_shape: Shape) -> Shape:
    """Raise ``NetworkError`` if the spec cannot run on ``in_shape``; return the output shape."""
    return _walk(spec, in_shape, "")[0]


def check_batchnorm_batch(spec: Sequence, in_shape: Shape, batch_size: int) -> None:
    """BatchNorm in training needs more than one value per channel (batch x height x width > 1): batch 1 on a
    1x1 map fails inside torch at the first step, so it is refused before anything trains."""
    norms: list = []
    _walk(spec, in_shape, "", norms)
    for at, pixels in norms:
        if batch_size * pixels <= 1:
            raise NetworkError(f"{at}: BatchNorm normalises a 1x1 map over a batch of {batch_size}: one value per "
                               f"channel, which it cannot train on; use batch_size=2 or more (or fewer poolings)")


def count_params(spec: Sequence, in_shape: Shape) -> tuple[int, int]:
    """(paper-comparable params: conv and classifier weights+biases; all trainable params, BatchNorm included)."""
    _, paper, bn = _walk(spec, in_shape, "")
    return paper, paper + bn


# --------------------------------------------------------------------------- builders (conf/arch/*.yaml)

BUILDERS: dict[str, Callable[[Mapping, int], tuple]] = {}


def builder(name: str):
    def register(fn):
        BUILDERS[name] = fn
        return fn
    return register


def build_spec(arch: Mapping, num_classes: int) -> tuple:
    name = arch.get("builder")
    if name not in BUILDERS:
        raise UserError(f"unknown network builder {name!r}; known: {', '.join(sorted(BUILDERS))}")
    return tuple(BUILDERS[name](arch, num_classes))


def _per_layer(table: Mapping | None, n: int, default, what: str) -> list:
    """Expand ``{"1-3": 1, "7": 5}`` (1-based conv indices or ranges) into one value per conv layer."""
    values = [default] * n
    for key, value in (table or {}).items():
        lo, _, hi = str(key).partition("-")
        try:
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"{what}: bad layer index {key!r}, expected N or N-M") from None
        if not 1 <= lo <= hi <= n:
            raise UserError(f"{what}: layer {key} is outside 1-{n} (the network has {n} conv layers)")
        for i in range(lo - 1, hi):
            values[i] = value
    return values


@builder("plain")
def plain(arch: Mapping, num_classes: int) -> list:
    """The SimpNet family (Arch1-Arch5): a chain of conv blocks with max pools, dropout, global pooling, fc.

    Per conv layer i (1-based): conv (followed by BatchNorm+ReLU, or what ``conv_suffix[i]`` says), dropout
    ``dropout.conv[i]``, a pool if i is in ``pools_after`` (with the conv's BatchNorm+ReLU after it if i is in
    ``bn_after_pool``), then dropout ``dropout.pool[j]`` for the j-th pool (SAF-pooling). ``downsample:
    strided_conv`` folds each pool into the conv before it (stride 2, and BN+ReLU only if ``strided_bn_relu``).
    """
    # Parsed by whoever composed the run (config.tables); a C_x{y} string is parsed here for direct callers.
    widths = parse_widths(arch["widths"]) if isinstance(arch["widths"], str) else [int(w) for w in arch["widths"]]
    n = len(widths)
    kernels = _per_layer(arch.get("kernels"), n, arch.get("kernel", 3), "kernels")
    pads = _per_layer(arch.get("paddings"), n, None, "paddings")
    groups = _per_layer(arch.get("groups"), n, None, "groups")
    suffixes = _per_layer(arch.get("conv_suffix"), n, "plain", "conv_suffix")
    for i, suffix in enumerate(suffixes, 1):
        if suffix not in SUFFIX_ACTS:
            raise UserError(f"conv_suffix: layer {i}: {suffix!r} is not one of {', '.join(SUFFIX_ACTS)}")
    drop = arch.get("dropout") or {}
    drop_conv = _per_layer(drop.get("conv"), n, None, "dropout.conv")
    pools_after = list(arch.get("pools_after") or [])
    if any(not 1 <= i <= n for i in pools_after) or len(set(pools_after)) != len(pools_after):
        raise UserError(f"pools_after {pools_after} must name distinct conv layers in 1-{n} (the widths give {n} "
                        f"conv layers; place the pools with net.pools_after=[...])")
    drop_pool = _per_layer(drop.get("pool"), len(pools_after), None, "dropout.pool") if pools_after else []
    pool_cfg = arch.get("pool") or {"k": 2, "s": 2}
    strided = arch.get("downsample", "max_pool") == "strided_conv"
    if arch.get("downsample", "max_pool") not in ("max_pool", "strided_conv"):
        raise UserError(f"downsample must be max_pool or strided_conv, got {arch.get('downsample')!r}")
    bn_after_pool = list(arch.get("bn_after_pool") or [])
    for i in bn_after_pool:
        if i not in pools_after or strided:
            raise UserError(f"bn_after_pool: conv {i} has no max pool after it (pools_after {pools_after}"
                            + (", and downsample is strided_conv" if strided else "") + ")")
        if suffixes[i - 1] != "plain":
            raise UserError(f"bn_after_pool: conv {i} also has conv_suffix {suffixes[i - 1]!r}; give one or the other")
    spec: list = []
    for i, (w, k, p, g, suffix) in enumerate(zip(widths, kernels, pads, groups, suffixes), 1):
        pool_here = i in pools_after
        j = sorted(pools_after).index(i) if pool_here else -1
        act = "none" if i in bn_after_pool else SUFFIX_ACTS[suffix]
        if pool_here and strided:
            if not arch.get("strided_bn_relu", True):
                act = "none"
            spec.append(Conv(w, k, 2, (k - 1) // 2 if p is None else p, g, act))
        else:
            spec.append(Conv(w, k, 1, (k - 1) // 2 if p is None else p, g, act))
        if drop_conv[i - 1]:
            spec.append(Dropout(float(drop_conv[i - 1])))
        if pool_here and not strided:
            spec.append(Pool(int(pool_cfg["k"]), int(pool_cfg["s"])))
            if i in bn_after_pool:
                spec.append(Norm(relu=True))
        if pool_here and drop_pool[j]:
            spec.append(Dropout(float(drop_pool[j])))
    gp = arch.get("global_pool", "max")
    if gp not in ("max", "avg", "none", None):
        raise UserError(f"global_pool must be max, avg or none, got {gp!r}")
    if gp in ("max", "avg"):
        spec.append(GlobalPool(gp))
    if drop.get("head"):
        spec.append(Dropout(float(drop["head"])))
    spec.append(Linear(num_classes))
    return spec


@builder("resnet")
def resnet(arch: Mapping, num_classes: int) -> list:
    """CIFAR ResNet (basic blocks) in the authors' layout; see conf/arch/resnet32.yaml for the block forms.

    Every block ends in a plain sum (no ReLU after it). A max-pool downsampling block pools between its first
    conv and that conv's BatchNorm (conv -> pool -> BN -> ReLU); a stride-2 one strides its first conv."""
    stages = arch["stages"]
    strided = arch.get("downsample", "max_pool") == "strided_conv"
    spec: list = [Conv(stages[0]["width"], 3, 1, 1)]
    for stage in stages:
        w = stage["width"]
        for b in range(stage["blocks"]):
            first = b == 0 and stage.get("shortcut")
            if not first:
                spec.append(Residual((Conv(w), Conv(w, act="bn"))))
                continue
            main = ((Conv(w, 3, 2, 1), Conv(w, act="bn")) if strided
                    else (Conv(w, act="none"), Pool(2, 2), Norm(relu=True), Conv(w, act="bn")))
            kind = "conv_k2s2" if strided else stage["shortcut"]
            shortcut = {"conv_k2s2": (Conv(w, 2, 2, 0, act="bn"),),
                        "conv_k2_then_pool": (Conv(w, 2, 1, 0, act="none"), Pool(2, 2), Norm(relu=False))}[kind]
            spec.append(Residual(main, shortcut))
    spec += [GlobalPool(arch.get("global_pool", "avg")), Linear(num_classes)]
    return spec


@builder("squeezenet")
def squeezenet(arch: Mapping, num_classes: int) -> list:
    """SqueezeNet v1.1 for 32x32 inputs; ``saf_dropout`` puts a dropout right after each max pool.
    ``batchnorm: false`` (the authors' net) follows every conv by a ReLU alone."""
    stem, pool = arch["stem"], arch["pool"]
    saf = arch.get("saf_dropout")
    act = "bn_relu" if arch.get("batchnorm", True) else "relu"
    spec: list = [Conv(stem["out"], stem["k"], 1, stem["p"], act=act), Pool(arch["stem_pool"]["k"], arch["stem_pool"]["s"])]
    if saf:
        spec.append(Dropout(float(saf)))
    for item in arch["fires"]:
        if item == "pool":
            spec.append(Pool(pool["k"], pool["s"]))
            if saf:
                spec.append(Dropout(float(saf)))
        else:
            squeeze, expand = item
            spec.append(Fire(Conv(squeeze, 1, 1, 0, act=act), Conv(expand, 1, 1, 0, act=act),
                             Conv(expand, 3, 1, 1, act=act)))
    if arch.get("head_dropout"):
        spec.append(Dropout(float(arch["head_dropout"])))
    # SqueezeNet classifies with a 1x1 conv (ReLU, no BatchNorm) and averages the class maps.
    spec += [Conv(num_classes, 1, 1, 0, act="relu"), GlobalPool("avg")]
    return spec
