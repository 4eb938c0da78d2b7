"""Variants of a row from the command line: ``dataset=cifar100``, ``solver.lr=0.05``, ``net.dropout.head=0.3``.

A row resolves to four parts (``net``, ``dataset``, ``solver``, ``train``); a variant changes them in the order
a Hydra user expects: the row, then the profile, then the command line. Three kinds of override exist:

* a group choice replaces a part of every row: ``arch=arch3`` (the network template under the row's own
  ``net`` keys), ``dataset=cifar100``, ``feed=mean_file_mirror``, ``solver=nesterov_80k``;
* a dotted key sets one value inside a part, on top of the row's: ``net.widths='C64{3}, C128{4}'``,
  ``net.pools_after=[3,7]``, ``net.bn_fraction=0.99``, ``feed.augment=pad4_crop32_mirror``, ``solver.lr=0.05``,
  ``solver.schedule.steps=[20000,40000]``, ``dataset.size=28``;
* ``iterations=``, ``batch_size=`` and ``test_interval=`` set the training length, batch and test interval, over
  the profile's.

Hydra parses and sweeps them (``-m dataset=cifar10,cifar100``) and composes them into its config;
``compose.row_overrides`` reads them from there into a ``RowOverrides`` that ``tables.resolve`` applies to each
row, and names them in the ``variant`` column of the results. A key that does not exist is caught by the schema when the row resolves, naming the key and the row.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from simpnet_cli.config import schemas
from simpnet_cli.errors import UserError
from simpnet_cli.nets.notation import format_widths

GROUPS = ("arch", "dataset", "feed", "solver")   # config groups a row names; a choice replaces the row's own
PARTS = ("net", "dataset", "feed", "solver")     # parts whose keys may be set one by one (net.X, feed.X, ...)
# Top-level keys that set the row's training length, batch and test interval, and the train key each sets.
TRAIN_KEYS = {"iterations": "iterations", "batch_size": "batch_size", "test_interval": "eval_every"}
# The longest run of digits a value may hold: the schemas refuse anything past 20 digits by its range, but Python
# refuses to even read a number of 4300 digits (Hydra's parser then raises a ValueError of its own).
MAX_DIGITS = 1000


@dataclass(frozen=True)
class RowOverrides:
    """Group choices (``{"dataset": "cifar100"}``) and dotted assignments (``("solver.lr", 0.05)``)."""
    choices: dict = field(default_factory=dict)
    assignments: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.choices or self.assignments)

    def assigned(self, part: str) -> list[tuple[str, Any]]:
        """The assignments inside one part, with the part's prefix removed: [("dropout.head", 0.3)]."""
        return [(key.split(".", 1)[1], value) for key, value in self.assignments if key.startswith(part + ".")]

    def train(self) -> dict:
        return {TRAIN_KEYS[key]: value for key, value in self.assignments if key in TRAIN_KEYS}

    def text(self, skip: Iterable[str] = (), widths: Iterable[int] | None = None) -> str:
        """The compact form recorded in the ``variant`` column: ``dataset=cifar100 net.dropout.head=0.3``."""
        items = [(g, self.choices[g]) for g in GROUPS if g in self.choices and g not in skip]
        items += sorted((k, v) for k, v in self.assignments if k not in skip)
        return " ".join(f"{key}={_compact(key, value, widths)}" for key, value in items)


def _compact(key: str, value: Any, widths: Iterable[int] | None = None) -> str:
    if key == "net.widths" and isinstance(value, str):
        # one spelling per network ("C64, C64" and "C64{2}" are the same widths), from the widths the run parsed
        return format_widths(list(widths)).replace(" ", "") if widths is not None else value.replace(" ", "")
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return f"{value:g}" if isinstance(value, float) else str(value)


def is_row_key(key: str) -> bool:
    return key in GROUPS or key in TRAIN_KEYS or key.split(".", 1)[0] in PARTS and "." in key


def prepare(args: list[str]) -> list[str]:
    """Command-line overrides as Hydra must see them.

    A row's part is empty in the top-level config (it comes from the row), so ``net.widths=..`` must add the key:
    it becomes ``++net.widths=..``. A ``C_x{y}`` value is quoted, since Hydra's grammar reads ``{`` as a
    dictionary and ``,`` as a sweep: ``net.widths=C64{3}, C128`` is one network, not two."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+")
        if eq and not bare.lstrip("~").strip():
            raise UserError(f"{arg[:40]!r}: an override is KEY=VALUE and this one has no key (e.g. seeds=2)")
        digits = max((len(run) for run in re.findall(r"\d+", value)), default=0)
        if digits > MAX_DIGITS:
            raise UserError(f"{key}: a number of {digits} digits; no key takes one (counts stop at "
                            f"{schemas.MAX_INT}, seeds at {schemas.MAX_SEED})")
        if eq and bare.split(".", 1)[0] in PARTS and "." in bare:
            if bare == "net.widths" and re.match(r"\s*\$?\s*C", value):
                quote = '"' if "'" in value else "'"
                value = f"{quote}{value}{quote}"
            if not key.startswith("+") and not key.startswith("~"):
                key = "++" + key
            arg = f"{key}={value}"
        elif eq and bare.split(".")[:2] in (["profile", "train"], ["profile", "data"]) and bare.count(".") == 2:
            # A profile's part may be absent from its file (the full profile has no `data:`): a key of the part's
            # schema is added; any other is refused here, named as typed.
            schema = schemas.Train if bare.split(".")[1] == "train" else schemas.Dataset
            allowed = list(schema.__dataclass_fields__)
            if bare.split(".")[2] not in allowed:
                raise UserError(f"{bare}: unknown key (allowed: {', '.join(allowed)})")
            if not key.startswith(("+", "~")):
                arg = f"++{arg}"
        elif eq and bare in GROUPS + ("profile",) and "(" not in value:
            # A config's name (or a sweep of names): Hydra takes anything else for a mapping or a list and fails
            # with a ValueError of its own; a path (dataset=../x) would read a file outside conf/.
            for name in value.split(","):
                schemas.check_config_name(bare, name.strip().strip("'\""))
        elif eq and bare.startswith("arch."):
            raise UserError(f"{arg}: set network keys with net.KEY (net.{bare.split('.', 1)[1]}=...), "
                            f"and choose a template with arch=NAME")
        out.append(arg)
    return out


def assign(target: dict, dotted: str, value: Any) -> dict:
    """``target`` with ``dotted`` (``dropout.head``) set to ``value``, creating mappings on the way; replaces the
    value at that key (a mapping given on the command line replaces the row's mapping, as in Hydra)."""
    out = dict(target)
    head, _, rest = dotted.partition(".")
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    out[head] = assign(inner if isinstance(inner, dict) else {}, rest, value)
    return out
