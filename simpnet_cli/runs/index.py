"""results/table<N>.csv as an index rebuilt from the run folders, which are the truth.

A run folder ``runs_dir/<config_hash>/`` is written by one process at a time (runner.RunLock) and holds
``config.yaml`` (the resolved run, written when it starts) and, once finished, ``result.json`` (written last,
atomically, naming its run: ``config_hash``, ``table``, ``row_id``, ``seed``, ``finished_at`` and the SHA-256
of ``model.pt``). Which tables
a run belongs to is kept beside them in ``records/``: one small JSON file per (results_dir, table, row) that
asked for the run, written when the command plans to train or record it. Its fields are the CSV's columns that
depend on the row rather than on the run (label, variant, paper figures, profile, run_dir): Table 2's 8L is
Table 7's and Table 9's 3x3-300K, one folder with three records. A record names its results_dir relative to its
own folder (``../../../results``), so a project moved or copied whole (``mv p q``) keeps its records, and by
its absolute path (``results_dir_abs``), so a runs_dir moved alone keeps them too. Records of an older simpnet
name it by its absolute path only: they are read where that is the results_dir, or where the project moved as
a whole (the record's results_dir stands to the run_dir it recorded as the results_dir stands to the folder
now), and rewritten in the new form when found in place.

``rebuild`` writes a table's CSV from the folders that hold a record for that table and that results_dir,
whole, through a temporary file and a rename. Nothing is ever appended, so concurrent commands cannot
interleave or tear lines; two rebuilds racing leave the file of the last one to rename, and each rebuild
checks after its rename that no run finished in between (if one did, it rebuilds again), so the last file
holds every finished run. A run killed between its result.json and the rebuild is indexed by the next
command's rebuild or by ``simpnet repair``.

A folder is refused, with a warning, never indexed, when its result.json or config.yaml names another run
than the folder's name (a swapped or copied folder must never put 9L's figures on 8L's line). The training loop
writes the run's identity (``config_hash``, ``table``, ``row_id``, ``seed``) into result.json, and each must
agree with the folder's name and config.yaml: a result.json lacking some of them, or naming another run, is
refused. One lacking all of them was written by an older simpnet (which stamped it after training): its figures
cannot tell seed 0 from seed 1, so it is accepted only where the table's existing CSV has the run's line with
the same figures (and its parameter counts are those of config.yaml's network); the rebuild then writes the
identity into it, so the folder no longer needs the CSV.

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
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from simpnet_cli.config import tables
from simpnet_cli.errors import UserError
from simpnet_cli.files import write_json, write_json_unless_same
from simpnet_cli.runs import results

RECORDS = "records"
RESULT = "result.json"
CONFIG = "config.yaml"
# The CSV's columns that depend on the table row (kept in its record) and on the run (kept in result.json, whose
# params_paper is the CSV's counted_params: results.format_line renames it).
RECORD_COLUMNS = ["table", "row", "row_id", "variant", "seed", "dataset", "paper_params", "paper_acc", "profile",
                  "config_hash", "computation", "run_dir"]
RECORD_DEFAULTS = {"computation": ""}  # records written before the column: filled from config.yaml
RESULT_COLUMNS = ["params_paper", "params_total", "final_acc", "best_acc", "best_iter", "iterations", "epochs",
                  "wall_s", "img_per_s", "device", "precision", "step_mode", "status"]
RESULT_DEFAULTS = {"step_mode": "eager"}  # result.json files written before the column
# What a result.json says about whose it is (train.state.run_identity), each checked against the folder.
IDENTITY = ("config_hash", "table", "row_id", "seed")
HASH = re.compile(r"[A-Za-z0-9_-]+")  # a config_hash read from a CSV line, before it is used as a folder name


class Refused(Exception):
    """A run folder whose files do not belong together: never indexed."""


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def results_key(results_dir: Path, run_dir: Path) -> str:
    """How a record in ``run_dir/records/`` names its results_dir: relative to that folder, so every spelling
    of one folder agrees and a project moved or copied whole keeps its records."""
    return os.path.relpath(Path(results_dir).resolve(), (Path(run_dir) / RECORDS).resolve())


def _names(rec: dict, records_dir: Path, results_dir: Path) -> bool | None:
    """Whether the record ``rec`` in ``records_dir`` is for ``results_dir``: True, False, or None where it is but
    says so in a form to rewrite (found by its absolute path: an older simpnet's, or its runs_dir moved alone)."""
    named = rec.get("results_dir")
    if not isinstance(named, str) or not named:
        return False
    want = Path(results_dir).resolve()
    if not os.path.isabs(named):
        if Path(os.path.normpath(records_dir.resolve() / named)) == want:
            return True
        return None if rec.get("results_dir_abs") == str(want) else False
    if Path(named) == want:
        return None
    return _moved_with_the_project(Path(named), str(rec.get("run_dir") or ""), records_dir.parent.resolve(), want)


def _moved_with_the_project(old_results: Path, recorded_run: str, run_dir: Path, results_dir: Path) -> bool:
    """An older simpnet's record after a move or copy: its results_dir (absolute, as it was) stands to the run
    folder it recorded as ``results_dir`` stands to ``run_dir`` now. The recorded run folder is absolute, or
    relative to the command's folder, which is then taken to be where results_dir was relative to as well."""
    recorded = Path(recorded_run)
    if not recorded_run or ".." in recorded.parts:
        return False
    if recorded.is_absolute():
        tail = 0  # the end of the path that the move kept: what precedes it was the project's folder, and is now
        while tail < min(len(recorded.parts), len(run_dir.parts)) - 1 and \
                recorded.parts[-1 - tail] == run_dir.parts[-1 - tail]:
            tail += 1
        if tail == 0:
            return False
        old_root, new_root = Path(*recorded.parts[:-tail]), Path(*run_dir.parts[:-tail])
        try:
            return new_root / old_results.relative_to(old_root) == results_dir
        except ValueError:
            return False
    if run_dir.parts[-len(recorded.parts):] != recorded.parts:
        return False
    new_root = Path(*run_dir.parts[:-len(recorded.parts)])
    try:
        rel = results_dir.relative_to(new_root).parts
    except ValueError:
        return False
    return len(rel) > 0 and old_results.parts[-len(rel):] == rel


# --------------------------------------------------------------------------- records

def record_of(run, run_dir: Path, profile: str) -> dict:
    """The row-dependent columns of a run's line in its table (``run``: a tables.RunSpec)."""
    return {"table": run.table, "row": run.label, "row_id": run.row_id, "variant": run.variant, "seed": run.seed,
            "dataset": run.dataset["name"], "paper_params": run.paper.get("params", "-"),
            "paper_acc": run.paper.get("acc", "-"), "profile": profile, "config_hash": run.config_hash,
            "computation": run.computation, "run_dir": str(run_dir)}


def record_path(run_dir: Path, results_dir: Path, table: str, row_id: str) -> Path:
    key = results_key(results_dir, run_dir)
    digest = hashlib.sha256(json.dumps([key, str(table), str(row_id)]).encode()).hexdigest()
    return Path(run_dir) / RECORDS / f"table{re.sub(r'[^A-Za-z0-9_.-]', '_', str(table))}-{digest[:16]}.json"


def write_record(run_dir: Path, results_dir: Path, record: dict) -> Path:
    """Say that ``run_dir``'s run belongs to ``record``'s table row in ``results_dir`` (idempotent)."""
    record = {**record, "results_dir": results_key(results_dir, run_dir),
              "results_dir_abs": str(Path(results_dir).resolve())}
    return write_json_unless_same(record_path(run_dir, results_dir, record["table"], record["row_id"]), record)


def _records(runs_dir: Path, results_dir: Path, table: str | None = None, paths=None):
    """(run folder, record) of every record under ``runs_dir`` (or of the record files ``paths``) for
    ``results_dir`` (and ``table``). An older simpnet's record found in place is rewritten relative."""
    for path in sorted(Path(runs_dir).glob(f"*/{RECORDS}/*.json") if paths is None else paths):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a record half-written by an older version cannot exist (atomic); anything else is not ours
        if not isinstance(rec, dict) or (table is not None and str(rec.get("table")) != table):
            continue
        named = _names(rec, path.parent, results_dir)
        if named is None:  # found by its absolute path: the relative form survives a move of the project
            try:
                if write_record(path.parent.parent, results_dir, rec) != path:
                    path.unlink()
            except (OSError, UserError):
                pass  # a read-only runs_dir: read as it is
        if named is not False:
            yield path.parent.parent, rec


def tables_recorded(runs_dir: Path, results_dir: Path, run_dir: Path | None = None) -> list[str]:
    """The tables with records for ``results_dir`` (in one run folder, or in all of them)."""
    paths = None if run_dir is None else sorted((Path(run_dir) / RECORDS).glob("*.json"))
    return sorted({str(rec.get("table")) for _, rec in _records(runs_dir, results_dir, paths=paths)})


# --------------------------------------------------------------------------- run folders

@dataclass(frozen=True)
class Folder:
    result: dict
    config: dict
    finished_at: str
    stamped: bool  # result.json names its run (else: an older simpnet's, vouched for only by its CSV line)

    @cached_property  # (once per folder and process: the folders are cached by their files' identity)
    def computation(self) -> str:
        """The run's computation (tables.RunSpec.computation), from config.yaml; "" if it does not rebuild."""
        return tables.computation_of(self.config) or ""


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
    stamped = any(k in result for k in IDENTITY)
    if stamped:
        why = identity_problem(result, config)
        if why:
            raise Refused(why)
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


def identity_problem(result: dict, config: dict) -> str | None:
    """Why ``result`` (a result.json) is not the run of ``config`` (its folder's config.yaml), or None."""
    lacking = [k for k in IDENTITY if result.get(k) in (None, "")]
    if lacking:
        return f"its {RESULT} does not say whose it is (it lacks {', '.join(lacking)}): a copied file?"
    for k in IDENTITY:
        if str(result[k]) != str(config.get(k)):
            return (f"its {RESULT} is {k} {str(result[k])[:40]!r}'s, its {CONFIG} {k} "
                    f"{str(config.get(k))[:40]!r}'s (a moved, swapped or copied file)")
    return None


def _counts(config: dict) -> tuple[int, int]:
    from simpnet_cli.nets import specs as network

    ds = config["dataset"]
    spec = network.build_spec(config["net"], ds["classes"])
    return network.count_params(spec, network.Shape(ds["channels"], ds["size"], ds["size"]))


UNNAMED = (f"its {RESULT} does not say whose it is (no config_hash, table, row_id, seed: an older simpnet's, or "
           f"copied from another run's folder) and no line of the table's CSV vouches for its figures")


def seal(run_dir: Path) -> dict:
    """The finished run of ``run_dir``, checked: a UserError if the folder holds another run's files, or a
    result.json that does not name its run (the training loop names it; only a copy or an older simpnet's
    does not, and only a CSV line can vouch for that one: ``simpnet repair``)."""
    run_dir = Path(run_dir)
    try:
        got = folder(run_dir)
        if got is not None and not got.stamped:
            raise Refused(UNNAMED)
    except Refused as why:
        raise UserError(f"{run_dir}: {why}; move the folder away to train this run again") from None
    if got is None:
        raise UserError(f"{run_dir}: no {RESULT} after training")
    return got.result


def stamp(run_dir: Path, got: Folder, finished_at: str) -> None:
    """Write its identity into the result.json of an older simpnet's folder that a CSV line vouched for."""
    cfg = got.config
    write_json(Path(run_dir) / RESULT, {**got.result, "config_hash": Path(run_dir).name, "table": cfg.get("table"),
                                        "row_id": cfg.get("row_id"), "seed": cfg.get("seed"),
                                        "finished_at": finished_at})


def _vouched(raw: dict | None, got: Folder) -> bool:
    """Whether an old CSV line ``raw`` holds exactly the figures of the unnamed result.json of ``got``."""
    if raw is None:
        return False
    try:
        _, formatted = _good_text(line_of({c: raw[c] for c in RECORD_COLUMNS}, got.result, raw["finished_at"]))
    except (ValueError, KeyError):
        return False
    return all(formatted[c] == raw[c] for c in (results.RENAMED.get(c, c) for c in RESULT_COLUMNS))


def line_of(record: dict, result: dict, finished_at: str, computation: str = "") -> dict:
    """A CSV line: the row's columns from its record, the run's from its result (``computation``: the run's,
    for an older record that lacks it)."""
    row = {c: record[c] if c not in RECORD_DEFAULTS else record.get(c) or RECORD_DEFAULTS[c] for c in RECORD_COLUMNS}
    row["computation"] = row["computation"] or computation
    return {**row, **{c: result.get(c, RESULT_DEFAULTS.get(c)) for c in RESULT_COLUMNS},
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
    stamp: list = field(default_factory=list)     # (run folder, Folder, finished_at): unnamed results a line vouched for
    read: set = field(default_factory=set)        # the run folders read (recorded for the table, or a line's)
    unfinished: int = 0                           # of those, runs not finished (nothing to index yet)
    backup: Path | None = None
    changed: bool = False

    @property
    def lines(self) -> list[str]:
        return [text for _, text in sorted(self.entries.values())]

    @property
    def keys(self) -> set:
        return set(self.entries)

    def counts(self) -> dict:
        return {"lines": len(self.entries), "read": len(self.read), "indexed": len(self.from_folders),
                "unfinished": self.unfinished, "kept": len(self.from_folders & self.old_keys),
                "recovered": len(self.from_folders - self.old_keys), "carried": len(self.carried),
                "adopted": len(self.adopt), "duplicates": self.duplicates, "dropped": len(self.dropped),
                "refused": len(self.refused), "backup": self.backup, "changed": self.changed}


def _sort_key(raw: dict) -> tuple:
    return (raw["finished_at"], raw["row_id"], int(float(raw["seed"])), raw["config_hash"])


def _from_folders(results_dir: Path, table: str, runs_dir: Path, idx: Index, old: dict | None = None) -> None:
    """Index the finished runs recorded for the table; ``old``: the existing CSV's lines by key, the only
    evidence for an older simpnet's result.json that does not name its run."""
    for run_dir, rec in _records(runs_dir, results_dir, table):
        idx.read.add(run_dir.name)
        try:
            if str(rec.get("config_hash")) != run_dir.name:
                raise Refused(f"its record for table {table} names run {rec.get('config_hash')}")
            got = folder(run_dir)
            if got is None:
                idx.unfinished += 1
                continue
            if str(rec.get("seed")) != str(got.config.get("seed")):
                raise Refused(f"its record for table {table} is seed {rec.get('seed')}'s, the run seed "
                              f"{got.config.get('seed')}'s")
            if not got.stamped:
                raw = (old or {}).get((table, str(rec.get("row_id")), run_dir.name, int(got.config.get("seed"))))
                if not _vouched(raw, got):
                    raise Refused(UNNAMED)
                idx.stamp.append((run_dir, got, raw["finished_at"]))
            if Path(str(rec.get("run_dir"))).resolve() != run_dir.resolve():
                rec = {**rec, "run_dir": str(run_dir)}  # a moved runs_dir: the line says where the run is now
            text, raw = _good_text(line_of(rec, got.result, got.finished_at, got.computation))
        except (Refused, ValueError, KeyError, TypeError) as why:
            idx.refused.append(f"{run_dir}: refused, not indexed in {idx.path.name}: {why}")
            continue
        k = results.key(raw)
        if k not in idx.entries:
            idx.entries[k] = (_sort_key(raw), text)
            idx.from_folders.add(k)


def _adoptable(raw: dict, results_dir: Path, runs_dir: Path) -> tuple[Path, dict, str, Folder] | None:
    """(run folder, record, line, folder) for an old line whose run folder under runs_dir is finished and its own
    (named in its result.json, or holding exactly the line's figures)."""
    if not HASH.fullmatch(raw["config_hash"]):
        return None
    run_dir = Path(runs_dir) / raw["config_hash"]
    try:
        got = folder(run_dir)
    except Refused:
        return None
    if got is None or str(got.config.get("seed")) != str(int(float(raw["seed"]))):
        return None
    if not got.stamped and not _vouched(raw, got):
        return None
    # The line's run_dir as written when it names this folder (the CSV is reproduced), else where it is now.
    same = Path(raw["run_dir"]).resolve() == run_dir.resolve()
    record = {**{c: raw[c] for c in RECORD_COLUMNS}, "seed": int(float(raw["seed"])),
              "computation": raw["computation"] or got.computation,
              "run_dir": raw["run_dir"] if same else str(run_dir), "finished_at": raw["finished_at"]}
    try:
        text, _ = _good_text(line_of(record, got.result, got.finished_at, got.computation))
    except (ValueError, KeyError):
        return None
    return run_dir, record, text, got


def _verbatim(raw: dict) -> str:
    """An old line as it was read (its fields as written), in the current column order."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([raw[c] for c in results.COLUMNS])
    return buf.getvalue()


def build(results_dir: Path, table: str, runs_dir: Path) -> Index:
    """What the table's CSV should hold now (reads only, but for rewriting an older simpnet's records found in
    place in their relative form: ``_records``)."""
    table = str(table)
    idx = Index(results.csv_path(results_dir, table))
    good, bad = results.parse(idx.path, table)
    old: dict = {}
    for line in good:
        old.setdefault(results.key(line.raw), line.raw)
    _from_folders(results_dir, table, runs_dir, idx, old)
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
        if HASH.fullmatch(line.raw["config_hash"]) and (Path(runs_dir) / line.raw["config_hash"]).is_dir():
            idx.read.add(line.raw["config_hash"])
        adopted = _adoptable(line.raw, results_dir, runs_dir)
        if adopted:
            run_dir, record, text, got = adopted
            idx.adopt.append((run_dir, record))
            if not got.stamped:
                idx.stamp.append((run_dir, got, line.raw["finished_at"]))
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
            got = folder(run_dir)
            if got is not None and got.stamped:
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
        for run_dir, got, finished_at in idx.stamp:
            try:
                stamp(run_dir, got, finished_at)
            except UserError:
                pass  # a read-only runs_dir: the line is still written, and vouched for again next time
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


def recorded_elsewhere(runs_dir: Path, results_dir: Path, table: str) -> list[str]:
    """The results folders other than ``results_dir`` that records under ``runs_dir`` name for ``table``, as
    the records spell them (said when a repair finds no run for ``results_dir``)."""
    found = set()
    for path in Path(runs_dir).glob(f"*/{RECORDS}/*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and str(rec.get("table")) == str(table) and \
                _names(rec, path.parent, results_dir) is False and isinstance(rec.get("results_dir"), str):
            named = rec["results_dir"]
            found.add(named if os.path.isabs(named) else os.path.normpath(path.parent / named))
    return sorted(found)


def rebuild_tables(results_dir: Path, runs_dir: Path, names, warn: Warn | None = None,
                   lasting: bool = True) -> dict[str, Index]:
    return {name: rebuild(results_dir, name, runs_dir, warn, lasting) for name in sorted(set(map(str, names)))}
