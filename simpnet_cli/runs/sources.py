"""results/table<N>.source.json: where a table of one's own came from, kept beside its results.

A table from a ``conf_dir`` is found only while that folder is on the search path; ``simpnet report`` without
``conf_dir=`` would otherwise show its runs under a bare name, without the title, claims or axis the table
file gives them. ``simpnet run`` therefore keeps a copy of what the report reads from the table file (title,
display, axis, claims, cited rows and each row's id, label, dataset and paper figures) with the file's path,
and the report uses it when the table is not on the search path. The built-in tables need no copy.
"""
from __future__ import annotations

import json
from pathlib import Path

from simpnet_cli.config import tables

ROW_KEYS = ("id", "label", "dataset", "feed", "paper")


def source_path(results_dir: Path, name: str) -> Path:
    return Path(results_dir) / f"table{name}.source.json"


def is_own(table: tables.Table) -> bool:
    """A table read from a file outside the built-in conf/ (a conf_dir's)."""
    if table.path is None:
        return False
    try:
        table.path.resolve().relative_to(tables.DEFAULT_CONF_DIR)
        return False
    except ValueError:
        return True


def describe(table: tables.Table) -> dict:
    """What the report needs of ``table``, as JSON."""
    return {"table": table.name, "file": str(table.path), "title": table.title, "display": table.display,
            "axis": table.axis, "claims": table.claims, "cited": table.cited,
            "rows": [{k: row[k] for k in ROW_KEYS if k in row} for row in table.rows]}


def remember(results_dir: Path, table: tables.Table) -> Path | None:
    """Keep ``table``'s description beside its results if it is a table of one's own (rewritten only when the
    table file changed); None for a built-in table."""
    from simpnet_cli.files import write_json_unless_same  # (torch with it: only `run` writes, the report reads)

    if not is_own(table):
        return None
    return write_json_unless_same(source_path(results_dir, table.name), describe(table))


def recall(results_dir: Path, name: str) -> tables.Table | None:
    """The table ``name`` as ``remember`` kept it, or None if nothing (readable) was kept; ``path`` is None, as
    for any table whose file is not at hand (its parameters are counted from its runs)."""
    try:
        kept = json.loads(source_path(results_dir, name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or not isinstance(kept.get("rows"), list):
        return None
    rows = [dict(r, id=str(r["id"]), label=str(r.get("label", r["id"])))
            for r in kept["rows"] if isinstance(r, dict) and "id" in r]
    listed = lambda key: kept.get(key) if isinstance(kept.get(key), list) else []  # noqa: E731
    return tables.Table(str(name), str(kept.get("title") or ""), rows, listed("cited"), listed("claims"),
                        str(kept.get("display") or "accuracy"), None,
                        kept.get("axis") if isinstance(kept.get("axis"), dict) else None)
