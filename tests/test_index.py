"""results/table<N>.csv is an index of the run folders (runs/index.py): rebuilt from them by every run and by
`simpnet repair`, never appended to. A run killed before the rebuild is indexed by the next command, a folder
holding another run's files is refused, a damaged CSV is rebuilt, a healthy one is left alone, a results_dir
indexes only the runs recorded for it, and an older simpnet's CSV and folders are reindexed as they were.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from simpnet_cli import cli, commands
from simpnet_cli.runs import index, results

from conftest import TINY

# The smoke profile on a sliver of its data (batches of 2, 2 test images): these tests are about what is indexed.
SMOKE = ["profile=smoke", "quiet=true", *TINY]
SCRIPT = Path(sys.executable).with_name("simpnet")


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "results", tmp_path / "runs"


def planned(tmp_path: Path, *args: str):
    out, runs = dirs(tmp_path)
    cfg, variant = commands.compose([*args, "profile=smoke", *TINY, f"results_dir={out}", f"runs_dir={runs}"])
    return commands.plan_runs(cfg, variant)


def simpnet(tmp_path: Path, *args: str) -> int:
    out, runs = dirs(tmp_path)
    return cli.main([*args, *SMOKE, f"results_dir={out}", f"runs_dir={runs}"])


def repair(tmp_path: Path, *args: str) -> int:
    out, runs = dirs(tmp_path)
    return cli.main(["repair", *args, f"results_dir={out}", f"runs_dir={runs}"])


def row_ids(path: Path) -> list[tuple[str, int]]:
    rows, bad = results.read(path)
    assert not bad, [str(b) for b in bad]
    return [(r["row_id"], r["seed"]) for r in rows]


# --------------------------------------------------------------------------- a run killed before its rebuild

KILLED_AFTER_RESULT = textwrap.dedent("""
    import os, signal, sys
    from simpnet_cli.train import state
    real = state.write_json

    def write_then_die(path, obj):  # SIGKILL right after result.json: before the runner seals and indexes it
        real(path, obj)
        if path.name == "result.json":
            os.kill(os.getpid(), signal.SIGKILL)

    state.write_json = write_then_die
    from simpnet_cli.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("then", ["run", pytest.param("repair", marks=pytest.mark.slow)])
def test_a_run_killed_between_its_result_and_the_rebuild_is_indexed_once_by_the_next_command(tmp_path, capsys,
                                                                                               one_thread, then):
    out, runs = dirs(tmp_path)
    (p5,) = planned(tmp_path, "table=5", "row=P5")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_RESULT, "run", "table=5", "row=P5", *SMOKE,
                           f"results_dir={out}", f"runs_dir={runs}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = runs / p5.config_hash
    killed = json.loads((run_dir / "result.json").read_text())  # the loop names the run in it (issue 25)
    assert (killed["config_hash"], killed["seed"]) == (p5.config_hash, 0)
    assert not results.csv_path(out, "5").exists(), "killed before the index was written"
    capsys.readouterr()
    if then == "run":
        assert simpnet(tmp_path, "run", "table=5", "row=P5") == 0
        assert "1 skipped" in capsys.readouterr().err  # recorded: not trained again
    else:
        assert repair(tmp_path, "table=5") == 0
        assert "1 recovered" in capsys.readouterr().err
    path = results.csv_path(out, "5")
    assert row_ids(path) == [("P5", 0)]
    rows, _ = results.read(path)
    assert rows[0]["final_acc"] == json.loads((run_dir / "result.json").read_text())["final_acc"]
    assert simpnet(tmp_path, "run", "table=5", "row=P5") == 0 and repair(tmp_path) == 0
    assert row_ids(path) == [("P5", 0)]


# --------------------------------------------------------------------------- swapped folders

def swap(a: Path, b: Path, what: str) -> None:
    if what == "folders":
        tmp = a.with_name("swap")
        a.rename(tmp), b.rename(a), tmp.rename(b)
    else:  # only their result.json files (unstamped: as an older simpnet wrote them)
        ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
        if what == "unstamped-results":
            for r in (ra, rb):
                for k in ("config_hash", "table", "row_id", "seed", "finished_at"):
                    r.pop(k)
        (a / "result.json").write_text(json.dumps(rb))
        (b / "result.json").write_text(json.dumps(ra))


@pytest.mark.parametrize("what", ["folders", "results", "unstamped-results"])
def test_swapped_run_folders_are_refused_and_never_indexed_under_the_wrong_hash(tmp_path, capsys, one_thread, what):
    out, runs = dirs(tmp_path)
    assert simpnet(tmp_path, "run", "table=2", "row=[8L,9L]") == 0
    path = results.csv_path(out, "2")
    before = path.read_text()
    lines = {r["row_id"]: r for r in results.read(path)[0]}
    assert lines["8L"]["params_total"] != lines["9L"]["params_total"]  # what tells their results apart
    swap(Path(lines["8L"]["run_dir"]), Path(lines["9L"]["run_dir"]), what)
    capsys.readouterr()
    assert repair(tmp_path, "table=2") == 0
    err = capsys.readouterr().err
    assert err.count("refused, not indexed") == 2 and "swapped" in err
    assert path.read_text() == before  # the lines recorded before the swap are kept as they were, no other
    path.unlink()
    assert repair(tmp_path, "table=2") == 0
    assert not path.exists() or results.read(path) == ([], [])  # nothing is indexed from the swapped folders
    capsys.readouterr()
    code = simpnet(tmp_path, "run", "table=2", "row=8L")  # found finished, but not its own: never recorded
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "move the folder away" in err[0], err
    assert not path.exists() or results.read(path) == ([], [])


# --------------------------------------------------------------------------- damaged, hand-edited and healthy CSVs

def reorder(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([list(reversed(r)) for r in rows])
    return buf.getvalue()


DAMAGE = {
    "reordered-columns": reorder,
    "duplicated-line": lambda t: t + t.splitlines(keepends=True)[1],
    "truncated-last-line": lambda t: t[: len(t) - len(t.splitlines()[-1]) // 2 - 1],
    "bom": lambda t: "\ufeff" + t,
    "junk": lambda t: t.replace("\n", "\nnot,a,run\n\x00\x01 binary junk\n", 1),
    "lines-lost": lambda t: t.splitlines(keepends=True)[0],
}


# (the fast tier keeps every damage rebuilt by the next run, and junk rebuilt by `repair`)
@pytest.mark.parametrize("by, damage", [
    pytest.param(by, damage, marks=pytest.mark.slow if by == "repair" and damage != "junk" else ())
    for by in ("run", "repair") for damage in sorted(DAMAGE)])
def test_a_damaged_csv_is_rebuilt_by_the_next_run_or_repair(tmp_path, finished_run, damage, by):
    out, runs = dirs(tmp_path)
    for i, run in enumerate(planned(tmp_path, "table=5", "seeds=2")):
        finished_run(run, out, runs, f"2025-01-01T00:00:0{i}Z", final_acc=40.0 + i)
    assert repair(tmp_path, "table=5") == 0
    path = results.csv_path(out, "5")
    healthy = path.read_text()
    assert len(healthy.splitlines()) == 1 + 6
    path.write_text(DAMAGE[damage](healthy))
    assert (simpnet(tmp_path, "run", "table=5", "seeds=2") if by == "run" else repair(tmp_path)) == 0
    assert path.read_text() == healthy
    backups = list(out.glob("table5.csv.damaged-*"))
    assert len(backups) == (damage in ("junk", "truncated-last-line"))  # kept where lines could not be read


def test_repair_leaves_a_healthy_csv_untouched(tmp_path, finished_run, capsys):
    out, runs = dirs(tmp_path)
    for run in planned(tmp_path, "table=5"):
        finished_run(run, out, runs)
    assert repair(tmp_path) == 0
    path = results.csv_path(out, "5")
    before = (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino)
    capsys.readouterr()
    assert repair(tmp_path, "table=5") == 0 and simpnet(tmp_path, "run", "table=5") == 0
    assert cli.main(["index", f"results_dir={out}", f"runs_dir={runs}"]) == 0  # the same command
    assert capsys.readouterr().err.count("table5.csv: unchanged") == 2
    assert (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert sorted(p.name for p in out.iterdir()) == ["table5.csv"], "no backup, no temporary file"


def test_a_run_finished_while_a_rebuild_writes_is_in_the_file_it_leaves(tmp_path, finished_run, monkeypatch):
    """Two rebuilds race: ours read the folders before P3 finished, and P3's own rebuild renamed its file before
    ours did. Ours reads the folders again after its rename and writes again: the last file has every run."""
    out, runs = dirs(tmp_path)
    p5, p3, _ = planned(tmp_path, "table=5")
    finished_run(p5, out, runs, "2025-01-01T00:00:01Z")
    real_write, writes = results.write, []

    def racing(path, lines):  # P3 finishes, and its process rebuilds, after our read and before our rename
        writes.append(len(lines))
        if not (runs / p3.config_hash).exists():
            finished_run(p3, out, runs, "2025-01-01T00:00:02Z")
            index.rebuild(out, "5", runs)
        real_write(path, lines)

    monkeypatch.setattr(results, "write", racing)
    index.rebuild(out, "5", runs)
    assert writes == [1, 2, 2]  # ours (stale), P3's, ours again
    assert row_ids(results.csv_path(out, "5")) == [("P5", 0), ("P3", 0)]


# --------------------------------------------------------------------------- which runs a results_dir indexes

def test_repair_indexes_only_the_runs_recorded_for_its_results_dir(tmp_path, finished_run):
    runs = tmp_path / "runs"
    p5, p3, _ = planned(tmp_path, "table=5")
    finished_run(p5, tmp_path / "a", runs)
    finished_run(p3, tmp_path / "b", runs)
    for name, want in (("a", [("P5", 0)]), ("b", [("P3", 0)])):
        assert cli.main(["repair", f"results_dir={tmp_path / name}", f"runs_dir={runs}"]) == 0
        assert row_ids(results.csv_path(tmp_path / name, "5")) == want
    assert cli.main(["repair", "table=7", f"results_dir={tmp_path / 'a'}", f"runs_dir={runs}"]) == 0
    assert not results.csv_path(tmp_path / "a", "7").exists()  # no run of it: no file


def test_a_shared_run_is_indexed_in_each_of_its_tables(tmp_path, finished_run):
    """Table 2's 8L is Table 9's 3x3-300K: one folder, a record per table row, a line in each CSV."""
    out, runs = dirs(tmp_path)
    (t2,) = planned(tmp_path, "table=2", "row=8L")
    (t9,) = planned(tmp_path, "table=9", "row=3x3-300K")
    assert t2.config_hash == t9.config_hash
    finished_run(t2, out, runs)
    index.write_record(runs / t9.config_hash, out, index.record_of(t9, runs / t9.config_hash, "smoke"))
    assert cli.main(["repair", f"results_dir={out}", f"runs_dir={runs}"]) == 0
    assert row_ids(results.csv_path(out, "2")) == [("8L", 0)]
    assert row_ids(results.csv_path(out, "9")) == [("3x3-300K", 0)]
    assert len(list(runs.iterdir())) == 1


# --------------------------------------------------------------------------- an older simpnet's results

def test_an_older_layout_is_reindexed_as_it_was_and_lines_without_folders_are_kept(tmp_path, capsys, one_thread):
    """Folders without records/ whose result.json does not name its run, and a CSV written by appends: the
    rebuild reproduces the CSV; the line of a run whose folder was deleted is kept (and not trained again)."""
    out, runs = dirs(tmp_path)
    assert simpnet(tmp_path, "run", "table=5", "row=[P5,P3]") == 0
    path = results.csv_path(out, "5")
    old = path.read_text()
    lines = {r["row_id"]: r for r in results.read(path)[0]}
    for r in lines.values():  # what an older simpnet left: no records/, a result.json without its run's name
        run_dir = Path(r["run_dir"])
        for rec in (run_dir / "records").iterdir():
            rec.unlink()
        (run_dir / "records").rmdir()
        saved = json.loads((run_dir / "result.json").read_text())
        (run_dir / "result.json").write_text(json.dumps(
            {k: v for k, v in saved.items() if k not in ("config_hash", "table", "row_id", "seed", "finished_at")}))
        (run_dir / "records.json").write_text(json.dumps({"5": r}, default=str))
    gone = Path(lines["P3"]["run_dir"])
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    capsys.readouterr()
    assert repair(tmp_path, "table=5") == 0
    err = capsys.readouterr().err
    assert path.read_text() == old
    assert "kept 1 line(s) whose run folder is not a finished run" in err and gone.name in err
    assert list((Path(lines["P5"]["run_dir"]) / "records").glob("*.json")), "the folder is recorded again"
    assert simpnet(tmp_path, "run", "table=5", "row=[P5,P3]") == 0
    assert "2 run(s): 2 skipped" in capsys.readouterr().err
    assert path.read_text() == old and not gone.exists()


# --------------------------------------------------------------------------- the tolerant reader

def line(row_id: str, **over) -> dict:
    return {"table": "5", "row": f"row {row_id}", "row_id": row_id, "variant": "", "seed": 0, "dataset": "cifar10",
            "counted_params": 53370, "params_total": 53912, "paper_params": "53K", "paper_acc": 79.44, "final_acc": 61.5,
            "best_acc": 62.25, "best_iter": 4, "iterations": 4, "epochs": 0.5, "wall_s": 1.25, "img_per_s": 100.0,
            "device": "cpu", "precision": "fp32", "step_mode": "eager", "profile": "smoke", "status": "ok",
            "config_hash": f"h{row_id}", "computation": "", "run_dir": "runs/x", "finished_at": "2025-01-01T00:00:00Z",
            **over}


def test_the_reader_matches_columns_by_name_and_ignores_what_is_not_a_finished_run_of_its_table(tmp_path):
    path = results.csv_path(tmp_path, "5")
    order = list(reversed(results.COLUMNS))
    good = [line("P5"), line("P3", status="diverged", final_acc=float("nan"))]
    bad = [line("P7", table="4"), line("P9", status="running"), line("P1", final_acc=130.0)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(order)
    for rec in good[:1] + good[:1] + bad + good[1:]:
        w.writerow([rec[c] for c in order])
    path.write_text("\ufeff" + buf.getvalue())
    rows, skipped = results.read(path)
    assert [(r["row_id"], r["status"]) for r in rows] == [("P5", "ok"), ("P3", "diverged")]
    assert rows[0]["final_acc"] == 61.5 and rows[0]["seed"] == 0 and rows[0]["config_hash"] == "hP5"
    assert [(b.lineno, b.duplicate) for b in skipped] == [(3, True), (4, False), (5, False), (6, False)]
    assert "table '4'" in skipped[1].why and "status" in skipped[2].why and "out of range" in skipped[3].why
    old = [c for c in results.COLUMNS if c not in results.LATER_COLUMNS]  # a file of the first release
    path.write_text(",".join(old) + "\n" + ",".join(str(line("P5")[c]) for c in old) + "\n")
    (rec,), skipped = results.read(path)
    assert not skipped and rec["variant"] == "" and rec["step_mode"] == "eager"


def test_a_file_with_the_old_name_of_the_counted_parameters_reads_as_the_new(tmp_path):
    """params_paper (the counted parameters, beside paper_params: the printed figure) is now counted_params."""
    path = results.csv_path(tmp_path, "5")
    old = [("params_paper" if c == "counted_params" else c) for c in results.COLUMNS]
    path.write_text(",".join(old) + "\n" + ",".join(str(line("P5")[c]) for c in results.COLUMNS) + "\n")
    (rec,), skipped = results.read(path)
    assert not skipped and (rec["counted_params"], rec["paper_params"]) == (53370, "53K")
    assert "params_paper" not in rec and "counted_params,params_total,paper_params" in results.HEADER
    assert results.format_line({**{k: v for k, v in line("P5").items() if k != "counted_params"},
                                "params_paper": 1}) == results.format_line(line("P5", counted_params=1))
