"""Every table end to end through the CLI: `simpnet run table=N profile=smoke` trains each row for a few
iterations on synthetic data on the CPU and records one CSV line per row; a second run adds nothing.

One results_dir and one runs_dir are shared by the whole module, as on a real machine: rows that are the
same run in two tables (Table 2's 8L is Table 7's 3x3-300K and Table 9's first row) train once.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simpnet_cli.runs import results
from simpnet_cli.config import tables
from simpnet_cli.cli import main

TABLE_NAMES = tables.table_names()
SUBPROCESS_TABLE = "2"  # this one goes through the installed console script, the others through cli.main


@pytest.fixture(scope="module")
def smoke_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    return {"root": root, "results": root / "results", "runs": root / "experiments", "done": set()}


# The smoke profile on a sliver of its data (batches of one image, 2 test images): every row still builds, trains
# four iterations, evaluates twice, checkpoints and records, at a fraction of the arithmetic (Table 12's 5-8M
# networks; what a row reaches is not checked here, and evaluating a bigger test set was a third of the work).
TINY = ["profile.train.batch_size=1", "profile.data.train_size=16", "profile.data.test_size=2"]


def _run_args(name: str, dirs: dict) -> list[str]:
    return ["run", f"table={name}", "profile=smoke", "quiet=true", *TINY,
            f"results_dir={dirs['results']}", f"runs_dir={dirs['runs']}", f"data_dir={dirs['root'] / 'data'}"]


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("simpnet")
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from simpnet_cli.cli import main; "
                                                                        "sys.exit(main())"]


def _smoke_table(name: str, dirs: dict, subprocess_ok: bool = True) -> None:
    """Run one table's smoke profile (once per module)."""
    if name in dirs["done"]:
        return
    if name == SUBPROCESS_TABLE and subprocess_ok:
        proc = subprocess.run(_console_script() + _run_args(name, dirs), capture_output=True, text=True,
                              cwd=dirs["root"], timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    else:
        assert main(_run_args(name, dirs)) == 0
    dirs["done"].add(name)


def _raw_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("name", TABLE_NAMES)
@pytest.mark.slow
def test_smoke_run_records_one_line_per_row(name, smoke_dirs):
    _smoke_table(name, smoke_dirs)
    table = tables.load_table(name)
    path = results.csv_path(smoke_dirs["results"], name)
    assert path.is_file(), f"no {path}"
    assert path.read_text().splitlines()[0] == ",".join(results.COLUMNS)
    rows, bad = results.read(path)
    assert not bad, [str(b) for b in bad]
    raw = _raw_rows(path)
    assert len(raw) == len(rows) == len(table.rows)
    assert sorted(r["row_id"] for r in raw) == sorted(r["id"] for r in table.rows)
    for r in raw:
        empty = [c for c in results.COLUMNS if (r.get(c) or "").strip() == "" and c not in results.MAY_BE_EMPTY]
        assert not empty, f"row {r['row_id']}: empty columns {empty}"
        assert r["table"] == name and r["status"] == "ok" and r["profile"] == "smoke"
        assert r["seed"] == "0" and r["iterations"] == "4"
        assert r["device"].startswith("cpu")
        assert 0.0 <= float(r["final_acc"]) <= 100.0 and 0.0 <= float(r["best_acc"]) <= 100.0
        run_dir = Path(r["run_dir"])
        assert (run_dir / "result.json").is_file() and not (run_dir / "checkpoint.pt").exists()
        assert json.loads((run_dir / "result.json").read_text())["params_total"] == int(r["params_total"])
    by_id = {r["row_id"]: r for r in raw}
    for row in table.rows:  # what the CSV says about each row is the row's own network and dataset
        spec = tables.resolve(table, row, 0, {})
        assert by_id[row["id"]]["dataset"] == spec.dataset["name"]
        assert by_id[row["id"]]["paper_acc"] == str(row["paper"]["acc"])


@pytest.mark.slow
def test_rerun_adds_no_lines(smoke_dirs, capsys):
    _smoke_table("2", smoke_dirs)
    path = results.csv_path(smoke_dirs["results"], "2")
    before = path.read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in smoke_dirs["runs"].glob("*/result.json")}
    assert main(_run_args("2", smoke_dirs)) == 0
    assert path.read_text() == before
    assert {p: p.stat().st_mtime_ns for p in smoke_dirs["runs"].glob("*/result.json")} == mtimes
    assert "skipped" in capsys.readouterr().err


@pytest.mark.slow
def test_twin_rows_share_one_run(smoke_dirs):
    """Table 2's 8-layer net is Table 9's first row: one run folder, a line in each table's CSV."""
    for name in ("2", "9"):
        _smoke_table(name, smoke_dirs)
    t2 = {r["row_id"]: r for r in _raw_rows(results.csv_path(smoke_dirs["results"], "2"))}
    t9 = {r["row_id"]: r for r in _raw_rows(results.csv_path(smoke_dirs["results"], "9"))}
    assert t2["8L"]["config_hash"] == t9["3x3-300K"]["config_hash"]
    assert t2["8L"]["run_dir"] == t9["3x3-300K"]["run_dir"]


def test_show_all_json(capsys):
    assert main(["show", "table=all", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    want = [(t.name, r["label"]) for t in tables.load_tables("all") for r in t.rows]
    assert [(r["table"], r["row"]) for r in records] == want
    for rec in records:
        for key in ("table", "row", "layers", "counted_params", "params_total"):
            assert key in rec and rec[key] not in (None, ""), f"{rec.get('table')}/{rec.get('row')}: no {key}"
        assert isinstance(rec["layers"], list) and rec["layers"][-1] in ("fc10", "fc100", "GP-AVE")
        assert 0 < rec["counted_params"] <= rec["params_total"]  # equal without BatchNorm (SqueezeNet)


def test_show_one_row_text(capsys):
    assert main(["show", "table=6", "row=RN32-max"]) == 0
    out = capsys.readouterr().out
    assert "473,354" in out and "conv16k3p1" in out


def test_list_exits_zero(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in TABLE_NAMES:
        assert f"Table {name}:" in out
    for r in tables.load_table("13").rows:
        assert r["id"] in out


@pytest.mark.parametrize("argv,words", [
    (["run", "table=99", "profile=smoke"], ["unknown table", "99"]),
    (["run", "table=2", "row=nope", "profile=smoke"], ["no row", "nope"]),
    (["show", "--frobnicate"], ["unknown flag"]),
    (["frobnicate"], ["unknown command"]),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys, tmp_path):
    code = main(argv + [f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/e"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("simpnet: error:"), err
    for w in words:
        assert w in lines[0]
