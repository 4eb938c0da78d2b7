"""What a resolved run may contain: one declared schema per part (network, dataset, solver, training).

Every run a command names is checked against these dataclasses before anything loads data or trains
(``check_run``): OmegaConf's structured configs reject unknown keys and values of the wrong type, and each
dataclass's ``__post_init__`` checks ranges and allowed values. A failure is one ``ConfigError`` line naming
the part and the key (``solver.lr: must be > 0, got -1.0``); ``tables.resolve`` adds the file and the row.

The other inputs are checked here too, once, before anything is planned: the top-level keys of conf/config.yaml
(``check_top``), names that become file names (``check_name``: never a path), the types of a table file's keys
(``check_table_file``, ``check_row``), the row fields a results line needs (``check_record``) and whether a run
fits in its device's memory (``check_fits``, called by runs/planning.preflight with the device's size).

The schema only checks: the run keeps the dicts it was given, so a run's identity (its config hash) does not
depend on the defaults written here.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simpnet_cli.errors import UserError

# fp16 is refused on purpose: it needs loss scaling, whose overflow check (found_inf.item()) cannot live
# inside a captured CUDA graph; bf16 has fp32's range and needs none.
PRECISIONS = ("fp32", "bf16")


def check_precision(key: str, value: Any) -> None:
    """The one place a precision is judged: fp32 or bf16 (fp16 refused, and why)."""
    if value == "fp16":
        raise ConfigError(f"{key}: fp16 is not supported (it needs loss scaling, which cannot run inside a CUDA "
                          f"graph); use bf16 for mixed precision")
    _require(value in PRECISIONS, key, f"must be one of {', '.join(PRECISIONS)}", value)


class ConfigError(UserError):
    """A value of a run's config that is missing, mistyped or out of range; the message names the key."""


def _require(ok: bool, key: str, why: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}, got {value!r}")


# The largest count any key may hold (iterations, sizes, widths, seeds' count...): torch indexes with int64 and
# seeds its generators with at most 64 bits, and a value past this is a typo that would overflow there or ask
# for more memory than any machine has, after the run has started.
MAX_INT = 2**31 - 1


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    _require(value is not None and (value >= 0 if allow_zero else value > 0), key,
             "must be >= 0" if allow_zero else "must be > 0", value)
    _require(value <= MAX_INT, key, f"must be at most {MAX_INT}", value)


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
        _require(0 <= self.lr < math.inf, "param_mults.*.lr", "a learning-rate multiplier must be a finite number >= 0",
                 self.lr)
        _require(0 <= self.decay < math.inf, "param_mults.*.decay", "a decay multiplier must be a finite number >= 0",
                 self.decay)


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


# The torchvision.datasets classes train/data.py reads (it knows where each keeps its files), with the number of
# training images each holds (SVHN: its train split; its extra split adds SVHN_EXTRA_IMAGES): a batch larger
# than the data is found before anything trains.
TORCHVISION_TRAIN_IMAGES = {"CIFAR10": 50_000, "CIFAR100": 50_000, "MNIST": 60_000, "FashionMNIST": 60_000,
                            "SVHN": 73_257}
SVHN_EXTRA_IMAGES = 531_131


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
        # The name is the results line's `dataset` column: an empty one would fail only when the run is recorded.
        _require(bool(str(self.name).strip()), "name", "must be a non-empty name", self.name)
        for key in ("classes", "channels", "size"):
            _positive(key, getattr(self, key))
        _require(self.classes >= 2, "classes", "must be at least 2", self.classes)
        for key, allowed in (("input", INPUTS), ("augment", AUGMENTS), ("test_transform", TEST_TRANSFORMS)):
            _require(getattr(self, key) in allowed, key, f"must be one of {', '.join(allowed)}", getattr(self, key))
        _require(self.source in (None, "synthetic"), "source", "must be synthetic or absent", self.source)
        _require(self.torchvision in TORCHVISION_TRAIN_IMAGES, "torchvision",
                 f"must be one of the classes simpnet reads: {', '.join(TORCHVISION_TRAIN_IMAGES)}", self.torchvision)
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


# The keys each schedule kind reads (solvers.lr_at). A command-line key the kind does not read
# (solver.schedule.points on a multistep schedule) is refused (check_schedule_keys) rather than recorded as the
# paper's row: whoever typed it meant to change the schedule, and a run filed as the paper's row (or as a
# variant computing exactly the paper's row, as before) would hide that nothing changed.
SCHEDULE_READS = {"multistep": ("kind", "gamma", "steps"), "piecewise": ("kind", "points", "poly")}


def check_schedule_keys(schedule: Any, given: list[str]) -> None:
    """``given``: the schedule keys a command line set (``points`` of ``solver.schedule.points=...``)."""
    kind = schedule.get("kind") if isinstance(schedule, dict) else None
    if kind not in SCHEDULE_READS:
        return  # the schema says what is wrong with the kind
    for key in given:
        if key not in SCHEDULE_READS[kind]:
            other = [k for k, reads in SCHEDULE_READS.items() if key in reads]
            raise ConfigError(f"solver.schedule.{key}: a {kind} schedule does not read {key} (it reads "
                              f"{', '.join(SCHEDULE_READS[kind][1:])}), so the run would be the paper's schedule "
                              f"under another name" + (f"; add solver.schedule.kind={other[0]} to use {key}"
                                                       if other else ""))


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
        check_precision("precision", self.precision)


# --------------------------------------------------------------------------- checking

def _key_of(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")


# Values already found valid, per schema: checking is a pure function of them, and OmegaConf's merge costs ~30 ms,
# which every resolve of every row paid again (a report resolves each row of every table).
_valid: set[tuple[type, str]] = set()


@lru_cache(maxsize=None)
def _structured(part: str, schema: type) -> Any:
    """``schema`` as Hydra's ConfigStore holds it: group ``schema/<part>``, one typed node per option
    (``schema/solver/AdaDelta``, ``schema/net/PlainNet``, ...), the node a run's values are merged into."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group=f"schema/{part}", name=schema.__name__, node=schema)
    return store.load(f"schema/{part}/{schema.__name__}.yaml").node


def _check(part: str, schema: type, values: dict) -> None:
    """Merge ``values`` into ``schema`` (types, unknown keys, missing keys) and build it (ranges)."""
    seen = (schema, repr(values))  # repr, not JSON: 0 and "0", 1 and 1.0 and True stay apart
    if seen in _valid:
        return
    try:
        OmegaConf.to_object(OmegaConf.merge(_structured(part, schema), values))
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


# --------------------------------------------------------------------------- names, records, sizes

# A table's, profile's or config's name becomes part of a file name (results/table<N>.csv, conf/<kind>/<name>.yaml):
# letters, digits, _ and -, so no name can climb out of its folder (../x) or hide (.x).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# Words a table selector gives a meaning of its own: a table of one's own cannot be called so.
RESERVED_NAMES = {"all", "null", "none", "true", "false"}
# A name's longest: with table<NAME>.csv, a run record's table<NAME>-<digest>.json and a write's temporary
# suffix it stays well under the 255 bytes a file name may have.
MAX_NAME = 100


def check_name(key: str, value: Any, reserved: bool = False) -> str:
    """``value`` as a name that is safe in a file name (``key`` says which key gave it)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not NAME.fullmatch(str(value)):
        raise ConfigError(f"{key}: a name is letters, digits, _ and - (starting with a letter or digit), "
                          f"got {value!r}")
    if len(str(value)) > MAX_NAME:
        raise ConfigError(f"{key}: a name of {len(str(value))} characters; at most {MAX_NAME} (it becomes part "
                          f"of file names, such as table<NAME>.csv)")
    if reserved and str(value).lower() in RESERVED_NAMES:
        raise ConfigError(f"{key}: {value!r} is a reserved word ({', '.join(sorted(RESERVED_NAMES))}); "
                          f"give your table another name")
    return str(value)


def check_config_name(key: str, value: Any) -> str:
    """A config file's name (arch=, dataset=, solver=, feed=, profile=): a name that starts with a letter and
    is not null, true or false, which Hydra would read as a number or a constant rather than a file's name."""
    name = check_name(key, value)
    if not name[0].isalpha() or name.lower() in RESERVED_NAMES - {"all"}:
        raise ConfigError(f"{key}: give the name of a config file (conf/{key}/NAME.yaml), got {value!r}")
    return name


def check_record(table: str, row_id: Any, label: Any, dataset_name: Any, paper: Any) -> None:
    """Every field of a run's results line that comes from its table row, before the run trains: a run whose
    line cannot be written would train, fail, and fail again on every re-run without ever being recorded."""
    check_name("table", table)
    for key, value in (("id", row_id), ("label", label), ("dataset.name", dataset_name)):
        _require(value is not None and not isinstance(value, (dict, list)) and bool(str(value).strip()), key,
                 "must be a non-empty text (a results line needs it)", value)
        _one_line(key, value)
    if not isinstance(paper, dict):
        raise ConfigError(f"paper: must be a mapping such as {{params: 300K, acc: 90.21}}, got {paper!r}")
    for key in ("params", "acc"):
        if key in paper:
            value = paper[key]
            _require(value is not None and value != "" and not isinstance(value, (list, bool)), f"paper.{key}",
                     "must be the paper's figure (leave the key out if the paper gives none)", value)
            _one_line(f"paper.{key}", value)


def _one_line(key: str, value: Any) -> None:
    # A results line is one line of its file: a newline or another control character in a field would split it
    # (and the reader would drop both halves as torn lines, every time the index is rebuilt).
    _require(not any(ord(c) < 32 or c == "\x7f" for c in str(value)), key,
             "must be one line of text (no newline or other control character)", value)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # (not reached)


def memory_needed(spec, in_shape, train: dict, dataset: dict) -> dict:
    """A lower bound on the memory a run needs, by part (bytes): weights with their gradients and two solver
    buffers; activations of a training batch (each layer's output, kept for the backward pass, about four
    copies with BatchNorm and ReLU) and of a test batch of 1000; the images (synthetic data is made in float)."""
    from simpnet_cli.nets import specs as network

    _, total = network.count_params(spec, in_shape)
    per_image = in_shape.c * in_shape.h * in_shape.w + sum(
        s.c * s.h * s.w for _, s, _ in network.layer_table(spec, in_shape))
    batch = int(train.get("batch_size", 100))
    widest = max([s.c * s.h * s.w for _, s, _ in network.layer_table(spec, in_shape)] + [0])
    images = 0
    if dataset.get("source") == "synthetic":
        n = int(dataset.get("train_size") or 512) + int(dataset.get("test_size") or 256)
        images = n * in_shape.c * in_shape.h * in_shape.w * 13  # uint8 kept, float32 noise and sum made
    elif dataset.get("train_size"):
        images = int(dataset["train_size"]) * in_shape.c * in_shape.h * in_shape.w
    return {"weights": 4 * 4 * total, "activations": 4 * 4 * batch * per_image + 4 * 2 * 1000 * widest,
            "images": images}


def check_fits(spec, in_shape, train: dict, dataset: dict, available: int, where: str) -> None:
    """Refuse a run that cannot fit in ``available`` bytes (the device's memory) before it starts: a network of
    C100000 channels, a huge padding or a data set of 10^11 images would otherwise exhaust the machine part-way."""
    need = memory_needed(spec, in_shape, train, dataset)
    if sum(need.values()) > available:
        parts = ", ".join(f"{k} {_bytes(v)}" for k, v in need.items() if v)
        raise ConfigError(f"needs at least {_bytes(sum(need.values()))} of memory ({parts}) but {where} has "
                          f"{_bytes(available)}: make the network (net.widths, net.paddings), the batch "
                          f"(batch_size) or the data (profile.data.train_size) smaller")


# --------------------------------------------------------------------------- the top-level config (conf/config.yaml)

# Its keys, and the config groups a command line may choose (they compose into a mapping of that name).
TOP_KEYS = {"table", "row", "seeds", "net", "iterations", "batch_size", "test_interval", "custom", "conf_dir",
            "data_dir", "download", "results_dir", "runs_dir", "device", "jobs_per_device", "precision",
            "svhn_extra", "quiet", "logger", "dry_run", "bench", "profile", "stack", "stack_mode",
            "shard", "shards"}
GROUP_KEYS = {"arch", "dataset", "feed", "solver"}
PROFILE_KEYS = {"name", "device", "train", "data"}
CUSTOM_KEYS = {"table", "row", "label", "dataset", "solver", "iterations", "feed", "test_interval"}
MAX_DRY_ITERS = 1000  # --dry-run's timed steps per network: 20 on a GPU by default; more only adds time
MAX_SEED = 2**32 - 1  # numpy's and CUDA's generators take 32-bit seeds; the data order mixes in the epoch


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(key: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    _require(_is_int(value) and 1 <= value <= MAX_INT, key, f"give a whole number from 1 to {MAX_INT}", value)


def _flag(key: str, value: Any, optional: bool = False) -> None:
    # `download=no` is the string "no" to Hydra, and bool("no") is True: only true and false are read as such.
    _require(isinstance(value, bool) or (optional and value is None), key,
             "give true or false" + (" (or null)" if optional else ""), value)


def _folder(key: str, value: Any) -> None:
    _require((isinstance(value, str) and value.strip() != "") or _is_int(value), key,
             f"give a folder ({key}=PATH)", value)


def _selector(key: str, value: Any, names: bool) -> None:
    """table= and row=: one value or a non-empty list of them; table names must be safe in a file name."""
    items = value if isinstance(value, list) else [value]
    _require(len(items) > 0, key, "an empty list selects nothing: leave the key out for every "
             + ("table (table=all)" if names else "row"), value)
    for item in items:
        if names and str(item) == "all" and not isinstance(value, list):
            continue
        if names:
            # (a file named table.yaml is the table "table": its name is not the prefix alone)
            check_name(key, (item.removeprefix("table") or item) if isinstance(item, str) else item)
        else:
            _require((isinstance(item, str) and item.strip() != "") or _is_int(item), key,
                     "give a row id (8L) or the paper's label, or a list of them", item)


def seeds_of(value: Any) -> list[int]:
    """``seeds=``: a count (seeds 0..n-1) or a non-empty list of distinct seeds, each in 0..MAX_SEED."""
    if _is_int(value):
        _require(1 <= value <= MAX_INT, "seeds", "give a count of at least 1 or a list such as [0,1,2]", value)
        return list(range(value))
    _require(isinstance(value, list) and len(value) > 0, "seeds",
             "give a count (seeds=3) or a non-empty list of whole numbers (seeds=[0,7])", value)
    for seed in value:
        _require(_is_int(seed) and 0 <= seed <= MAX_SEED, "seeds", f"each seed is a whole number from 0 to "
                 f"{MAX_SEED}", seed)
    _require(len(set(value)) == len(value), "seeds", "each seed once", value)
    return list(value)


def check_top(cfg: dict) -> None:
    """The keys of conf/config.yaml as composed from the command line, checked before anything is planned:
    every key is known, of its type and in range (a row's own keys are checked when each row resolves)."""
    unknown = sorted(set(map(str, cfg)) - TOP_KEYS - GROUP_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (the keys are {', '.join(sorted(TOP_KEYS))}, and "
                          f"arch=, dataset=, feed=, solver= choose configs)")
    missing = sorted(TOP_KEYS - {"bench", "dry_run", "logger", "conf_dir"} - set(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: missing (a ~{missing[0]} deletion leaves it unset; set a value instead)")
    for key in ("net", "custom", "profile", *GROUP_KEYS & set(cfg)):
        if not isinstance(cfg[key], dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {cfg[key]!r}")
    if cfg["table"] is not None:
        _selector("table", cfg["table"], names=True)
    if cfg["row"] is not None:
        _selector("row", cfg["row"], names=False)
    seeds_of(cfg["seeds"])  # (iterations=, batch_size=, test_interval= are a row's keys: checked with each row)
    custom = cfg["custom"]
    bad = sorted(set(map(str, custom)) - CUSTOM_KEYS)
    if bad:
        raise ConfigError(f"custom.{bad[0]}: unknown key (allowed: {', '.join(sorted(CUSTOM_KEYS))})")
    if "table" in custom:
        check_name("custom.table", custom["table"], reserved=True)
    for key in ("row", "dataset", "solver", "feed"):
        if custom.get(key) is not None:
            check_name(f"custom.{key}", custom[key])
    if custom.get("label") is not None:
        _require(isinstance(custom["label"], (str, int, float)) and not isinstance(custom["label"], bool)
                 and str(custom["label"]).strip() != "", "custom.label", "give a text (custom.label='wide, 6 layers')",
                 custom["label"])
    for key in ("iterations", "test_interval"):
        _whole(f"custom.{key}", custom.get(key))
    if cfg.get("conf_dir") is not None:
        _folder("conf_dir", cfg["conf_dir"])
    for key in ("data_dir", "results_dir", "runs_dir"):
        _folder(key, cfg[key])
    _flag("download", cfg["download"])
    _flag("quiet", cfg["quiet"])
    _flag("svhn_extra", cfg["svhn_extra"], optional=True)
    _require(isinstance(cfg["device"], str) and cfg["device"].strip() != "", "device",
             "give auto, cpu, cuda or cuda:N", cfg["device"])
    jobs = cfg["jobs_per_device"]
    _require(jobs == "auto" or (_is_int(jobs) and 1 <= jobs <= MAX_INT), "jobs_per_device",
             f"give auto or a whole number from 1 to {MAX_INT}", jobs)
    _whole("shards", cfg.get("shards"))
    shard = cfg.get("shard")
    _require(shard is None or (_is_int(shard) and 0 <= shard <= MAX_INT), "shard",
             "give a shard number from 0 to shards-1", shard)
    stack = cfg["stack"]
    _require(stack in ("auto", "off") or (_is_int(stack) and 1 <= stack <= MAX_INT), "stack",
             "use auto, off, or the number of runs trained in one step (stack=3)", stack)
    _require(cfg["stack_mode"] in ("grouped", "branched"), "stack_mode", "use grouped or branched",
             cfg["stack_mode"])
    if cfg["precision"] is not None:
        check_precision("precision", cfg["precision"])
    logger = cfg.get("logger")
    _require(logger is None or isinstance(logger, str) or (isinstance(logger, list) and logger
                                                            and all(isinstance(x, str) for x in logger)),
             "logger", "give a logger name (csv, tensorboard, mlflow) or a list of them", logger)
    dry = cfg.get("dry_run")
    if dry is not None:
        if not isinstance(dry, dict):
            raise ConfigError(f"dry_run: expected a mapping of keys, got {dry!r}")
        bad = sorted(set(map(str, dry)) - {"iters", "batch_size"})
        if bad:
            raise ConfigError(f"dry_run.{bad[0]}: unknown key (allowed: batch_size, iters)")
        for key in ("iters", "batch_size"):
            _whole(f"dry_run.{key}", dry.get(key))
        _require(dry.get("iters") is None or dry["iters"] <= MAX_DRY_ITERS, "dry_run.iters",
                 f"an estimate times at most {MAX_DRY_ITERS} steps per network", dry.get("iters"))
    if cfg.get("bench") is not None and not isinstance(cfg["bench"], dict):
        raise ConfigError(f"bench: expected a mapping of keys, got {cfg['bench']!r}")
    profile = cfg["profile"]
    bad = sorted(set(map(str, profile)) - PROFILE_KEYS)
    if bad:
        raise ConfigError(f"profile.{bad[0]}: unknown key (allowed: {', '.join(sorted(PROFILE_KEYS))})")
    check_name("profile.name", profile.get("name"))
    if "device" in profile:
        _require(isinstance(profile["device"], str) and profile["device"].strip() != "", "profile.device",
                 "give auto, cpu, cuda or cuda:N", profile["device"])
    for key in ("train", "data"):
        if profile.get(key) is not None and not isinstance(profile[key], dict):
            raise ConfigError(f"profile.{key}: expected a mapping of keys, got {profile[key]!r}")


# --------------------------------------------------------------------------- table files (conf/tables/*.yaml)

def _text(key: str, value: Any, optional: bool = True) -> None:
    _require((optional and value is None) or isinstance(value, str), key, "must be a text", value)


def _config_choice(key: str, value: Any) -> None:
    """A row's arch/dataset/feed/solver: a config's name, or a mapping with ``base`` (the name) and overrides."""
    if isinstance(value, dict):
        if "base" not in value:
            raise ConfigError(f"{key}: a mapping needs base: NAME (the config it changes), got {value!r}")
        check_name(f"{key}.base", value["base"])
    else:
        _require(isinstance(value, str), key, "must be a config's name or a mapping with base: NAME", value)
        check_name(key, value)


TABLE_KEYS = {"table", "title", "row_defaults", "rows", "cited", "claims", "display", "axis", "note"}
ROW_KEYS = {"id", "label", "arch", "net", "dataset", "feed", "solver", "iterations", "test_interval", "paper", "note"}
ROW_REQUIRED = ("id", "label", "arch", "dataset", "solver", "iterations")  # each row's, after row_defaults


def check_table_file(raw: Any) -> None:
    """A table file's keys, their types and its rows' keys (``check_row`` checks each row after its
    row_defaults): each problem is one ConfigError naming it, never a crash of the report or the run that
    reads it."""
    if not raw:
        raise ConfigError("the table file is empty; a table needs rows (see conf/tables/table2.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping with title, rows, claims, got {type(raw).__name__}")
    bad = set(raw) - TABLE_KEYS
    if bad:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(map(str, bad)))}; allowed: {', '.join(sorted(TABLE_KEYS))}")
    if not isinstance(raw.get("row_defaults") or {}, dict) or not isinstance(raw.get("rows") or [], list):
        raise ConfigError("row_defaults must be a mapping and rows a list")
    if not raw.get("rows"):
        raise ConfigError("the table has no rows to train")
    for i, r in enumerate(raw["rows"]):
        if not isinstance(r, dict):
            raise ConfigError(f"row {i + 1} must be a mapping with id, label, net..., got {r!r}")
        bad = set(r) - ROW_KEYS
        if bad:
            raise ConfigError(f"row {r.get('id', i)}: unknown key(s) {', '.join(sorted(map(str, bad)))}; "
                              f"allowed: {', '.join(sorted(ROW_KEYS))}")
    _text("title", raw.get("title"))
    _text("note", raw.get("note"))
    _require(raw.get("display", "accuracy") in ("accuracy", "error"), "display", "must be accuracy or error",
             raw.get("display"))
    axis = raw.get("axis")
    if axis is not None:
        if not isinstance(axis, dict) or not isinstance(axis.get("rows", {}), dict):
            raise ConfigError(f"axis: must be a mapping with name and rows ({{row id: tick label}}), got {axis!r}")
        _text("axis.name", axis.get("name"))
    for key in ("cited", "claims"):
        items = raw.get(key)
        _require(items is None or isinstance(items, list), key, "must be a list of mappings", items)
        for i, item in enumerate(items or []):
            if not isinstance(item, dict):
                raise ConfigError(f"{key}[{i}]: must be a mapping, got {item!r}")
    for i, cited in enumerate(raw.get("cited") or []):
        _text(f"cited[{i}].label", cited.get("label"))
    for i, claim in enumerate(raw.get("claims") or []):
        _text(f"claims[{i}].text", claim.get("text"), optional=False)
        holds = claim.get("holds_if")
        _require(isinstance(holds, list) and all(isinstance(h, str) for h in holds), f"claims[{i}].holds_if",
                 "must be a list of comparisons such as [\"9L > 8L\"]", holds)


def check_row(row: dict) -> None:
    """One row's keys after its table's row_defaults: the required ones present, each of its type (a
    ConfigError naming the key)."""
    for key in ROW_REQUIRED:
        if key not in row:
            raise ConfigError(f"has no {key!r}")
    for key in ("arch", "dataset", "solver", "feed"):
        if row.get(key) is not None or key != "feed":
            _config_choice(key, row.get(key))
    for key in ("net", "paper"):
        if row.get(key) is not None and not isinstance(row[key], dict):
            raise ConfigError(f"{key}: must be a mapping, got {row[key]!r}")
    _text("note", row.get("note"))
    _require(_is_int(row.get("iterations")) and 1 <= row["iterations"] <= MAX_INT, "iterations",
             f"must be a whole number from 1 to {MAX_INT}", row.get("iterations"))
    if row.get("test_interval") is not None:
        _whole("test_interval", row["test_interval"])
