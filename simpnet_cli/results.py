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


def append(results_dir: Path, table: str, row: dict) -> Path:
    """Append one run's row to results/table<N>.csv (header first if the file is new)."""
    path = csv_path(results_dir, table)
    line = _format(row)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
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
        raise UserError(f"cannot write results to {path}: {err.strerror or err}") from None
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
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return [], []
    header = next(csv.reader([lines[0]]))
    if header != COLUMNS and not set(COLUMNS) - set(LATER_COLUMNS) <= set(header):
        return [], [BadLine(path, 1, lines[0], "header does not have the expected columns")]
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            fields = next(csv.reader([line]))
        except csv.Error as err:
            bad.append(BadLine(path, n, line, f"unparsable ({err})"))
            continue
        if len(fields) != len(header):
            bad.append(BadLine(path, n, line, f"{len(fields)} fields, expected {len(header)} (torn or edited line)"))
            continue
        rec = {**LATER_COLUMNS, **dict(zip(header, fields))}
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
