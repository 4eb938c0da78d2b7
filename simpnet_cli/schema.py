"""What a resolved run may contain: one declared schema per part (network, dataset, solver, training).

Every run a command names is checked against these dataclasses before anything loads data or trains
(``check_run``): OmegaConf's structured configs reject unknown keys and values of the wrong type, and each
dataclass's ``__post_init__`` checks ranges and allowed values. A failure is one ``ConfigError`` line naming
the part and the key (``solver.lr: must be > 0, got -1.0``); ``tables.resolve`` adds the file and the row.

The schema only checks: the run keeps the dicts it was given, so a run's identity (its config hash) does not
depend on the defaults written here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simpnet_cli.errors import UserError

# fp16 is refused on purpose: it needs loss scaling, whose overflow check (found_inf.item()) cannot live
# inside a captured CUDA graph; bf16 has fp32's range and needs none.
PRECISIONS = ("fp32", "bf16")


class ConfigError(UserError):
    """A value of a run's config that is missing, mistyped or out of range; the message names the key."""


def _require(ok: bool, key: str, why: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}, got {value!r}")


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    _require(value is not None and (value >= 0 if allow_zero else value > 0), key,
             "must be >= 0" if allow_zero else "must be > 0", value)


def _layer_index(key: str, index: Any) -> None:
    lo, _, hi = str(index).partition("-")
    _require(lo.isdigit() and (hi == "" or hi.isdigit()), key, "layer keys are N or N-M (1-based)", index)


def _rates(key: str, table: Optional[Dict[Any, float]]) -> None:
    for index, rate in (table or {}).items():
        _layer_index(f"{key}.{index}", index)
        _require(0 <= rate < 1, f"{key}.{index}", "a dropout rate must be in [0, 1)", rate)


# --------------------------------------------------------------------------- networks (one per builder)

@dataclass
class PoolWindow:
    k: int = 2
    s: int = 2

    def __post_init__(self):
        _positive("pool.k", self.k)
        _positive("pool.s", self.s)


@dataclass
class PlainDropout:
    conv: Optional[Dict[Any, float]] = None   # {"1-4": 0.2}: after conv layers 1..4
    pool: Optional[Dict[Any, float]] = None   # {"1": 0.2}: after the first pool (SAF-pooling)
    head: Optional[float] = None              # before the classifier

    def __post_init__(self):
        _rates("dropout.conv", self.conv)
        _rates("dropout.pool", self.pool)
        if self.head is not None:
            _require(0 <= self.head < 1, "dropout.head", "a dropout rate must be in [0, 1)", self.head)


@dataclass
class PlainNet:
    """Arch1-Arch5 and SimpNet (builder ``plain``)."""
    builder: str = "plain"
    family: str = ""
    widths: str = MISSING                      # C_x{y}, checked by the notation parser
    kernel: int = 3
    kernels: Optional[Dict[Any, int]] = None
    paddings: Optional[Dict[Any, int]] = None
    groups: Optional[Dict[Any, int]] = None
    pools_after: List[int] = field(default_factory=list)
    pool: PoolWindow = field(default_factory=PoolWindow)
    downsample: str = "max_pool"
    strided_bn_relu: bool = True
    global_pool: Optional[str] = "max"
    dropout: PlainDropout = field(default_factory=PlainDropout)
    note: Optional[str] = None

    def __post_init__(self):
        _positive("kernel", self.kernel)
        for name in ("kernels", "groups"):
            for index, value in (getattr(self, name) or {}).items():
                _layer_index(f"{name}.{index}", index)
                _positive(f"{name}.{index}", value)
        for index, value in (self.paddings or {}).items():
            _layer_index(f"paddings.{index}", index)
            _positive(f"paddings.{index}", value, allow_zero=True)
        for i, after in enumerate(self.pools_after):
            _positive(f"pools_after[{i}]", after)
        _require(self.downsample in ("max_pool", "strided_conv"), "downsample", "must be max_pool or strided_conv",
                 self.downsample)
        _require(self.global_pool in ("max", "avg", "none", None), "global_pool", "must be max, avg or none",
                 self.global_pool)


@dataclass
class ResNetStage:
    width: int = MISSING
    blocks: int = MISSING
    shortcut: Optional[str] = None

    def __post_init__(self):
        _positive("stages.width", self.width)
        _positive("stages.blocks", self.blocks)
        _require(self.shortcut in (None, "conv_k2s2", "conv_k2_then_pool"), "stages.shortcut",
                 "must be conv_k2s2 or conv_k2_then_pool", self.shortcut)


@dataclass
class ResNet:
    builder: str = "resnet"
    family: str = ""
    downsample: str = "max_pool"
    global_pool: str = "avg"
    stages: List[ResNetStage] = MISSING
    note: Optional[str] = None

    def __post_init__(self):
        _require(self.downsample in ("max_pool", "strided_conv"), "downsample", "must be max_pool or strided_conv",
                 self.downsample)
        _require(self.global_pool in ("max", "avg"), "global_pool", "must be max or avg", self.global_pool)
        _require(len(self.stages) > 0, "stages", "needs at least one stage", self.stages)


@dataclass
class SqueezeStem:
    out: int = MISSING
    k: int = 3
    p: int = 0


@dataclass
class SqueezeNet:
    builder: str = "squeezenet"
    family: str = ""
    stem: SqueezeStem = MISSING
    stem_pool: PoolWindow = MISSING
    pool: PoolWindow = MISSING
    fires: List[Any] = MISSING                 # [squeeze, expand] pairs and "pool"
    head_dropout: Optional[float] = None
    saf_dropout: Optional[float] = None
    note: Optional[str] = None

    def __post_init__(self):
        for i, item in enumerate(self.fires):
            ok = item == "pool" or (isinstance(item, list) and len(item) == 2
                                    and all(isinstance(v, int) and v > 0 for v in item))
            _require(ok, f"fires[{i}]", "each entry is [squeeze, expand] or pool", item)
        for name in ("head_dropout", "saf_dropout"):
            rate = getattr(self, name)
            if rate is not None:
                _require(0 <= rate < 1, name, "a dropout rate must be in [0, 1)", rate)


# A new builder in network.py registers its schema here.
NETWORKS = {"plain": PlainNet, "resnet": ResNet, "squeezenet": SqueezeNet}


# --------------------------------------------------------------------------- data, solver, training

@dataclass
class Dataset:
    name: str = MISSING
    torchvision: str = MISSING                 # the torchvision.datasets class
    classes: int = MISSING
    channels: int = MISSING
    size: int = MISSING
    augment: bool = False
    normalize: str = "mean_pixel"
    system_copy: Optional[str] = None
    extra: bool = False                        # SVHN's extra split
    source: Optional[str] = None               # "synthetic" for smoke runs
    train_size: Optional[int] = None           # a subset (smoke runs, quick checks)
    test_size: Optional[int] = None

    def __post_init__(self):
        for key in ("classes", "channels", "size"):
            _positive(key, getattr(self, key))
        _require(self.classes >= 2, "classes", "must be at least 2", self.classes)
        _require(self.normalize in ("mean_pixel", "unit"), "normalize", "must be mean_pixel or unit", self.normalize)
        _require(self.source in (None, "synthetic"), "source", "must be synthetic or absent", self.source)
        for key in ("train_size", "test_size"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))


@dataclass
class Schedule:
    kind: str = MISSING                        # multistep | piecewise
    gamma: Optional[float] = None              # multistep: lr *= gamma at each step
    steps: Optional[List[int]] = None
    points: Optional[Dict[int, float]] = None  # piecewise: {iteration: lr}

    def __post_init__(self):
        _require(self.kind in ("multistep", "piecewise"), "schedule.kind", "must be multistep or piecewise",
                 self.kind)
        if self.kind == "multistep":
            _require(self.gamma is not None and 0 < self.gamma <= 1, "schedule.gamma", "must be in (0, 1]",
                     self.gamma)
            _require(self.steps is not None, "schedule.steps", "a multistep schedule needs steps", self.steps)
            for i, step in enumerate(self.steps):
                _positive(f"schedule.steps[{i}]", step, allow_zero=True)
        else:
            _require(bool(self.points), "schedule.points", "a piecewise schedule needs {iteration: lr} points",
                     self.points)
            for start, lr in self.points.items():
                _positive(f"schedule.points.{start}", start, allow_zero=True)
                _require(0 < lr < math.inf, f"schedule.points.{start}", "a learning rate must be a finite number > 0",
                         lr)


def _solver_common(s) -> None:
    # Large rates are allowed (a study of divergence is a valid variant); a run that diverges is recorded so.
    _require(0 < s.lr < math.inf, "lr", "must be a finite number > 0", s.lr)
    _require(0 <= s.weight_decay < 1, "weight_decay", "must be in [0, 1)", s.weight_decay)


@dataclass
class AdaDelta:
    type: str = "adadelta"
    lr: float = MISSING
    rho: float = MISSING                       # Caffe's momentum
    eps: float = MISSING                       # Caffe's delta
    weight_decay: float = 0.0
    schedule: Schedule = MISSING

    def __post_init__(self):
        _solver_common(self)
        _require(0 < self.rho < 1, "rho", "must be in (0, 1)", self.rho)
        _require(0 < self.eps < 1, "eps", "must be in (0, 1)", self.eps)


@dataclass
class Nesterov:
    type: str = "nesterov"
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = 0.0
    schedule: Schedule = MISSING

    def __post_init__(self):
        _solver_common(self)
        _require(0 < self.momentum < 1, "momentum", "must be in (0, 1)", self.momentum)


SOLVERS = {"adadelta": AdaDelta, "nesterov": Nesterov}


@dataclass
class Train:
    iterations: int = MISSING
    batch_size: int = 100
    eval_every: int = 500
    checkpoint_every: int = 5000
    precision: str = "fp32"
    graphs: bool = True                        # CUDA graphs on a GPU (false: always eager)

    def __post_init__(self):
        for key in ("iterations", "batch_size", "eval_every", "checkpoint_every"):
            _positive(key, getattr(self, key))
        if self.precision == "fp16":
            raise ConfigError("precision: fp16 is not supported (it needs loss scaling, which cannot run inside "
                              "a CUDA graph); use bf16 for mixed precision")
        _require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}",
                 self.precision)


# --------------------------------------------------------------------------- checking

def _key_of(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")


def _check(part: str, schema: type, values: dict) -> None:
    """Merge ``values`` into ``schema`` (types, unknown keys, missing keys) and build it (ranges)."""
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except ConfigError as err:
        raise ConfigError(f"{part}.{err}") from None
    except OmegaConfBaseException as err:
        key = _key_of(err)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "not in struct" in first or "Key '" in first and "not in" in first:
            allowed = ", ".join(f.name for f in schema.__dataclass_fields__.values())
            raise ConfigError(f"{part}.{key}: unknown key (allowed: {allowed})") from None
        if "issing mandatory value" in first:
            raise ConfigError(f"{part}.{key}: missing (required)") from None
        raise ConfigError(f"{part}.{key}: {first}" if key else f"{part}: {first}") from None
    except (TypeError, ValueError) as err:  # a dataclass field of an unexpected shape
        raise ConfigError(f"{part}: {err}") from None


def _typed(part: str, values: Any, key: str, registry: dict) -> type:
    if not isinstance(values, dict):
        raise ConfigError(f"{part}: expected a mapping of keys, got {values!r}")
    kind = values.get(key)
    if kind not in registry:
        raise ConfigError(f"{part}.{key}: must be one of {', '.join(registry)}, got {kind!r}")
    return registry[kind]


def check_run(net: dict, dataset: dict, solver: dict, train: dict) -> None:
    """Raise ``ConfigError`` naming the first bad key of a resolved run."""
    _check("net", _typed("net", net, "builder", NETWORKS), net)
    if not isinstance(dataset, dict):
        raise ConfigError(f"dataset: expected a mapping of keys, got {dataset!r}")
    _check("dataset", Dataset, dataset)
    _check("solver", _typed("solver", solver, "type", SOLVERS), solver)
    _check("train", Train, train)
