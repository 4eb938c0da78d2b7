"""results/table<N>.csv: one line per finished run, appended atomically, read back with every bad line reported.

Several processes (packed runs, SLURM jobs) append to the same file. Each append takes an exclusive
``flock`` on a sidecar lock file and writes the whole line with one ``write`` on an O_APPEND descriptor,
then fsyncs, so a line is either wholly there or not at all. A line torn by an older crash (a machine
lost power mid-write before this scheme, or a file edited by hand) is never dropped silently: readers
return it as a ``BadLine`` and the next append starts on a fresh line so it cannot glue onto it.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import math
import os
import re
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from simpnet_cli.errors import UserError

COLUMNS = [
    "table", "row", "row_id", "variant", "seed", "dataset", "params_paper", "params_total", "paper_params", "paper_acc",
    "final_acc", "best_acc", "best_iter", "iterations", "epochs", "wall_s", "img_per_s", "device", "precision",
    "step_mode", "profile", "status", "config_hash", "run_dir", "finished_at",
]
NUMERIC = {"seed", "params_paper", "params_total", "final_acc", "best_acc", "best_iter", "iterations",
           "epochs", "wall_s", "img_per_s"}
STATUSES = {"ok", "diverged"}
# Columns that may be empty: ``variant`` is empty for a paper's row as printed (no overrides).
MAY_BE_EMPTY = {"variant"}
# Columns added after the first release: a file written before them reads them as these values.
LATER_COLUMNS = {"variant": "", "step_mode": "eager"}
# The last column: a line torn inside it still has every field, so its form is checked (an ISO 8601 time
# to the second; the writer adds a Z).
FINISHED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?")


@dataclass(frozen=True)
class BadLine:
    path: Path
    lineno: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.why}: {self.text[:80]!r}"


def csv_path(results_dir: Path, table: str) -> Path:
    return Path(results_dir) / f"table{table}.csv"


@contextmanager
def _locked(path: Path):
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _format(row: dict) -> str:
    missing = [c for c in COLUMNS if row.get(c) is None or (row.get(c) == "" and c not in MAY_BE_EMPTY)]
    if missing:
        raise ValueError(f"result row lacks {missing}")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([row[c] for c in COLUMNS])
    return buf.getvalue()


class DamagedResults(UserError):
    """A results file that cannot be read back reliably: nothing is appended to it until it is repaired."""


BOM = "\ufeff"  # a spreadsheet that re-saves the file as "UTF-8 with BOM" puts this before the header
OLD_COLUMNS = [c for c in COLUMNS if c not in LATER_COLUMNS]  # the layout before `variant` and `step_mode`


def _header_kind(header: list[str]) -> str:
    """``current``, ``old`` (written before the later columns: migrated on the next append) or ``damaged``."""
    if header == COLUMNS:
        return "current"
    if header == OLD_COLUMNS:
        return "old"
    return "damaged"


def _first_line(path: Path) -> str:
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as fh:
        return fh.readline().rstrip("\r\n").removeprefix(BOM)


def repair_hint(path: Path) -> str:
    return (f"run `simpnet repair table={path.stem.removeprefix('table')} results_dir={path.parent}` to rewrite it "
            f"from its good lines and the runs' folders (the damaged file is kept as a backup)")


def check_appendable(path: Path) -> None:
    """Raise ``DamagedResults`` unless ``path`` is absent, empty or starts with a header we can read back."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    header = next(csv.reader([_first_line(path)]), [])
    if _header_kind(header) == "damaged":
        raise DamagedResults(f"{path}: its header line is damaged ({','.join(header)[:60]!r}), so its lines cannot "
                             f"be matched to runs and nothing is appended; {repair_hint(path)}")


def _migrate(path: Path) -> None:
    """Rewrite a file of the old layout with the current header and the later columns' defaults (under the lock)."""
    rows, bad = read(path)
    if bad:
        raise DamagedResults(f"{path}: written by an older simpnet and holding {len(bad)} damaged line(s); "
                             f"{repair_hint(path)}")
    text = ",".join(COLUMNS) + "\n" + "".join(_format({**row}) for row in rows)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def append(results_dir: Path, table: str, row: dict) -> Path:
    """Append one run's row to results/table<N>.csv (header first if the file is new)."""
    path = csv_path(results_dir, table)
    line = _format(row)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            check_appendable(path)
            if path.exists() and path.stat().st_size and \
                    _header_kind(next(csv.reader([_first_line(path)]))) == "old":
                _migrate(path)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                prefix = ""
                if size == 0:
                    prefix = ",".join(COLUMNS) + "\n"
                else:
                    with open(path, "rb") as fh:
                        fh.seek(size - 1)
                        if fh.read(1) != b"\n":
                            prefix = "\n"  # an older torn line: keep it (reported by read), start afresh
                data = (prefix + line).encode()
                try:
                    written = os.write(fd, data)
                    if written != len(data):  # a full disk takes part of a line: take it back
                        raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
                    os.fsync(fd)
                except OSError:
                    with suppress(OSError):  # under the lock, so the file still ends where we found it
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
    except OSError as err:
        why = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
        raise UserError(f"cannot write results to {path}: {why}") from None
    return path


def _check(rec: dict) -> str | None:
    for c in NUMERIC:
        try:
            v = float(rec[c])
        except (TypeError, ValueError):
            return f"column {c} is not a number ({rec[c]!r})"
        if c in ("final_acc", "best_acc") and rec["status"] == "ok" and not (0 <= v <= 100):
            return f"column {c} out of range ({v})"
        if not math.isfinite(v) and rec["status"] == "ok":
            return f"column {c} is not finite"
    if rec["status"] not in STATUSES:
        return f"unknown status {rec['status']!r}"
    if "finished_at" in rec and not FINISHED_AT.fullmatch(rec["finished_at"]):
        return f"column finished_at is not a time ({rec['finished_at']!r}): torn or edited line"
    return None


def read(path: Path) -> tuple[list[dict], list[BadLine]]:
    """Every well-formed row of one CSV (numbers as floats/ints) and every line that is not."""
    path = Path(path)
    if not path.exists():
        return [], []
    rows, bad = [], []
    text = path.read_text(errors="replace").removeprefix(BOM)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return [], []
    header = next(csv.reader([lines[0]]), [])
    kind = _header_kind(header)
    if kind == "damaged":
        # Read the lines by the layout this version writes, so the report still shows every good line.
        bad.append(BadLine(path, 1, lines[0], "damaged header (lines read by the current column layout)"))
        header = COLUMNS
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            fields = next(csv.reader([line]))
        except csv.Error as err:
            bad.append(BadLine(path, n, line, f"unparsable ({err})"))
            continue
        layout = header if kind != "damaged" or len(fields) != len(OLD_COLUMNS) else OLD_COLUMNS
        if len(fields) != len(layout):
            bad.append(BadLine(path, n, line, f"{len(fields)} fields, expected {len(header)} (torn or edited line)"))
            continue
        rec = {**LATER_COLUMNS, **dict(zip(layout, fields))}
        why = _check(rec)
        if why:
            bad.append(BadLine(path, n, line, why))
            continue
        for c in NUMERIC:
            rec[c] = int(float(rec[c])) if c in ("seed", "params_paper", "params_total", "best_iter", "iterations") \
                else float(rec[c])
        rows.append(rec)
    return rows, bad


def recorded(results_dir: Path, table: str) -> set[tuple[str, str, int]]:
    """(row_id, config_hash, seed) of every run already in the table's CSV: these are not recorded twice."""
    rows, _ = read(csv_path(results_dir, table))
    return {(r["row_id"], r["config_hash"], int(r["seed"])) for r in rows}


def key(rec: dict) -> tuple[str, str, str, int]:
    """What identifies a recorded run in a table: at most one line per key, whatever happened before."""
    return (str(rec["table"]), str(rec["row_id"]), str(rec["config_hash"]), int(rec["seed"]))


RECORDS = "records.json"  # in each run folder: {table: the CSV line recorded for it}, for `simpnet repair`


def repair(results_dir: Path, table: str, runs_dir: Path) -> dict:
    """Rewrite results/table<N>.csv from its good lines and the lines its runs' folders remember.

    The good lines are kept in order (a damaged header or a BOM does not lose them), duplicates dropped, runs
    recorded in ``runs_dir/*/records.json`` but missing from the file added back; the old file is kept beside
    it as ``table<N>.csv.damaged-<time>``. Returns counts of what it did."""
    import json
    import shutil
    import time

    path = csv_path(results_dir, table)
    with _locked(path) if path.parent.is_dir() else suppress():
        rows, bad = read(path)
        kept, seen = [], set()
        for rec in rows:
            if key(rec) not in seen:
                seen.add(key(rec))
                kept.append(rec)
        recovered = 0
        for records in sorted(Path(runs_dir).glob(f"*/{RECORDS}")):
            try:
                rec = json.loads(records.read_text()).get(str(table))
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(rec, dict) and set(COLUMNS) <= set(rec) and key(rec) not in seen:
                seen.add(key(rec))
                kept.append(rec)
                recovered += 1
        backup = None
        if path.exists():
            backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.copy2(path, backup)
        if not kept and not path.exists():
            return {"kept": 0, "recovered": 0, "dropped": 0, "duplicates": 0, "backup": None}
        text = ",".join(COLUMNS) + "\n" + "".join(_format(rec) for rec in kept)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot rewrite {path}: {err.strerror or err}; the original is unchanged") from None
    dropped = [b for b in bad if b.lineno != 1 or "header" not in b.why]
    return {"kept": len(kept) - recovered, "recovered": recovered, "dropped": len(dropped),
            "duplicates": len(rows) - (len(kept) - recovered), "backup": backup}
