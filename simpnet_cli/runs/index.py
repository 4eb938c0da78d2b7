"""results/table<N>.csv as an index rebuilt from the run folders, which are the truth.

A run folder ``runs_dir/<config_hash>/`` is written by one process at a time (runner.RunLock) and holds
``config.yaml`` (the resolved run, written when it starts) and, once finished, ``result.json`` (written last,
atomically; ``seal`` then adds the run's ``config_hash``, ``table``, ``row_id``, ``seed`` and ``finished_at``,
which the training loop does not write). Which tables
a run belongs to is kept beside them in ``records/``: one small JSON file per (results_dir, table, row) that
asked for the run, written when the command plans to train or record it. Its fields are the CSV's columns that
depend on the row rather than on the run (label, variant, paper figures, profile, run_dir): Table 2's 8L is
Table 7's and Table 9's 3x3-300K, one folder with three records.

``rebuild`` writes a table's CSV from the folders that hold a record for that table and that results_dir,
whole, through a temporary file and a rename. Nothing is ever appended, so concurrent commands cannot
interleave or tear lines; two rebuilds racing leave the file of the last one to rename, and each rebuild
checks after its rename that no run finished in between (if one did, it rebuilds again), so the last file
holds every finished run. A run killed between its result.json and the rebuild is indexed by the next
command's rebuild or by ``simpnet repair``.

A folder is refused, with a warning, never indexed, when its result.json or config.yaml names another run
than the folder's name (a swapped or copied folder must never put 9L's figures on 8L's line). A result.json
without a ``config_hash`` (written by an older simpnet, or by a process killed before the runner stamped it)
is accepted only if its parameter counts are those of the network in config.yaml.

Lines of the existing CSV (read tolerantly: results.parse) that no folder provides are not lost: a line
whose run folder is under runs_dir and finished is adopted (a record is written for it, so folders written
by an older simpnet, which kept no records/, are reindexed as they were); any other line (its folder deleted,
refused, or under another runs_dir) is carried over verbatim with a warning, and still counts as recorded
(it is not trained again; delete the line to drop it). Lines that are not finished runs of the table (torn,
junk) are dropped with a warning, and the old file is kept as ``table<N>.csv.damaged-<time>``. The
``records.json`` of older versions is not read: it did not say for which results_dir a line was recorded.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from simpnet_cli.errors import UserError
from simpnet_cli.files import write_json, write_json_unless_same
from simpnet_cli.runs import results

RECORDS = "records"
RESULT = "result.json"
CONFIG = "config.yaml"
# The CSV's columns that depend on the table row (kept in its record) and on the run (kept in result.json, whose
# params_paper is the CSV's counted_params: results.format_line renames it).
RECORD_COLUMNS = ["table", "row", "row_id", "variant", "seed", "dataset", "paper_params", "paper_acc", "profile",
                  "config_hash", "run_dir"]
RESULT_COLUMNS = ["params_paper", "params_total", "final_acc", "best_acc", "best_iter", "iterations", "epochs",
                  "wall_s", "img_per_s", "device", "precision", "step_mode", "status"]
RESULT_DEFAULTS = {"step_mode": "eager"}  # result.json files written before the column
HASH = re.compile(r"[A-Za-z0-9_-]+")  # a config_hash read from a CSV line, before it is used as a folder name


class Refused(Exception):
    """A run folder whose files do not belong together: never indexed."""


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def results_key(results_dir: Path) -> str:
    """How a record names its results_dir: the absolute path, so every spelling of one folder agrees."""
    return str(Path(results_dir).resolve())


# --------------------------------------------------------------------------- records

def record_of(run, run_dir: Path, profile: str) -> dict:
    """The row-dependent columns of a run's line in its table (``run``: a tables.RunSpec)."""
    return {"table": run.table, "row": run.label, "row_id": run.row_id, "variant": run.variant, "seed": run.seed,
            "dataset": run.dataset["name"], "paper_params": run.paper.get("params", "-"),
            "paper_acc": run.paper.get("acc", "-"), "profile": profile, "config_hash": run.config_hash,
            "run_dir": str(run_dir)}


def record_path(run_dir: Path, results_dir: Path, table: str, row_id: str) -> Path:
    digest = hashlib.sha256(json.dumps([results_key(results_dir), str(table), str(row_id)]).encode()).hexdigest()
    return Path(run_dir) / RECORDS / f"table{re.sub(r'[^A-Za-z0-9_.-]', '_', str(table))}-{digest[:16]}.json"


def write_record(run_dir: Path, results_dir: Path, record: dict) -> Path:
    """Say that ``run_dir``'s run belongs to ``record``'s table row in ``results_dir`` (idempotent)."""
    record = {"results_dir": results_key(results_dir), **record}
    return write_json_unless_same(record_path(run_dir, results_dir, record["table"], record["row_id"]), record)


def _records(runs_dir: Path, results_dir: Path, table: str | None = None):
    """(run folder, record) of every record under ``runs_dir`` for ``results_dir`` (and ``table``)."""
    want = results_key(results_dir)
    for path in sorted(Path(runs_dir).glob(f"*/{RECORDS}/*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a record half-written by an older version cannot exist (atomic); anything else is not ours
        if isinstance(rec, dict) and rec.get("results_dir") == want and (table is None or str(rec.get("table")) == table):
            yield path.parent.parent, rec


def tables_recorded(runs_dir: Path, results_dir: Path, run_dir: Path | None = None) -> list[str]:
    """The tables with records for ``results_dir`` (in one run folder, or in all of them)."""
    if run_dir is not None:
        found = set()
        for path in (Path(run_dir) / RECORDS).glob("*.json"):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("results_dir") == results_key(results_dir):
                found.add(str(rec.get("table")))
        return sorted(found)
    return sorted({str(rec.get("table")) for _, rec in _records(runs_dir, results_dir)})


# --------------------------------------------------------------------------- run folders

@dataclass(frozen=True)
class Folder:
    result: dict
    config: dict
    finished_at: str
    stamped: bool  # result.json names its run (else: checked by its parameter counts)


_checked: dict[tuple, Folder | Refused | None] = {}  # by the folder's files' identity: rebuilds re-read cheaply


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def folder(run_dir: Path) -> Folder | None:
    """The finished run in ``run_dir`` (None while it is not finished); raises ``Refused`` if its files do not
    belong to the run the folder's name says."""
    run_dir = Path(run_dir)
    ident = (str(run_dir.resolve()), _stat(run_dir / RESULT), _stat(run_dir / CONFIG))
    if ident[1] is None:
        return None
    if ident not in _checked:
        try:
            _checked[ident] = _check_folder(run_dir)
        except Refused as err:
            _checked[ident] = err
    got = _checked[ident]
    if isinstance(got, Refused):
        raise got
    return got


def _check_folder(run_dir: Path) -> Folder | None:
    import yaml

    name = run_dir.name
    try:
        result = json.loads((run_dir / RESULT).read_text())
        mtime = (run_dir / RESULT).stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, UnicodeError, ValueError) as err:
        raise Refused(f"its {RESULT} is unreadable ({type(err).__name__})") from None
    if not isinstance(result, dict):
        raise Refused(f"its {RESULT} is not a result record")
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text())
    except FileNotFoundError:
        raise Refused(f"it has {RESULT} but no {CONFIG}") from None
    except (OSError, UnicodeError, yaml.YAMLError) as err:
        raise Refused(f"its {CONFIG} is unreadable ({type(err).__name__})") from None
    if not isinstance(config, dict) or str(config.get("config_hash")) != name:
        owner = config.get("config_hash") if isinstance(config, dict) else None
        raise Refused(f"its {CONFIG} is run {owner}'s, not {name}'s (a moved or swapped folder)")
    missing = [c for c in RESULT_COLUMNS if c not in result and c not in RESULT_DEFAULTS]
    if missing:
        raise Refused(f"its {RESULT} lacks {', '.join(missing)}")
    bad = results.check_values({c: result[c] for c in RESULT_COLUMNS if c in result})
    if bad:  # (final_acc: "abc"): its line would be refused, so the run is not recorded, whatever else it says
        raise Refused(f"its {RESULT} cannot be indexed: {bad.replace('column ', '', 1)}")
    stamped = "config_hash" in result
    if stamped:
        if str(result["config_hash"]) != name:
            raise Refused(f"its {RESULT} is run {result['config_hash']}'s, not {name}'s (a moved or swapped file)")
        if "seed" in result and str(result["seed"]) != str(config.get("seed")):
            raise Refused(f"its {RESULT} is seed {result['seed']}'s, its {CONFIG} seed {config.get('seed')}'s")
    else:
        # Written before results named their run: the parameter counts must be those of config.yaml's network.
        try:
            counts = _counts(config)
        except Exception as err:  # noqa: BLE001 - any failure means the result cannot be tied to the run
            raise Refused(f"its {RESULT} does not name its run and the network of its {CONFIG} cannot be "
                          f"counted to check it ({type(err).__name__}: {err})") from None
        if counts != (result["params_paper"], result["params_total"]):
            raise Refused(f"its {RESULT} counts {result['params_paper']}/{result['params_total']} parameters, "
                          f"its {CONFIG}'s network {counts[0]}/{counts[1]} (a moved or swapped file)")
    finished_at = str(result.get("finished_at") or utc(mtime))
    return Folder({**result, **{k: v for k, v in RESULT_DEFAULTS.items() if k not in result}}, config, finished_at,
                  stamped)


def _counts(config: dict) -> tuple[int, int]:
    from simpnet_cli.nets import specs as network

    ds = config["dataset"]
    spec = network.build_spec(config["net"], ds["classes"])
    return network.count_params(spec, network.Shape(ds["channels"], ds["size"], ds["size"]))


def seal(run_dir: Path) -> dict:
    """The finished run of ``run_dir``, checked, with its identity written into its result.json if the
    training loop did not write it (a UserError if the folder holds another run's files)."""
    run_dir = Path(run_dir)
    try:
        got = folder(run_dir)
    except Refused as why:
        raise UserError(f"{run_dir}: {why}; move the folder away to train this run again") from None
    if got is None:
        raise UserError(f"{run_dir}: no {RESULT} after training")
    if not got.stamped:
        cfg = got.config
        write_json(run_dir / RESULT, {**got.result, "config_hash": run_dir.name, "table": cfg.get("table"),
                                      "row_id": cfg.get("row_id"), "seed": cfg.get("seed"),
                                      "finished_at": got.finished_at})
    return got.result


def line_of(record: dict, result: dict, finished_at: str) -> dict:
    """A CSV line: the row's columns from its record, the run's from its result."""
    return {**{c: record[c] for c in RECORD_COLUMNS}, **{c: result.get(c, RESULT_DEFAULTS.get(c)) for c in
                                                         RESULT_COLUMNS},
            "finished_at": record.get("finished_at") or finished_at}


def _good_text(line: dict) -> tuple[str, dict]:
    """(the formatted line, its fields as strings), or ValueError if it is not a finished run's line."""
    text = results.format_line(line)
    raw = dict(zip(results.COLUMNS, next(csv.reader([text]))))
    why = results._check(raw)
    if why:
        raise ValueError(why)
    return text, raw


# --------------------------------------------------------------------------- the index

@dataclass
class Index:
    path: Path
    entries: dict = field(default_factory=dict)   # key -> (sort key, line text)
    from_folders: set = field(default_factory=set)
    carried: list = field(default_factory=list)   # keys of old lines kept without a run folder
    adopt: list = field(default_factory=list)     # (run folder, record) for old lines whose folder has none
    old_keys: set = field(default_factory=set)
    duplicates: int = 0
    dropped: list = field(default_factory=list)   # BadLines of the old file
    refused: list = field(default_factory=list)   # messages
    backup: Path | None = None
    changed: bool = False

    @property
    def lines(self) -> list[str]:
        return [text for _, text in sorted(self.entries.values())]

    @property
    def keys(self) -> set:
        return set(self.entries)

    def counts(self) -> dict:
        return {"lines": len(self.entries), "kept": len(self.from_folders & self.old_keys),
                "recovered": len(self.from_folders - self.old_keys), "carried": len(self.carried),
                "adopted": len(self.adopt), "duplicates": self.duplicates, "dropped": len(self.dropped),
                "refused": len(self.refused), "backup": self.backup, "changed": self.changed}


def _sort_key(raw: dict) -> tuple:
    return (raw["finished_at"], raw["row_id"], int(float(raw["seed"])), raw["config_hash"])


def _from_folders(results_dir: Path, table: str, runs_dir: Path, idx: Index) -> None:
    for run_dir, rec in _records(runs_dir, results_dir, table):
        try:
            if str(rec.get("config_hash")) != run_dir.name:
                raise Refused(f"its record for table {table} names run {rec.get('config_hash')}")
            got = folder(run_dir)
            if got is None:
                continue  # not finished
            if str(rec.get("seed")) != str(got.config.get("seed")):
                raise Refused(f"its record for table {table} is seed {rec.get('seed')}'s, the run seed "
                              f"{got.config.get('seed')}'s")
            if Path(str(rec.get("run_dir"))).resolve() != run_dir.resolve():
                rec = {**rec, "run_dir": str(run_dir)}  # a moved runs_dir: the line says where the run is now
            text, raw = _good_text(line_of(rec, got.result, got.finished_at))
        except (Refused, ValueError, KeyError) as why:
            idx.refused.append(f"{run_dir}: refused, not indexed in {idx.path.name}: {why}")
            continue
        k = results.key(raw)
        if k not in idx.entries:
            idx.entries[k] = (_sort_key(raw), text)
            idx.from_folders.add(k)


def _adoptable(raw: dict, results_dir: Path, runs_dir: Path) -> tuple[Path, dict, str] | None:
    """(run folder, record, line) for an old line whose run folder under runs_dir is finished and its own."""
    if not HASH.fullmatch(raw["config_hash"]):
        return None
    run_dir = Path(runs_dir) / raw["config_hash"]
    try:
        got = folder(run_dir)
    except Refused:
        return None
    if got is None or str(got.config.get("seed")) != str(int(float(raw["seed"]))):
        return None
    # The line's run_dir as written when it names this folder (the CSV is reproduced), else where it is now.
    same = Path(raw["run_dir"]).resolve() == run_dir.resolve()
    record = {**{c: raw[c] for c in RECORD_COLUMNS}, "seed": int(float(raw["seed"])),
              "run_dir": raw["run_dir"] if same else str(run_dir), "finished_at": raw["finished_at"]}
    try:
        text, _ = _good_text(line_of(record, got.result, got.finished_at))
    except (ValueError, KeyError):
        return None
    return run_dir, record, text


def _verbatim(raw: dict) -> str:
    """An old line as it was read (its fields as written), in the current column order."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([raw[c] for c in results.COLUMNS])
    return buf.getvalue()


def build(results_dir: Path, table: str, runs_dir: Path) -> Index:
    """What the table's CSV should hold now (reads only)."""
    table = str(table)
    idx = Index(results.csv_path(results_dir, table))
    _from_folders(results_dir, table, runs_dir, idx)
    good, bad = results.parse(idx.path, table)
    idx.dropped = [b for b in bad if not b.duplicate]
    idx.duplicates = len(bad) - len(idx.dropped)
    for line in good:
        k = results.key(line.raw)
        if k in idx.old_keys:
            idx.duplicates += 1  # the same run twice with different figures: the folder's or the first line wins
            continue
        idx.old_keys.add(k)
        if k in idx.entries:
            continue
        adopted = _adoptable(line.raw, results_dir, runs_dir)
        if adopted:
            run_dir, record, text = adopted
            idx.adopt.append((run_dir, record))
            idx.from_folders.add(k)
        else:
            text = _verbatim(line.raw)
            idx.carried.append(k)
        idx.entries[k] = (_sort_key(line.raw), text)
    return idx


def recorded(results_dir: Path, table: str, runs_dir: Path) -> set[tuple[str, str, int]]:
    """(row_id, config_hash, seed) of every run the table's index holds: these are not trained again."""
    return {(k[1], k[2], k[3]) for k in build(results_dir, table, runs_dir).entries}


def is_recorded(results_dir: Path, runs_dir: Path, run) -> bool:
    """Whether ``run`` (a RunSpec) is in its table's index: its folder is finished and recorded for the table,
    or the CSV has its line (a line kept without its folder counts: it is not trained again)."""
    run_dir = Path(runs_dir) / run.config_hash
    if record_path(run_dir, results_dir, run.table, run.row_id).exists():
        try:
            if folder(run_dir) is not None:
                return True
        except Refused:
            pass
    good, _ = results.parse(results.csv_path(results_dir, run.table), run.table)
    return (str(run.table), run.row_id, run.config_hash, run.seed) in {results.key(g.raw) for g in good}


Warn = Callable[[str], None]


def rebuild(results_dir: Path, table: str, runs_dir: Path, warn: Warn | None = None, lasting: bool = True,
            tries: int = 20) -> Index:
    """Rewrite results/table<N>.csv from the run folders (atomically; not at all when it is already right).

    ``warn`` is told of the lines it dropped (said once: the next rebuild no longer sees them) and, with
    ``lasting``, of the folders refused and the lines kept without a folder (said by every rebuild that sees
    them, so a command that rebuilds after each run says them once, at its end)."""
    path = results.csv_path(results_dir, table)
    backup = None
    for _ in range(tries):
        idx = build(results_dir, table, runs_dir)
        for run_dir, record in idx.adopt:
            try:
                write_record(run_dir, results_dir, record)
            except UserError:
                pass  # a read-only runs_dir: the line is still written, and adopted again next time
        text = (results.HEADER + "".join(idx.lines)).encode()
        try:
            old = path.read_bytes()
        except FileNotFoundError:
            old = None
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror or err}") from None
        if old != text and (old is not None or idx.entries):
            if idx.dropped:  # lines we could not read are dropped: keep them for inspection
                backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
                try:
                    shutil.copy2(path, backup)
                except OSError as err:
                    raise UserError(f"cannot keep a copy of {path} before rebuilding it: "
                                    f"{err.strerror or err}; the file is as it was") from None
            results.write(path, idx.lines)
            idx.changed = True
        # Another rebuild may have read the folders before a run finished and renamed its file over ours: if a
        # folder finished since we read them, read them again (the last rebuild to rename sees every run).
        now = Index(path)
        _from_folders(results_dir, table, runs_dir, now)
        if now.from_folders <= idx.keys:
            break
    idx.backup = backup
    if warn:
        for bad in idx.dropped:
            warn(f"{bad} (dropped from the index" + (f"; the old file is kept as {backup.name})" if backup else ")"))
        for msg in idx.refused if lasting else []:
            warn(msg)
        if idx.carried and lasting:
            some = ", ".join(sorted({k[2] for k in idx.carried})[:3])
            warn(f"{path}: kept {len(idx.carried)} line(s) whose run folder is not a finished run under "
                 f"{runs_dir}/ (e.g. {some}); they count as recorded: delete a line to drop it")
    return idx


def rebuild_tables(results_dir: Path, runs_dir: Path, names, warn: Warn | None = None,
                   lasting: bool = True) -> dict[str, Index]:
    return {name: rebuild(results_dir, name, runs_dir, warn, lasting) for name in sorted(set(map(str, names)))}
