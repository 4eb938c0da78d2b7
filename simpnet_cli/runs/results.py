"""results/table<N>.csv: the format of a table's index of finished runs, read tolerantly, written atomically.

The file is an index (runs/index.py rebuilds it from the run folders), never appended to: it is written whole
to a temporary file beside it and renamed over it, so readers see the old file or the new one. It is still
read tolerantly, because it may come from an older simpnet (which appended to it), a spreadsheet (BOM,
reordered columns) or an editor: columns are matched by header name, never by position, an exact duplicate
line counts once, and every line that is not a finished run of the file's table is returned as a ``BadLine``
(the report lists it; a rebuild drops it and keeps the old file as a backup).
"""
from __future__ import annotations

import csv
import errno
import io
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from simpnet_cli.errors import UserError

# counted_params: the network's conv and classifier parameters as the paper counts them (BatchNorm excluded),
# counted by simpnet; params_total: every trainable parameter; paper_params, paper_acc: the figures the paper prints.
COLUMNS = [
    "table", "row", "row_id", "variant", "seed", "dataset", "counted_params", "params_total", "paper_params", "paper_acc",
    "final_acc", "best_acc", "best_iter", "iterations", "epochs", "wall_s", "img_per_s", "device", "precision",
    "step_mode", "profile", "status", "config_hash", "computation", "run_dir", "finished_at",
]
NUMERIC = {"seed", "counted_params", "params_total", "final_acc", "best_acc", "best_iter", "iterations",
           "epochs", "wall_s", "img_per_s"}
INTEGER = {"seed", "counted_params", "params_total", "best_iter", "iterations"}
STATUSES = {"ok", "diverged"}
# Columns that may be empty: ``variant`` is empty for a paper's row as printed (no overrides); ``computation``
# (tables.RunSpec.computation: the run's identity but its seed) where a line's run is not known to be of one.
MAY_BE_EMPTY = {"variant", "computation"}
# Columns added after the first release: a file written before them reads them as these values.
LATER_COLUMNS = {"variant": "", "step_mode": "eager", "computation": ""}
# Columns renamed since: a file (or a line to format) with the old name reads as the new one. (params_paper held
# the counted parameters beside paper_params, the printed figure.)
RENAMED = {"params_paper": "counted_params"}
# An ISO 8601 time to the second (the writer adds a Z): a line torn inside its last column fails this.
FINISHED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?")
BOM = "\ufeff"  # a spreadsheet that re-saves the file as "UTF-8 with BOM" puts this before the header
HEADER = ",".join(COLUMNS) + "\n"


@dataclass(frozen=True)
class BadLine:
    path: Path
    lineno: int
    text: str
    why: str
    duplicate: bool = False  # an exact copy of an earlier line: it carries nothing, so dropping it loses nothing

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.why}: {self.text[:80]!r}"


@dataclass(frozen=True)
class Line:
    """A good line: its number, its fields as written (by column name) and as values (numbers parsed)."""
    lineno: int
    raw: dict
    rec: dict


def csv_path(results_dir: Path, table: str) -> Path:
    return Path(results_dir) / f"table{table}.csv"


def table_of(path: Path) -> str:
    return Path(path).name.removeprefix("table").removesuffix(".csv")


def format_line(row: dict) -> str:
    """One CSV line (with its newline) in the column order of ``COLUMNS``."""
    row = {"computation": "", **{RENAMED.get(k, k): v for k, v in row.items()}}  # (unknown for older records)
    missing = [c for c in COLUMNS if row.get(c) is None or (row.get(c) == "" and c not in MAY_BE_EMPTY)]
    if missing:
        raise ValueError(f"result row lacks {missing}")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([row[c] for c in COLUMNS])
    return buf.getvalue()


def check_values(values: dict) -> str | None:
    """What a line holding ``values`` (a run's result.json, by column) would be refused for, judged on those
    columns alone: a run folder whose result cannot be indexed is found when it is read, not after a command has
    skipped it as recorded."""
    rec = {RENAMED.get(k, k): v for k, v in values.items()}
    rec.setdefault("status", "ok")
    return _check_numbers(rec, [c for c in sorted(NUMERIC) if c in rec]) or (
        None if rec["status"] in STATUSES else f"unknown status {rec['status']!r}")


def _check(rec: dict) -> str | None:
    why = _check_numbers(rec, NUMERIC)
    if why:
        return why
    if rec["status"] not in STATUSES:
        return f"unknown status {rec['status']!r}"
    if not FINISHED_AT.fullmatch(rec["finished_at"]):
        return f"column finished_at is not a time ({rec['finished_at']!r}): torn or edited line"
    return None


def _check_numbers(rec: dict, columns) -> str | None:
    for c in columns:
        try:
            v = float(rec[c])
        except (TypeError, ValueError):
            return f"column {c} is not a number ({rec[c]!r})"
        if c in ("final_acc", "best_acc") and rec["status"] == "ok" and not (0 <= v <= 100):
            return f"column {c} out of range ({v})"
        if not math.isfinite(v) and rec["status"] == "ok":
            return f"column {c} is not finite"
        if c in INTEGER and not (math.isfinite(v) and v == int(v)):
            # a count or a seed is a whole number whatever the status (a diverged run's accuracy may be NaN)
            return f"column {c} is not a whole number ({rec[c]!r})"
    return None


def typed(raw: dict) -> dict:
    """A line's fields with its numbers as ints and floats."""
    rec = dict(raw)
    for c in NUMERIC:
        rec[c] = int(float(rec[c])) if c in INTEGER else float(rec[c])
    return rec


def parse(path: Path, table: str | None = None) -> tuple[list[Line], list[BadLine]]:
    """Every good line of one CSV and every line that is not, for the table ``table`` (by default the one the
    file's name says). Columns are found by their header names."""
    path = Path(path)
    table = table_of(path) if table is None else str(table)
    if not path.exists():
        return [], []
    lines = path.read_text(errors="replace").removeprefix(BOM).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return [], []
    header = [RENAMED.get(h.strip(), h.strip()) for h in next(csv.reader([lines[0]]), [])]
    missing = [c for c in COLUMNS if c not in header and c not in LATER_COLUMNS]
    if missing or len(set(header)) != len(header):
        why = "damaged header: its lines cannot be matched to columns (`simpnet repair` rebuilds the file from " \
              "the run folders)"
        return [], [BadLine(path, 1, lines[0], why)] + [
            BadLine(path, n, line, "not read: the header line is damaged")
            for n, line in enumerate(lines[1:], 2) if line.strip()]
    good, bad, seen = [], [], {}
    for n, line in enumerate(lines[1:], 2):
        text = line.rstrip("\r")
        if not text.strip():
            continue
        if text in seen:
            bad.append(BadLine(path, n, text, f"duplicate of line {seen[text]} (counted once)", duplicate=True))
            continue
        seen[text] = n
        try:
            fields = next(csv.reader([text]))
        except csv.Error as err:
            bad.append(BadLine(path, n, text, f"unparsable ({err})"))
            continue
        if len(fields) != len(header):
            bad.append(BadLine(path, n, text, f"{len(fields)} fields, expected {len(header)} (torn or edited line)"))
            continue
        raw = {**LATER_COLUMNS, **{h: f for h, f in zip(header, fields) if h in COLUMNS}}
        why = _check(raw)
        if why is None and raw["table"] != table:
            why = f"a line of table {raw['table']!r} in the file of table {table!r}"
        if why:
            bad.append(BadLine(path, n, text, why))
            continue
        good.append(Line(n, raw, typed(raw)))
    return good, bad


def read(path: Path) -> tuple[list[dict], list[BadLine]]:
    """Every well-formed row of one CSV (numbers as floats/ints) and every line that is not."""
    good, bad = parse(path)
    return [line.rec for line in good], bad


def key(rec: dict) -> tuple[str, str, str, int]:
    """What identifies a recorded run in a table: at most one line per key."""
    return (str(rec["table"]), str(rec["row_id"]), str(rec["config_hash"]), int(float(rec["seed"])))


def _why(err: OSError) -> str:
    return "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))


def write(path: Path, lines: list[str]) -> None:
    """Replace ``path`` with the header and ``lines`` (each from ``format_line`` or a line read back verbatim):
    written to a temporary file in the same folder, fsynced and renamed, so a reader or a crash sees the old
    file or the new one, and two writers racing leave one of their files whole."""
    path = Path(path)
    data = (HEADER + "".join(lines)).encode()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write results to {path}: {_why(err)}; the file is as it was") from None
