"""The paper's tables as configs: conf/tables/table<N>.yaml, each row on top of an arch template.

A table file holds ``row_defaults`` (arch, dataset, solver, iterations shared by its rows), ``rows`` (each
with an ``id``, the paper's ``label``, its ``net`` keys on top of the arch template and its ``paper``
figures), ``cited`` rows of other papers (never trained) and ``claims`` (comparisons between row ids).
``resolve`` turns a row into a ``RunSpec``: everything a run needs, and nothing else, so its hash is the
run's identity.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from simpnet_cli import network
from simpnet_cli.errors import UserError

# The config tree: conf/ beside the package, or the folder named by SIMPNET_CONF_DIR (a copy of conf/ with
# tables, rows or solvers of one's own; the CLI's Hydra config is read from there as well).
DEFAULT_CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = Path(os.environ.get("SIMPNET_CONF_DIR") or DEFAULT_CONF_DIR).expanduser().resolve()
ROW_KEYS = {"id", "label", "arch", "net", "dataset", "solver", "iterations", "paper", "note"}
TABLE_KEYS = {"table", "title", "row_defaults", "rows", "cited", "claims", "display", "axis", "note"}


def _yaml(path: Path) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except FileNotFoundError:
        raise UserError(f"missing config file {path}") from None
    except Exception as err:  # a YAML syntax error: name the file, keep the parser's first line
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def table_names(conf_dir: Path = CONF_DIR) -> list[str]:
    """Table names in the paper's order: 2, 3, ..., 14, 14b."""
    names = [p.stem.removeprefix("table") for p in (conf_dir / "tables").glob("table*.yaml")]
    return sorted(names, key=lambda n: (int(re.match(r"\d+", n)[0]), n))


def load_named(kind: str, value: Any, conf_dir: Path = CONF_DIR) -> dict:
    """A config-group entry: a name (``adadelta_30k``) or a mapping ``{base: name, **overrides}``.

    Overrides replace whole top-level values (a row's ``schedule`` replaces the base's, points and all),
    so a row never inherits stray entries from its base."""
    if isinstance(value, str):
        base, overrides = value, {}
    elif isinstance(value, dict) and "base" in value:
        base, overrides = value["base"], {k: v for k, v in value.items() if k != "base"}
    else:
        raise UserError(f"{kind} must be a name from conf/{kind}/ or a mapping with 'base', got {value!r}")
    path = conf_dir / kind / f"{base}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in (conf_dir / kind).glob("*.yaml")))
        raise UserError(f"unknown {kind} {base!r}; known: {known}")
    return {**_yaml(path), **overrides}


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
        """A row by id, by the paper's label, or by 0-based index."""
        for i, r in enumerate(self.rows):
            if str(selector) in (r["id"], r["label"], str(i)):
                return r
        ids = ", ".join(r["id"] for r in self.rows)
        raise UserError(f"table {self.name} has no row {selector!r}; its rows: {ids}")


@lru_cache(maxsize=None)
def load_table(name: str, conf_dir: Path = CONF_DIR) -> Table:
    name = str(name).removeprefix("table")
    path = conf_dir / "tables" / f"table{name}.yaml"
    if not path.exists():
        raise UserError(f"unknown table {name!r}; known: {', '.join(table_names(conf_dir))}, all")
    raw = _yaml(path)
    bad = set(raw) - TABLE_KEYS
    if bad:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(bad))}; allowed: {', '.join(sorted(TABLE_KEYS))}")
    defaults = raw.get("row_defaults") or {}
    rows = []
    for i, r in enumerate(raw.get("rows") or []):
        bad = set(r) - ROW_KEYS
        if bad:
            raise UserError(f"{path}: row {r.get('id', i)}: unknown key(s) {', '.join(sorted(bad))}; "
                            f"allowed: {', '.join(sorted(ROW_KEYS))}")
        row = _deep_merge(defaults, r)
        for key in ("id", "label", "arch", "dataset", "solver", "iterations"):
            if key not in row:
                raise UserError(f"{path}: row {r.get('id', i)} has no {key!r}")
        row["id"] = str(row["id"])
        rows.append(row)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: duplicate row ids {ids}")
    return Table(name, raw.get("title", ""), rows, raw.get("cited") or [], raw.get("claims") or [],
                 raw.get("display", "accuracy"), path, raw.get("axis"))


def load_tables(selector: Any = "all", conf_dir: Path = CONF_DIR) -> list[Table]:
    """``all``, one name (``4``, ``table4``, ``14b``) or a list of names."""
    if isinstance(selector, (list, tuple, ListConfig)):
        return [t for s in selector for t in load_tables(s, conf_dir)]
    if str(selector) == "all":
        return [load_table(n, conf_dir) for n in table_names(conf_dir)]
    return [load_table(str(selector), conf_dir)]


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

    @cached_property  # frozen dataclass: cached_property writes the instance's __dict__ directly
    def spec(self) -> tuple:
        return network.build_spec(self.net, self.dataset["classes"])

    @property
    def in_shape(self) -> network.Shape:
        return network.Shape(self.dataset["channels"], self.dataset["size"], self.dataset["size"])

    def identity(self) -> dict:
        """What makes two runs the same run: the network, data, solver, schedule and seed, not the labels."""
        return {"spec": repr(self.spec), "dataset": self.dataset, "solver": self.solver,
                "train": {k: v for k, v in self.train.items() if k not in NON_IDENTITY_TRAIN_KEYS},
                "seed": self.seed}

    @cached_property
    def config_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"table": self.table, "row_id": self.row_id, "label": self.label, "seed": self.seed,
                "net": self.net, "dataset": self.dataset, "solver": self.solver, "train": self.train,
                "paper": self.paper, "variant": self.variant, "config_hash": self.config_hash}


# Keys that change how a run is executed or recorded but not what it computes.
NON_IDENTITY_TRAIN_KEYS = {"checkpoint_every", "graphs"}


def resolve(table: Table, row: dict, seed: int, profile: dict, run_opts: dict | None = None,
            data_opts: dict | None = None) -> RunSpec:
    """Merge template, row, dataset, solver and profile into a RunSpec, and check the network builds.

    ``run_opts`` override training keys (precision); ``data_opts`` maps a dataset name to keys that
    override its config (``{"svhn": {"extra": True}}``)."""
    where = f"table {table.name}, row {row['id']}"
    try:
        arch = load_named("arch", row["arch"])
        net = _deep_merge(arch, row.get("net") or {})
        dataset = load_named("dataset", row["dataset"])
        solver = load_named("solver", row["solver"])
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    profile_train = dict(profile.get("train") or {})
    iterations = int(profile_train.pop("iterations", None) or row["iterations"])
    train = {"iterations": iterations, **profile_train, **(run_opts or {})}
    dataset = {**dataset, **(data_opts or {}).get(dataset["name"], {}), **(profile.get("data") or {})}
    spec = RunSpec(table.name, row["id"], row["label"], int(seed), net, dataset, solver, train,
                   dict(row.get("paper") or {}))
    try:
        network.check(spec.spec, spec.in_shape)
    except UserError as err:  # NotationError, NetworkError, ...: keep the type, say which row
        err.args = (f"{where}: {err}",)  # (re-creating it would need each subclass's own arguments)
        raise
    return spec


def to_plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
