"""The paper's tables as configs: conf/tables/table<N>.yaml, each row on top of an arch template.

A table file holds ``row_defaults`` (arch, dataset, feed, solver, iterations, test_interval and ``net`` recipe keys
shared by its rows), ``rows`` (each with an ``id``, the paper's ``label``, its ``net`` keys on top of the arch
template and its ``paper`` figures), ``cited`` rows of other papers (never trained) and ``claims`` (comparisons between row ids).
``resolve`` turns a row into a ``RunSpec``: everything a run needs, and nothing else, so its hash is the
run's identity.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from simpnet_cli.nets import specs as network
from simpnet_cli.config import schemas
from simpnet_cli.errors import UserError
from simpnet_cli.nets.notation import format_widths, parse_widths
from simpnet_cli.config.variants import RowOverrides, assign

# The config tree: conf/ beside the package, searched after a folder of one's own (``conf_dir=PATH`` on the
# command line, or SIMPNET_CONF_DIR) holding any of tables/, arch/, solver/, dataset/ with files of one's own.
DEFAULT_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONF_KINDS = ("tables", "arch", "solver", "dataset", "feed", "profile")
# A row that names no test interval is evaluated as most of the authors' runs were (the schema's default).
DEFAULT_TEST_INTERVAL = schemas.Train.eval_every


class ConfSearch:
    """Where named configs and tables are looked for: a folder of one's own (``conf_dir=``), then the built-in
    conf/. One object, ``SEARCH``, that a command sets (``use``) and that ``scoped`` puts back as it was when the
    command ends, so an in-process command leaves no folder of its own behind for the next one."""

    def __init__(self) -> None:
        self.dirs: list[Path] = [DEFAULT_CONF_DIR]

    def use(self, path: Path | None) -> None:
        """Search ``path`` before the built-in conf/ for tables and named configs."""
        wanted = [path] if path is not None and path != DEFAULT_CONF_DIR else []
        if wanted + [DEFAULT_CONF_DIR] != self.dirs:
            self.dirs = wanted + [DEFAULT_CONF_DIR]
            load_table.cache_clear()

    @contextlib.contextmanager
    def scoped(self):
        """The search path as it is now, put back when the block ends (a command run in-process)."""
        before = list(self.dirs)
        try:
            yield self
        finally:
            self.use(before[0] if len(before) > 1 else None)


SEARCH = ConfSearch()


def user_conf_dir(value: Any = None) -> Path | None:
    """The folder of one's own: ``value`` (conf_dir=), else SIMPNET_CONF_DIR, else none."""
    raw = value if value not in (None, "") else os.environ.get("SIMPNET_CONF_DIR")
    if not raw:
        return None
    path = Path(str(raw)).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"conf_dir {path} is not a folder (conf_dir=PATH or SIMPNET_CONF_DIR names a folder "
                        f"with tables/ and optionally arch/, solver/, dataset/)")
    if path != DEFAULT_CONF_DIR and not any((path / kind).is_dir() for kind in CONF_KINDS):
        raise UserError(f"conf_dir {path} has none of the folders {', '.join(CONF_KINDS)}; put your table files "
                        f"in {path / 'tables'}/")
    return path


def use_conf_dir(path: Path | None) -> None:
    """Search ``path`` before the built-in conf/ (``SEARCH.use``)."""
    SEARCH.use(path)


def conf_dirs() -> list[Path]:
    return list(SEARCH.dirs)


def find_config(kind: str, name: str) -> Path | None:
    """``<dir>/<kind>/<name>.yaml`` in the first folder of the search path that has it."""
    for root in SEARCH.dirs:
        path = root / kind / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def known_names(kind: str) -> list[str]:
    return sorted({p.stem for root in SEARCH.dirs for p in (root / kind).glob("*.yaml")})


def _yaml(path: Path) -> dict:
    """A config file's contents (a fresh copy: callers may change it). Parsed once per version of the file: a
    command that resolves every row reads the same few files hundreds of times."""
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        raise UserError(f"missing config file {path}") from None
    return copy.deepcopy(_parsed_yaml(str(path), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=512)
def _parsed_yaml(path: str, mtime_ns: int, size: int) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except FileNotFoundError:
        raise UserError(f"missing config file {path}") from None
    except Exception as err:  # a YAML syntax error: name the file, keep the parser's first line
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def _table_name(path: Path) -> str:
    return path.stem.removeprefix("table") or path.stem


def _paper_order(name: str) -> tuple:
    """The paper's tables in its order (2, 3, ..., 14, 14b), then tables of one's own by name."""
    number = re.match(r"\d+", name)
    return (0, int(number[0]), name) if number else (1, 0, name)


def table_names(conf_dir: Path | None = None) -> list[str]:
    """Every table name on the search path (or in one ``conf_dir``), in the paper's order."""
    roots = [conf_dir] if conf_dir is not None else SEARCH.dirs
    names = {_table_name(p) for root in roots for p in (root / "tables").glob("*.yaml")}
    return sorted(names, key=_paper_order)


def table_path(name: str) -> Path | None:
    """A table's file: ``tables/table<name>.yaml`` or ``tables/<name>.yaml``, a folder of one's own first."""
    for root in SEARCH.dirs:
        for path in (root / "tables" / f"table{name}.yaml", root / "tables" / f"{name}.yaml"):
            if path.is_file():
                return path
    return None


def load_named(kind: str, value: Any, conf_dir: Path | None = None) -> dict:
    """A config-group entry: a name (``adadelta_30k``) or a mapping ``{base: name, **overrides}``.

    Overrides replace whole top-level values (a row's ``schedule`` replaces the base's, points and all),
    so a row never inherits stray entries from its base."""
    if isinstance(value, str):
        base, overrides = value, {}
    elif isinstance(value, dict) and "base" in value:
        base, overrides = value["base"], {k: v for k, v in value.items() if k != "base"}
    else:
        raise UserError(f"{kind} must be a name from conf/{kind}/ or a mapping with 'base', got {value!r}")
    schemas.check_name(kind, base)  # a name, never a path: conf/<kind>/../../x.yaml is not a config
    path = (conf_dir / kind / f"{base}.yaml") if conf_dir is not None else find_config(kind, str(base))
    if path is None or not path.is_file():
        raise UserError(f"unknown {kind} {base!r}; known: {', '.join(known_names(kind))}")
    loaded = _yaml(path)
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of keys, got {type(loaded).__name__}")
    return {**loaded, **overrides}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: list[dict]
    cited: list[dict] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    display: str = "accuracy"  # "error" for Tables 13-14, which print 100 - accuracy
    path: Path | None = None
    axis: dict | None = None   # the table's ablation axis for the report's figure (see report)

    def select(self, selector: Any = None) -> list[dict]:
        """Every row (``None``), or the rows one selector or a list of selectors name."""
        if selector is None:
            return list(self.rows)
        return [self.row(s) for s in (selector if isinstance(selector, (list, tuple)) else [selector])]

    def row(self, selector: Any) -> dict:
        """A row by its id, else by the paper's label. Never by position: ``row=0`` is the row whose id is 0,
        and a table without one says so (it trained the first row, whatever that was)."""
        for key in ("id", "label"):
            for r in self.rows:
                if str(selector) == r[key]:
                    return r
        ids = ", ".join(r["id"] for r in self.rows)
        position = " (rows are chosen by id, not by position)" if isinstance(selector, int) else ""
        raise UserError(f"table {self.name} has no row {selector!r}{position}; its row ids: {ids}")


@lru_cache(maxsize=None)
def load_table(name: str) -> Table:
    name = str(name).removeprefix("table") if str(name) != "table" else str(name)
    schemas.check_name("table", name)  # a name, never a path (table=../tables/table2)
    path = table_path(name)
    if path is None:
        raise UserError(f"unknown table {name!r}; known: {', '.join(table_names())}, all"
                        + (f" (searched {', '.join(str(d / 'tables') for d in SEARCH.dirs)})" if len(SEARCH.dirs) > 1 else ""))
    raw = _yaml(path)
    try:
        schemas.check_table_file(raw)  # its keys, their types, and each row's keys before row_defaults apply
    except schemas.ConfigError as err:
        raise schemas.ConfigError(f"{path}: {err}") from None
    defaults = raw.get("row_defaults") or {}
    rows = []
    for i, r in enumerate(raw["rows"]):
        row = _deep_merge(defaults, r)
        try:
            # checked here, whatever the profile: a smoke profile replaces iterations, and the error must not
            # wait for the full run; an empty id or label would fail only when the run is recorded
            schemas.check_row(row)
            schemas.check_record(_table_name(path), row["id"], row["label"], "-", row.get("paper") or {})
        except schemas.ConfigError as err:
            raise schemas.ConfigError(f"{path}: row {r.get('id', i)}: {err}") from None
        row["id"] = str(row["id"])
        rows.append(row)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: duplicate row ids {ids}")
    return Table(name, raw.get("title", ""), rows, raw.get("cited") or [], raw.get("claims") or [],
                 raw.get("display", "accuracy"), path, raw.get("axis"))


def load_tables(selector: Any = "all") -> list[Table]:
    """``all``, one name (``4``, ``table4``, ``14b``, ``mine``) or a list of names."""
    if isinstance(selector, (list, tuple, ListConfig)):
        return [t for s in selector for t in load_tables(s)]
    if str(selector) == "all":
        return [load_table(n) for n in table_names()]
    return [load_table(str(selector))]


def custom_table(name: str, arch: str, defaults: dict) -> Table:
    """A network that is in no table (``simpnet run arch=arch2 'net.widths=...'``): one row on the ``arch``
    template, trained with ``defaults`` (dataset, solver, iterations) unless the command line says otherwise,
    and recorded under the table ``name``.

    Without ``custom.row`` the row is the template's (id ``arch2``) and the command line's network keys are a
    variant of it. With ``custom.row=NAME`` the network is a row of its own, named so: the command line's
    network (arch=, net.*) and configs (dataset=, solver=, feed=) define that row rather than vary it, so
    networks with rows of their own sit side by side in the table's one section."""
    schemas.check_name("custom.table", name, reserved=True)
    if table_path(str(name)) is not None:
        raise UserError(f"custom.table={name} is the name of an existing table; give your network another name")
    row_name = defaults.get("row")
    if row_name is not None:
        schemas.check_name("custom.row", row_name)
    label = defaults.get("label")
    if label is None and row_name is None:
        label = f"{arch} (a network of your own)"
    # A named row without custom.label is labelled by its template and widths when it resolves (resolve: the
    # widths it parses there, once)
    row = {"id": str(arch if row_name is None else row_name), "label": None if label is None else str(label),
           "arch": str(arch),
           "fit_pools": True, "own_row": row_name is not None,
           "dataset": defaults.get("dataset", "cifar10"), "solver": defaults.get("solver", "adadelta_30k"),
           "iterations": defaults.get("iterations", 30000)}
    for key in ("feed", "test_interval"):  # unset: the dataset's usual feed, every 500 iterations
        if defaults.get(key) is not None:
            row[key] = defaults[key]
    return Table(str(name), "Networks of your own", [row])


# --------------------------------------------------------------------------- resolved runs

@dataclass(frozen=True)
class RunSpec:
    """One row of one table with one seed, fully resolved: what ``train.train_run`` consumes."""
    table: str
    row_id: str
    label: str
    seed: int
    net: dict          # the arch template with the row's ``net`` keys on top
    dataset: dict
    solver: dict
    train: dict        # iterations, batch_size, eval_every, checkpoint_every, precision, data subset...
    paper: dict
    variant: str = ""  # the overrides that made this run differ from the paper's row ("" = the row as printed)
    # net.widths parsed once, where the run is composed (None for families without widths); not identity: the
    # spec built from it is.
    widths: tuple | None = field(default=None, repr=False, compare=False)
    # What was adapted to make the row build, said to the user (the template's pools cut for a shallow network);
    # not identity: the network they describe is.
    notes: tuple = field(default=(), compare=False)
    # "" for a run trained alone; "grouped K" or "branched K" for one of K runs trained in one shared step
    # (train/together.py). Identity: a shared step computes the run in another order (grouped convolutions and a
    # batched classifier; on a GPU, other kernels and, in a graph, other dropout draws), and in fp32 a rounding
    # difference that crosses a ReLU's or a max-pool's decision grows over training into another figure. So a
    # stacked run is a computation of its own; a run trained alone keeps the paper row's hash.
    step: str = ""

    @cached_property  # frozen dataclass: cached_property writes the instance's __dict__ directly
    def spec(self) -> tuple:
        net = self.net if self.widths is None else {**self.net, "widths": list(self.widths)}
        return network.build_spec(net, self.dataset["classes"])

    @cached_property
    def training(self) -> schemas.Train:
        """The run's training keys as their typed schema (checked when the run resolved): each default where
        the schema writes it, once."""
        return schemas.Train(**self.train)

    @property
    def in_shape(self) -> network.Shape:
        return network.Shape(self.dataset["channels"], self.dataset["size"], self.dataset["size"])

    def identity(self) -> dict:
        """What makes two runs the same run: the network, data, solver, schedule and seed, not the labels."""
        return {**self._unseeded, "seed": self.seed, **({"step": self.step} if self.step else {})}

    @cached_property
    def _unseeded(self) -> dict:
        return {"spec": repr(self.spec), "recipe": network.recipe(self.spec, self.net), "dataset": self.dataset,
                "solver": self.solver,
                "train": {k: v for k, v in self.train.items() if k not in NON_IDENTITY_TRAIN_KEYS}}

    @cached_property
    def config_hash(self) -> str:
        return _digest(self.identity())

    @cached_property
    def computation(self) -> str:
        """The run's identity but its seed, hashed: the runs of one computation are its seeds, and only they are
        pooled into one figure (the report). Not the config hash, which stays what it was."""
        return _digest({k: v for k, v in self.identity().items() if k != "seed"})  # (a stacked run's step too)

    def _sharing(self, **changes) -> "RunSpec":
        """This run with ``changes`` to its seed or step, sharing its built network and the rest of its identity
        (neither changes them): a command with seeds=30000 resolves each row once, not once per seed."""
        run = dataclasses.replace(self, **changes)
        run.__dict__["spec"], run.__dict__["_unseeded"] = self.spec, self._unseeded
        return run

    def with_seed(self, seed: int) -> "RunSpec":
        """This run with another seed."""
        return self._sharing(seed=int(seed))

    @cached_property
    def alone_hash(self) -> str:
        """The config hash this run has when trained alone (its own hash unless it is a stacked run's)."""
        return self.in_step("").config_hash if self.step else self.config_hash

    def in_step(self, step: str) -> "RunSpec":
        """This run as trained in a shared step (``step``: "grouped K", "branched K"; "" alone): another hash."""
        return self._sharing(step=step)

    @property
    def shared_step(self) -> tuple[str, int]:
        """(how, K) of the shared step this run is computed in; ("separate", 1) for a run trained alone."""
        if not self.step:
            return "separate", 1
        how, k = self.step.split()
        return how, int(k)

    @property
    def param_mults(self) -> dict:
        """Caffe's lr/decay multipliers with conv indices resolved for this network (solvers.param_groups)."""
        return network.recipe(self.spec, self.net)["param_mults"]

    def recipe(self) -> dict:
        """How this run trains beyond its layers and solver, in the keys and vocabulary of the reference's
        ``recipe`` (../shared/reference/experiments.yaml), so the two compare key for key."""
        return {"input": self.dataset.get("input"), "augment": self.dataset.get("augment"),
                "test_transform": self.dataset.get("test_transform"), **network.recipe(self.spec, self.net),
                "test_interval": self.train.get("eval_every")}

    def to_dict(self) -> dict:
        return {"table": self.table, "row_id": self.row_id, "label": self.label, "seed": self.seed,
                "net": self.net, "dataset": self.dataset, "solver": self.solver, "train": self.train,
                "paper": self.paper, "variant": self.variant, "config_hash": self.config_hash,
                **({"step": self.step} if self.step else {}),
                **({"notes": list(self.notes)} if self.notes else {})}


# Keys that change how a run is executed or recorded but not what it computes.
NON_IDENTITY_TRAIN_KEYS = {"checkpoint_every", "graphs"}


def _digest(identity: dict) -> str:
    """A run's identity (or a part of it) as 16 hex digits of its SHA-256 (keys sorted: the same run, one hash)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def computation_of(config: dict) -> str | None:
    """The computation (``RunSpec.computation``) of a run folder's config.yaml (``RunSpec.to_dict``); None
    unless the config rebuilds to the config hash it names (a run of an older simpnet whose identity was
    computed otherwise, or a damaged file)."""
    try:
        run = RunSpec(str(config["table"]), str(config["row_id"]), str(config.get("label", "")),
                      int(config["seed"]), dict(config["net"]), dict(config["dataset"]), dict(config["solver"]),
                      dict(config["train"]), dict(config.get("paper") or {}), step=str(config.get("step") or ""))
        return run.computation if run.config_hash == str(config.get("config_hash")) else None
    except Exception:  # noqa: BLE001 - any config that does not rebuild has no computation we can vouch for
        return None


def _parts(row: dict, profile: dict, run_opts: dict | None, data_opts: dict | None,
           overrides: RowOverrides | None) -> tuple[dict, dict, dict, dict, tuple | None, tuple]:
    """(net, dataset, solver, train, parsed widths, notes) of a row: its configs, then the profile, then the
    command line. ``net.widths`` is parsed here and only here; ``notes`` say what was adapted."""
    over = overrides or RowOverrides()
    choices = over.choices
    net = _deep_merge(load_named("arch", choices.get("arch", row["arch"])), row.get("net") or {})
    dataset = load_named("dataset", choices["dataset"] if "dataset" in choices else row["dataset"])
    # The dataset file names what the data is; the feed (input, augment, test_transform) how the row's authors
    # fed it. A row or table naming no feed gets the dataset's usual one (its file's ``feed`` pointer).
    usual_feed = dataset.pop("feed", None)
    feed_choice = choices.get("feed", row.get("feed", usual_feed))
    if feed_choice is None:
        raise UserError(f"no feed for dataset {dataset.get('name')!r}: name one in the row (feed: NAME, from "
                        f"conf/feed/: {', '.join(known_names('feed'))}) or feed=NAME on the command line")
    feed = load_named("feed", feed_choice)
    for key, value in over.assigned("feed"):
        feed = assign(feed, key, value)
    solver = load_named("solver", choices["solver"] if "solver" in choices else row["solver"])
    profile_train = {k: v for k, v in (profile.get("train") or {}).items() if v is not None}  # null: the row's
    iterations = profile_train.pop("iterations", None)  # 0 is a value (refused later), not "unset"
    train = {"iterations": row["iterations"] if iterations is None else iterations,
             "eval_every": row.get("test_interval", DEFAULT_TEST_INTERVAL), **profile_train,
             **(run_opts or {}), **over.train()}
    dataset = {**dataset, **feed, **(data_opts or {}).get(dataset.get("name"), {}), **(profile.get("data") or {})}
    for key, value in over.assigned("net"):
        net = assign(net, key, value)
    widths = tuple(parse_widths(net["widths"])) if "widths" in net else None
    notes = ()
    assigned = [key for key, _ in over.assigned("net")]
    if widths is not None and (row.get("fit_pools") or "widths" in assigned):
        # A network of one's own, or a row given other widths, keeps the per-layer keys of its template and row
        # that exist in it (Arch2's pools [4, 7, 9, 12] on six layers: [4]; WE10's dropout on convs 1-3 on one
        # layer: conv 1), and says so: a silently different network would be mistaken for the template's. Keys
        # set on the command line are the user's and are not touched; a network they fit is left as it is.
        who = over.choices.get("arch", row["arch"]) if row.get("fit_pools") else row["id"]
        net, notes = fit_to_depth(net, len(widths), who, assigned)
    for key, value in over.assigned("dataset"):
        dataset = assign(dataset, key, value)
    given = []
    for key, value in over.assigned("solver"):
        solver = assign(solver, key, value)
        if key == "schedule" and isinstance(value, dict):
            given += list(map(str, value))
        elif key.startswith("schedule."):
            given.append(key.split(".")[1])
    schemas.check_schedule_keys(solver.get("schedule"), given)
    return net, dataset, solver, train, widths, notes


# Per-layer keys of a plain network, as layer ranges ({"1-3": 0.2}) or lists of layer numbers, over its convs;
# dropout.pool counts pools, not convs (the j-th pool in order).
CONV_RANGES = ("kernels", "paddings", "groups", "conv_suffix", "dropout.conv")
CONV_LISTS = ("init.on_convs", "param_mults.convs.indices")


def _fit_ranges(table: dict, n: int) -> dict:
    """Layer ranges cut to layers 1-n: a range past n is dropped, one that crosses it ends at n."""
    out = {}
    for key, value in table.items():
        lo, _, hi = str(key).partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not hi)):
            out[key] = value  # not a range: the builder names it
            continue
        lo, hi = int(lo), int(hi or lo)
        if lo <= n:
            out[key if hi <= n else (f"{lo}-{n}" if lo < n else str(lo))] = value
    return out


def fit_to_depth(net: dict, n: int, who: str, assigned: list[str]) -> tuple[dict, tuple[str, ...]]:
    """``net`` with its per-layer keys fitted to ``n`` conv layers, and a note for each key that changed
    ("arch2's pools_after [4,7,9,12] adapted to [4] for 6 layers; set net.pools_after=[..] to place them").
    Keys in ``assigned`` (set on the command line, or under one that is) are left as given."""
    def given(path: str) -> bool:
        return any(k == path or k.startswith(path + ".") or path.startswith(k + ".") for k in assigned)

    def get(path: str):
        value = net
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    notes, fitted = [], {}
    pools = get("pools_after")
    if isinstance(pools, list) and not given("pools_after"):
        fitted["pools_after"] = [i for i in pools if not isinstance(i, int) or i <= n]
    n_pools = len(fitted.get("pools_after", pools if isinstance(pools, list) else []))
    for path in CONV_RANGES + ("dropout.pool",):
        value = get(path)
        if isinstance(value, dict) and not given(path):
            fitted[path] = _fit_ranges(value, n_pools if path == "dropout.pool" else n)
    for path in CONV_LISTS:
        value = get(path)
        if isinstance(value, list) and not given(path):
            fitted[path] = [i for i in value if not isinstance(i, int) or i <= n]
    bn_after = get("bn_after_pool")
    if isinstance(bn_after, list) and not given("bn_after_pool") and "pools_after" in fitted:
        fitted["bn_after_pool"] = [i for i in bn_after if i in fitted["pools_after"]]
    for path, value in fitted.items():
        before = get(path)
        if value == before:
            continue
        net = assign(net, path, value)
        hole = "[..]" if isinstance(value, list) else "{..}"
        notes.append(f"{who}'s {path} {_word(before)} adapted to {_word(value)} for {n} layer{'s' * (n != 1)}; "
                     f"set net.{path}={hole} to place them")
    return net, tuple(notes)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _unnamed_changes(run: RunSpec, profile: dict, base_profile: dict | None, run_opts: dict | None,
                     data_opts: dict | None) -> list[tuple[str, Any]]:
    """What the command line changed outside a row's own keys that this run computes with: profile.* keys that
    differ from the profile's file, precision=, svhn_extra= (for the dataset it concerns)."""
    changes = []
    if base_profile is not None:
        base, now = _flat(base_profile), _flat(profile)
        for key in sorted(set(base) | set(now)):
            part, _, name = key.partition(".")
            if part not in ("train", "data") or name in NON_IDENTITY_TRAIN_KEYS or base.get(key) == now.get(key):
                continue
            changes.append((f"profile.{key}", now.get(key)))
    for key, value in (run_opts or {}).items():
        if value is not None and value != (base_profile or {}).get("train", {}).get(key):
            changes.append((key, value))
    name = run.dataset.get("name")
    for key, value in ((data_opts or {}).get(name) or {}).items():
        changes.append((f"{name}_{key}", value))
    return changes


def resolve(table: Table, row: dict, seed: int, profile: dict, run_opts: dict | None = None,
            data_opts: dict | None = None, overrides: RowOverrides | None = None,
            base_profile: dict | None = None) -> RunSpec:
    """Merge template, row, dataset, solver, profile and command-line overrides into a RunSpec; check every
    key against the schema and that the network builds. Errors name the row, its file and the key.

    ``run_opts`` override training keys (precision); ``data_opts`` maps a dataset name to keys that
    override its config (``{"svhn": {"extra": True}}``); ``overrides`` are a variant's (see config/variants.py)."""
    where = f"table {table.name}, row {row['id']}" + (f" ({table.path})" if table.path else "")
    if overrides:
        where += f" with {overrides.text()}"
    try:
        net, dataset, solver, train, widths, notes = _parts(row, profile, run_opts, data_opts, overrides)
        schemas.check_run(net, dataset, solver, train)
        label = row["label"]
        if label is None:  # a named network of one's own: its template and widths, as `show` spells them
            arch = (overrides or RowOverrides()).choices.get("arch", row["arch"])
            label = f"{arch}: {format_widths(list(widths))}" if widths is not None else str(arch)
        schemas.check_record(table.name, row["id"], label, dataset.get("name"), row.get("paper") or {})
        spec = RunSpec(table.name, row["id"], label, int(seed), net, dataset, solver, train,
                       dict(row.get("paper") or {}), widths=widths, notes=notes)
        network.check(spec.spec, spec.in_shape)
        network.check_recipe(spec.spec, net)
    except UserError as err:  # NotationError, NetworkError, ...: keep the type, say which row
        err.args = (f"{where}: {err}",)  # (re-creating it would need each subclass's own arguments)
        raise
    unnamed = _unnamed_changes(spec, profile, base_profile, run_opts, data_opts)
    if overrides or unnamed:
        # A variant is named by its overrides and by the other keys that change what this run computes
        # (profile.*, precision, svhn_extra), unless together they change nothing (dataset=cifar10 on a CIFAR-10
        # row): then it is the paper's row under its profile, and is recorded (and skipped) as that row.
        over = overrides or RowOverrides()
        # A group choice that is the row's own (dataset=cifar10 on a CIFAR-10 row) changes nothing: not named.
        same = tuple(g for g, choice in over.choices.items()
                     if table.path is not None and isinstance(row.get(g), str) and row[g] == choice)
        words = over.text(skip=_defining(table, row, over) + same, widths=spec.widths)
        variant = " ".join([words] * bool(words) + [f"{k}={_word(v)}" for k, v in unnamed])
        if table.path is not None and variant:
            plain = resolve(table, row, seed, profile if base_profile is None else base_profile)
            variant = "" if plain.config_hash == spec.config_hash else variant
        spec = dataclasses.replace(spec, variant=variant)
    return spec


def _defining(table: Table, row: dict, over: RowOverrides) -> tuple:
    """The overrides that define a row rather than vary it, so no variant names them: a network of one's own
    is on the template arch= chose; a named one (custom.row=) is also its net.* keys and its configs."""
    if table.path is not None:
        return ()
    if not row.get("own_row"):
        return ("arch",)
    return tuple(over.choices) + tuple(key for key, _ in over.assignments if key.startswith("net."))


def _word(value: Any) -> str:
    """A value as the command line writes it: true/false, 4, 0.5, [1,2]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def to_plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
