"""simpnet from Python: what the command line does, as functions (re-exported by ``simpnet_cli``).

    import simpnet_cli
    model = simpnet_cli.build_model(table=4, row="WE10")                      # the row's network, untrained
    model = simpnet_cli.build_model(table=4, row="WE10", net={"dropout": {"head": 0.3}}, dataset="cifar100")
    runs = simpnet_cli.read_runs(table=4)                                      # results/table4.csv as a DataFrame

Overrides are the command line's keys: ``dataset="cifar100"`` is ``dataset=cifar100``, ``net={"widths": "C64{3}"}``
(or ``**{"net.widths": "C64{3}"}``) is ``net.widths=C64{3}``. They go through the same composition and checks as
``simpnet show``, so a bad key or an impossible network is the same one-line ``UserError``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value and all(isinstance(k, str) and k.isidentifier() for k in value):
        return [pair for key, inner in value.items() for pair in _flat(f"{prefix}.{key}", inner)]
    return [(prefix, value)]


def _word(value: Any) -> str:
    """A Python value as the command line writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, dict):  # Hydra's grammar: {1-3: 0.2, head: 0.3}, keys unquoted
        return "{" + ", ".join(f"{key}: {_word(inner)}" for key, inner in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_word(inner) for inner in value) + "]"
    if isinstance(value, str) and not value.startswith("C") and any(c in value for c in ",[]{}=:' "):
        return json.dumps(value)  # a string Hydra would split or read as a structure
    return str(value)


def overrides_from(**overrides: Any) -> list[str]:
    """``key=value`` strings of the command line for Python keyword overrides (dicts become dotted keys)."""
    return [f"{key}={_word(value)}" for name, given in overrides.items() for key, value in _flat(name, given)]


def resolve(table: str | int, row: str | int, seed: int = 0, **overrides: Any):
    """The ``RunSpec`` of one row of ``table`` with ``overrides``, as ``simpnet show`` resolves it."""
    from simpnet_cli import commands
    from simpnet_cli.errors import UserError

    cfg, variant = commands.compose([f"table={table}", f"row={row}", f"seeds=[{int(seed)}]", *overrides_from(**overrides)])
    runs = commands.plan_runs(cfg, variant)
    if len(runs) != 1:
        raise UserError(f"table={table} row={row} names {len(runs)} runs; build_model builds one row's network")
    return runs[0]


def build_model(table: str | int, row: str | int, seed: int = 0, device: str = "cpu", **overrides: Any):
    """The network of ``row`` of ``table`` (with ``overrides``), initialised as a run of ``seed`` starts
    (the row's fillers), untrained, in train mode."""
    import torch

    from simpnet_cli.nets import modules as M

    run = resolve(table, row, seed, **overrides)
    torch.manual_seed(run.seed)  # as train.loop.build seeds a run before it builds the network
    return M.build_model(run.spec, run.in_shape, run.net).to(device)


def read_runs(table: str | int, results_dir: str | Path = "results"):
    """Every run recorded in ``results_dir/table<N>.csv`` as a pandas DataFrame (one line per run: row, seed,
    variant, params, accuracies, time, status, config hash, run folder); empty when nothing is recorded."""
    import pandas as pd

    from simpnet_cli.errors import UserError
    from simpnet_cli.runs import results

    path = results.csv_path(Path(results_dir), str(table).removeprefix("table"))
    if not path.exists():
        return pd.DataFrame(columns=list(results.COLUMNS))
    rows, bad = results.read(path)
    if bad and not rows:
        raise UserError(f"{path}: no line could be read (`simpnet repair table={table}` rebuilds it)")
    return pd.DataFrame(rows)
