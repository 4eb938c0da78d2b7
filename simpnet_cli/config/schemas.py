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
from functools import lru_cache
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

FILLERS = ("xavier", "msra")
CONV_SUFFIXES = ("plain", "norelu", "nobn", "linear")   # network.SUFFIX_ACTS: the reference's token suffixes


@dataclass
class Init:
    """Weight fillers, in the reference's words (recipe.init): biases always start at 0."""
    default: str = "xavier"                    # xavier | msra: every conv not in on_convs
    gaussian_std: Optional[float] = None       # normal(0, std) for the convs in on_convs
    on_convs: List[int] = field(default_factory=list)   # 1-based, in the order the convs appear (-1: the last)
    classifier: Optional[str] = "xavier"       # the fc layer's filler (null: the net has no fc)

    def __post_init__(self):
        _require(self.default in FILLERS, "init.default", f"must be one of {', '.join(FILLERS)}", self.default)
        _require(self.classifier in FILLERS + (None,), "init.classifier", f"must be one of {', '.join(FILLERS)} or null",
                 self.classifier)
        for i, conv in enumerate(self.on_convs):
            _require(conv != 0, f"init.on_convs[{i}]", "convs are numbered 1, 2, ... (or -1 for the last)", conv)
        if self.on_convs:
            _require(self.gaussian_std is not None and 0 < self.gaussian_std < math.inf, "init.gaussian_std",
                     "the convs in on_convs need a finite std > 0", self.gaussian_std)


@dataclass
class Mult:
    lr: float = 1.0
    decay: float = 1.0

    def __post_init__(self):
        _require(0 <= self.lr < math.inf, "lr", "a learning-rate multiplier must be a finite number >= 0", self.lr)
        _require(0 <= self.decay < math.inf, "decay", "a decay multiplier must be a finite number >= 0", self.decay)


@dataclass
class ClassifierMults:
    weight: Mult = field(default_factory=Mult)
    bias: Mult = field(default_factory=Mult)


@dataclass
class ConvMults:
    indices: List[int] = field(default_factory=list)    # convs whose bias has these multipliers (1-based; -1: last)
    bias: Optional[Mult] = None

    def __post_init__(self):
        for i, conv in enumerate(self.indices):
            _require(conv != 0, f"param_mults.convs.indices[{i}]", "convs are numbered 1, 2, ... (or -1 for the last)",
                     conv)
        _require(not self.indices or self.bias is not None, "param_mults.convs.bias",
                 "the listed convs need their bias multipliers {lr, decay}", self.bias)


@dataclass
class ParamMults:
    """Caffe's lr_mult/decay_mult where they differ from 1/1 (recipe.param_mults)."""
    classifier: Optional[ClassifierMults] = None
    convs: ConvMults = field(default_factory=ConvMults)


def _bn_fraction(value: Optional[float]) -> None:
    if value is not None:
        _require(0 < value < 1, "bn_fraction", "BatchNorm's moving-average fraction must be in (0, 1)", value)


# Every network family carries the authors' training recipe for its layers (see ../shared/reference's header).
@dataclass
class NetRecipe:
    bn_fraction: Optional[float] = 0.99        # Caffe's moving_average_fraction (null: no BatchNorm in the net)
    init: Init = field(default_factory=Init)
    param_mults: ParamMults = field(default_factory=ParamMults)

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
class PlainNet(NetRecipe):
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
    conv_suffix: Optional[Dict[Any, str]] = None    # {"11-13": nobn, "6": linear}: what follows those convs
    bn_after_pool: List[int] = field(default_factory=list)  # convs whose BatchNorm+ReLU come after their pool
    note: Optional[str] = None

    def __post_init__(self):
        _bn_fraction(self.bn_fraction)
        _positive("kernel", self.kernel)
        for index, value in (self.conv_suffix or {}).items():
            _layer_index(f"conv_suffix.{index}", index)
            _require(value in CONV_SUFFIXES, f"conv_suffix.{index}", f"must be one of {', '.join(CONV_SUFFIXES)}",
                     value)
        for i, conv in enumerate(self.bn_after_pool):
            _positive(f"bn_after_pool[{i}]", conv)
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
class ResNet(NetRecipe):
    builder: str = "resnet"
    family: str = ""
    downsample: str = "max_pool"
    global_pool: str = "avg"
    stages: List[ResNetStage] = MISSING
    note: Optional[str] = None

    def __post_init__(self):
        _bn_fraction(self.bn_fraction)
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
class SqueezeNet(NetRecipe):
    builder: str = "squeezenet"
    family: str = ""
    stem: SqueezeStem = MISSING
    stem_pool: PoolWindow = MISSING
    pool: PoolWindow = MISSING
    fires: List[Any] = MISSING                 # [squeeze, expand] pairs and "pool"
    head_dropout: Optional[float] = None
    saf_dropout: Optional[float] = None
    batchnorm: bool = True                     # false: ReLU alone after every conv (the authors' SqueezeNet)
    note: Optional[str] = None

    def __post_init__(self):
        _bn_fraction(self.bn_fraction)
        for i, item in enumerate(self.fires):
            ok = item == "pool" or (isinstance(item, list) and len(item) == 2
                                    and all(isinstance(v, int) and v > 0 for v in item))
            _require(ok, f"fires[{i}]", "each entry is [squeeze, expand] or pool", item)
        for name in ("head_dropout", "saf_dropout"):
            rate = getattr(self, name)
            if rate is not None:
                _require(0 <= rate < 1, name, "a dropout rate must be in [0, 1)", rate)


# A new builder in nets/specs.py registers its schema here.
NETWORKS = {"plain": PlainNet, "resnet": ResNet, "squeezenet": SqueezeNet}


# --------------------------------------------------------------------------- data, solver, training

INPUTS = ("per_channel_standardized", "mean_file", "scale_1_255", "unknown_norm2")
AUGMENTS = ("pad4_crop32_mirror", "mirror", "none")
TEST_TRANSFORMS = ("centre_crop32", "none")


@dataclass
class Dataset:
    name: str = MISSING
    torchvision: str = MISSING                 # the torchvision.datasets class
    classes: int = MISSING
    channels: int = MISSING
    size: int = MISSING
    # How the data is fed (conf/feed/, the reference's recipe.input/augment/test_transform); data.py applies them.
    input: str = MISSING
    augment: str = MISSING
    test_transform: str = MISSING
    system_copy: Optional[str] = None
    extra: bool = False                        # SVHN's extra split (conf/dataset/svhn.yaml: true, as the authors)
    source: Optional[str] = None               # "synthetic" for smoke runs
    train_size: Optional[int] = None           # a subset (smoke runs, quick checks)
    test_size: Optional[int] = None

    def __post_init__(self):
        for key in ("classes", "channels", "size"):
            _positive(key, getattr(self, key))
        _require(self.classes >= 2, "classes", "must be at least 2", self.classes)
        for key, allowed in (("input", INPUTS), ("augment", AUGMENTS), ("test_transform", TEST_TRANSFORMS)):
            _require(getattr(self, key) in allowed, key, f"must be one of {', '.join(allowed)}", getattr(self, key))
        _require(self.source in (None, "synthetic"), "source", "must be synthetic or absent", self.source)
        for key in ("train_size", "test_size"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))


@dataclass
class Poly:
    """Caffe's poly policy from ``from_iter`` on: lr = base_lr * (1 - iteration / max_iter) ** power."""
    from_iter: int = MISSING
    base_lr: float = MISSING
    power: float = 1.0
    max_iter: int = MISSING

    def __post_init__(self):
        _positive("schedule.poly.from_iter", self.from_iter, allow_zero=True)
        _require(0 < self.base_lr < math.inf, "schedule.poly.base_lr", "must be a finite number > 0", self.base_lr)
        _positive("schedule.poly.power", self.power)
        _require(self.max_iter > self.from_iter, "schedule.poly.max_iter", "must be after from_iter", self.max_iter)


@dataclass
class Schedule:
    kind: str = MISSING                        # multistep | piecewise
    gamma: Optional[float] = None              # multistep: lr *= gamma at each step
    steps: Optional[List[int]] = None
    points: Optional[Dict[int, float]] = None  # piecewise: {iteration: lr}
    poly: Optional[Poly] = None                # piecewise: a linear (power 1) decay phase after the points

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


# Values already found valid, per schema: checking is a pure function of them, and OmegaConf's merge costs ~30 ms,
# which every resolve of every row paid again (a report resolves each row of every table).
_valid: set[tuple[type, str]] = set()


@lru_cache(maxsize=None)
def _structured(schema: type) -> Any:
    return OmegaConf.structured(schema)


def _check(part: str, schema: type, values: dict) -> None:
    """Merge ``values`` into ``schema`` (types, unknown keys, missing keys) and build it (ranges)."""
    seen = (schema, repr(values))  # repr, not JSON: 0 and "0", 1 and 1.0 and True stay apart
    if seen in _valid:
        return
    try:
        OmegaConf.to_object(OmegaConf.merge(_structured(schema), values))
        _valid.add(seen)
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
