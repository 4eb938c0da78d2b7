"""One composition: the command line's overrides -> Hydra's config -> the row overrides every chosen row takes.

Hydra parses each override once, while composing ``conf/config.yaml`` (defaults list, config groups, the
profile); nothing parses them again. (A sweep, ``-m``, is first split into its jobs by Hydra's sweeper; each job
is then composed as one command.) Rows are not composed by Hydra one by one: that would parse the command line
again for every row of every table (at ~160 ms a composition), where one composition serves them all.

A row's parts are empty in the top-level config (``net: {}``), so the keys the command line sets inside them
(``solver.lr=0.05``, ``net.widths='C64{3}, C128'``) are exactly what Hydra put there: ``RowOverrides`` names
those keys (the text before ``=``) and takes their values from the composed config.
``tables.resolve`` then lays them over each row's own configs into a ``RunSpec``, checked once by the schemas.

The path of ``solver.lr`` from the command line to the optimizer: Hydra (``compose``) -> ``row_overrides`` ->
``tables.resolve`` (into ``RunSpec.solver``) -> ``solvers.make_optimizer`` -> ``solvers.lr_at`` each iteration
(tests/test_variants.py traces it).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from simpnet_cli.config import schemas, tables, variants
from simpnet_cli.config.variants import RowOverrides
from simpnet_cli.errors import UserError


def config_dirs(overrides: list[str]) -> tuple[Path, list[str]]:
    """Hydra's primary config folder and the search-path override that adds the other one.

    A folder of one's own (``conf_dir=PATH`` or SIMPNET_CONF_DIR) is searched before the built-in conf/ for
    tables and named configs; if it holds a whole copy of conf/ (with config.yaml) Hydra reads that copy."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("conf_dir=")]
    user = tables.user_conf_dir(given[-1] if given else None)
    tables.use_conf_dir(user)
    if user is None:
        return tables.DEFAULT_CONF_DIR, []
    primary, other = (user, tables.DEFAULT_CONF_DIR) if (user / "config.yaml").is_file() \
        else (tables.DEFAULT_CONF_DIR, user)
    return primary, [f"hydra.searchpath=[file://{other}]"]


def hydra_error(err: Exception, primary: Path | None = None) -> UserError:
    """Hydra's and OmegaConf's multi-line errors as one line (``primary``: the config folder composed, named
    when the error is its config.yaml's)."""
    import yaml

    cause = err if str(err).strip() or err.__cause__ is None else err.__cause__  # (an empty wrapper: its cause)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(err).__name__
    config = (primary or tables.DEFAULT_CONF_DIR) / "config.yaml"
    if isinstance(err, yaml.YAMLError) or "defaults must be a list" in first or "must be a DictConfig" in first:
        return UserError(f"{config}: {' '.join(str(err).split())[:300]} (its keys are those of "
                         f"{tables.DEFAULT_CONF_DIR / 'config.yaml'})")
    # a folder of one's own with its config.yaml: Hydra's message may be that file's (an interpolation, a key)
    said = "bad override" if primary in (None, tables.DEFAULT_CONF_DIR) else f"bad override or {config}"
    hint = ""
    if "LexerNoViableAlt" in first:  # Hydra's grammar has no rule for the value (custom.label=héllo)
        key = first.split(": ", 1)[-1].split("=", 1)[0].lstrip("+~")
        odd = "".join(sorted({c for c in first if not c.isascii()}))
        hint = (f" (a value with {'non-ASCII letters such as ' + repr(odd) if odd else 'spaces or symbols'} "
                f"needs quotes: '{key}=\"...\"', as one shell word)")
    if "not in struct" in str(err) or "Could not override" in str(err) or "Key '" in str(err):
        hint = " (unknown config key; see conf/config.yaml for the keys, and net.KEY, solver.KEY, dataset.KEY " \
               "for a row's own)"
    if "Could not find '" in first:
        hint = " (no such config file; see conf/ for the names)"
    return UserError(f"{said}: {first}{hint}")


def defaults_loop(primary: Path) -> UserError:
    return UserError(f"{primary / 'config.yaml'}: its defaults include the config itself, directly or through "
                     f"another file (a loop); remove that entry")


def compose(overrides: list[str]) -> tuple[DictConfig, RowOverrides]:
    """(the config for ``overrides``, their row overrides), with Hydra's errors turned into one line each and
    every top-level key checked (schemas.check_top)."""
    import yaml
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    primary, search = config_dirs(overrides)
    if not (primary / "config.yaml").is_file():
        raise UserError(f"no config.yaml in the config directory {primary}")
    prepared = variants.prepare(overrides)
    try:
        with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=prepared + search)
    except (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        # (ValueError: Hydra's own for a value it cannot take, e.g. a config.yaml whose defaults is no list)
        raise hydra_error(err, primary) from None
    except RecursionError:
        raise defaults_loop(primary) from None
    schemas.check_top(tables.to_plain(cfg))
    return cfg, row_overrides(cfg, prepared)


def row_overrides(cfg: DictConfig, overrides: Iterable[str]) -> RowOverrides:
    """The row overrides of a composed config: the keys the command line set inside a row (``solver.lr``,
    ``net.dropout.conv``, ``iterations``) with the values Hydra composed for them, and the group choices
    (``dataset=cifar100``, a config's name). A key given twice counts once, with Hydra's (the last) value.

    A mapping replaces the row's mapping at that key (``net.dropout.conv={1-2: 0.1}``: only convs 1-2 drop); a
    group chosen in the same command is a file Hydra composed, so a mapping merges into that file's, as in Hydra."""
    choices: dict[str, str] = {}
    assignments: dict[str, Any] = {}
    for arg in overrides:
        key, eq, text = arg.partition("=")
        if not eq or key.startswith("~"):
            continue
        key = key.lstrip("+")
        if not variants.is_row_key(key):
            continue
        if key in variants.GROUPS:  # a config's name (prepare checked it), or null: the row's own
            name = text.strip().strip("'\"")
            if name in ("null", ""):
                choices.pop(key, None)
            else:
                choices[key] = name
            continue
        value = OmegaConf.select(cfg, key)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if key in variants.TRAIN_KEYS and value is None:  # iterations=null: the row's and the profile's
            continue
        assignments.pop(key, None)  # a later value of the same key: in the order of the command line
        assignments[key] = value
    return RowOverrides(choices, tuple(assignments.items()))


def overrides_of(args: Iterable[str]) -> RowOverrides:
    """The row overrides that ``simpnet run <args>`` would apply (for tools and tests that resolve rows
    themselves): composed by Hydra as on the command line, once per distinct command line (a composition costs
    Hydra ~0.1-0.5 s; the result is frozen)."""
    return _overrides_of(tuple(args), os.environ.get("SIMPNET_CONF_DIR"))


@lru_cache(maxsize=256)
def _overrides_of(args: tuple[str, ...], conf_dir_env: str | None) -> RowOverrides:
    return compose(list(args))[1]
