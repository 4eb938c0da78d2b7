"""The authors' runs as data and as the yardstick of a run in training (runs/authors.py, callbacks.Yardstick)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from simpnet_cli.config import tables
from simpnet_cli.config.variants import RowOverrides
from simpnet_cli.runs import authors, index, planning, progress, runner
from simpnet_cli.train import callbacks as C

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.mark.parametrize("name", ["authors_runs.csv", "authors_curves.csv"])
def test_the_shipped_data_equals_the_shared_reference(name):
    if not (SHARED / name).is_file():
        pytest.skip(f"{SHARED / name} is absent (clone the project with ../shared beside it)")
    assert (authors.DATA_DIR / name).read_bytes() == (SHARED / name).read_bytes()


def test_the_package_data_is_declared_so_an_install_carries_it():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"data/authors_runs.csv"' in text and '"data/authors_curves.csv"' in text


def test_every_log_joins_a_row_of_the_table_files():
    runs, curves = authors.authors_runs(), authors.authors_curves()
    assert len(runs) == 114 and len(curves) == 16336
    assert authors.unmatched() == []
    assert runs["row_id"].notna().all() and curves["row_id"].notna().all()
    assert runs[["table", "row_id"]].drop_duplicates().shape[0] == 52
    # the one row of the table files without a log: the paper gives no log for Table 12's no-augmentation run
    rows = {(t.name, r["id"]) for t in tables.load_tables("all") for r in t.rows}
    assert rows - set(zip(runs["table"], runs["row_id"])) == {("12", "5M-C10-noaug")}
    assert list(authors.runs_of("4", "WE13")["best_acc"]) == [86.89, 86.99, 87.19, 87.2]


def test_the_band_covers_a_resumed_log_from_its_first_iteration_only():
    band = authors.band("6", "SN15-max")
    logs = authors.curves_of("6", "SN15-max")
    full = logs[~logs["log"].str.endswith("_r.log")]
    at_5000 = full[full["iteration"] == 5000]["test_acc"]
    low, high, _ = band.at(5000)
    assert (low, high) == (at_5000.min(), at_5000.max())  # only the logs from iteration 0 count before 90,000
    at_100k = logs[logs["iteration"] == 100000]["test_acc"]
    assert band.at(100000)[:2] == (at_100k.min(), at_100k.max()) and len(at_100k) > len(full["log"].unique())
    assert band.at(10 ** 7) is None


def run_of(table="2", row="8L", profile="full", overrides=None):
    t = tables.load_table(table)
    return tables.resolve(t, t.row(row), 0, tables.load_named("profile", profile), overrides=overrides)


def fake_state(run, curve_points, tmp_path, test_size=10000):
    logs = []
    state = SimpleNamespace(run=run, run_dir=tmp_path / run.config_hash, curve=[], iteration=0,
                            data=SimpleNamespace(test_y=[0] * test_size), log=logs.append)
    return state, logs


def feed(cb, state, points):
    """The callback sees evaluations as loop.fit gives them: each one's row already in state.curve."""
    cb.on_start(state)
    for it, acc in points:
        state.iteration = it
        state.curve.append({"iter": it, "test_acc": acc})
        cb.on_eval(state, acc, 1.0)
    result = {"status": "ok"}
    cb.on_end(state, result)
    return result


def test_a_run_well_below_the_authors_is_warned_once_and_recorded(tmp_path):
    run = run_of()
    assert authors.why_no_yardstick(run) is None
    band = authors.band("2", "8L")
    cb = C.Yardstick(authors.yardstick_for)
    state, logs = fake_state(run, [], tmp_path)
    points = [(it, band.at(it)[0] - 8.0) for it in range(10000, 30001, 500)]  # 8 points under, all along
    result = feed(cb, state, points)
    assert result["yardstick"] == "below at iteration 10000"
    assert len(logs) == 1, logs
    low, high, _ = band.at(11000)
    assert low == high and band.runs == 1  # one log of 8L
    assert logs[0].startswith(f"{low - 8.0:.1f}% at 11,000, the authors' run {low:.1f}% (seed 0: more than ")
    assert logs[0].endswith("for 3 evaluations in a row; yardstick: below at iteration 10000)")


def test_a_run_inside_or_above_the_authors_is_recorded_so(tmp_path):
    band = authors.band("2", "8L")
    for shift, expected in ((0.0, "inside"), (+5.0, "above")):
        state, logs = fake_state(run_of(), [], tmp_path / expected)
        result = feed(C.Yardstick(authors.yardstick_for), state,
                      [(it, band.at(it)[0] + shift) for it in range(10000, 30001, 500)])
        assert result["yardstick"] == expected and logs == []


def test_two_dips_are_not_a_fall_and_a_resumed_run_is_not_warned_again(tmp_path):
    band = authors.band("2", "8L")
    low = lambda it: band.at(it)[0]  # noqa: E731
    state, logs = fake_state(run_of(), [], tmp_path)
    dips = [(20000, low(20000) - 5), (20500, low(20500) - 5), (21000, low(21000)), (21500, low(21500) - 5)]
    assert feed(C.Yardstick(authors.yardstick_for), state, dips)["yardstick"] == "inside"
    # resumed after a fall: the earlier session said it; this one judges the curve again silently
    state, logs = fake_state(run_of(), [], tmp_path / "resumed")
    state.curve = [{"iter": it, "test_acc": low(it) - 5} for it in (20000, 20500, 21000)]
    result = feed(C.Yardstick(authors.yardstick_for), state, [(21500, low(21500))])
    assert result["yardstick"] == "below at iteration 20000" and logs == []


def test_an_unreadable_yardstick_never_costs_the_run(tmp_path):
    def broken(run):
        raise OSError("gone")
    state, logs = fake_state(run_of(), [], tmp_path)
    result = feed(C.Yardstick(broken), state, [(10000, 10.0)] * 4)
    assert "yardstick" not in result and logs == ["no yardstick for this run: the authors' runs are unreadable "
                                                  "(OSError: gone)"]


def test_the_margin_is_three_standard_errors_of_one_comparison():
    cb = C.Yardstick(lambda run: None)
    assert cb.margin(90.0, 0.0, 10000) == pytest.approx(3 * 0.3)       # binomial: sqrt(.9 * .1 / 10000)
    assert cb.margin(90.0, 0.4, 10000) == pytest.approx(3 * 0.5)       # with the authors' noise, in quadrature


def test_a_variant_and_a_smoke_run_have_no_yardstick(tmp_path):
    variant = run_of(overrides=RowOverrides(assignments=(("solver.lr", 0.05),)))
    smoke = run_of(profile="smoke")
    assert authors.why_no_yardstick(variant).startswith("a variant")
    assert authors.why_no_yardstick(smoke) == "a smoke run or a data subset"
    for run in (variant, smoke):
        state, logs = fake_state(run, [], tmp_path / run.config_hash)
        result = feed(C.Yardstick(authors.yardstick_for), state, [(it, 10.0) for it in range(10000, 30001, 500)])
        assert "yardstick" not in result and logs == []


def test_a_trained_run_forced_below_gets_the_warning_and_its_record(tmp_path, monkeypatch):
    """Through the runner and the training loop: a smoke run of 8L, given a band far above it (a smoke run has
    none of its own), is below; result.json says so and the table's index still reads it."""
    t = tables.load_table("2")
    profile = {**tables.load_named("profile", "smoke")}
    profile["train"] = {**profile["train"], "eval_every": 1}
    run = tables.resolve(t, t.row("8L"), 0, profile)
    band = C.AuthorsBand("8L", (0.0, 10.0), (95.0, 95.0), (95.5, 95.5), (0.1, 0.1), 2)
    monkeypatch.setattr(authors, "yardstick_for", lambda r: band if r.config_hash == run.config_hash else None)
    opts = planning.Options(data_dir=tmp_path / "data", download=False, results_dir=tmp_path / "results",
                          runs_dir=tmp_path / "runs", device="cpu", jobs_per_device=1, profile="smoke")
    notes = []
    shown = progress.Reporter({}, 0, tty=False)
    monkeypatch.setattr(shown, "note", lambda key, msg: notes.append(msg))
    [(_, outcome, _)] = runner.execute_group([run], opts, "cpu", shown)
    assert outcome == "ok"
    result = json.loads((opts.runs_dir / run.config_hash / "result.json").read_text())
    assert result["yardstick"] == "below at iteration 1"
    assert [n for n in notes if "the authors' runs 95.0-95.5% (seed 0: " in n] \
        and len([n for n in notes if "authors" in n]) == 1
    lines = index.build(opts.results_dir, "2", opts.runs_dir)
    assert len(lines.entries) == 1 and not lines.refused
    # the same smoke run of another seed, with the runner's own yardstick: a smoke run has none, records none
    monkeypatch.undo()
    other = run.with_seed(1)
    assert runner.execute_group([other], opts, "cpu", progress.Reporter({}, 0, tty=False, quiet=True))[0][1] == "ok"
    assert "yardstick" not in json.loads((opts.runs_dir / other.config_hash / "result.json").read_text())


# --------------------------------------------------------------------------- the report

def smoke_report_of(tmp_path: Path, table: str):
    """A smoke-profile results folder of every row of ``table`` (two seeds, each with a four-iteration curve),
    as `simpnet run table=N profile=smoke seeds=2` leaves it, and its report's sections."""
    from simpnet_cli.report import write as report
    from simpnet_cli.runs import results

    t = tables.load_table(table)
    out = tmp_path / "results"
    lines = []
    for i, row in enumerate(t.rows):
        run = tables.resolve(t, row, 0, tables.load_named("profile", "smoke"))
        for seed in (0, 1):
            run_dir = tmp_path / "runs" / f"{row['id']}-{seed}"
            run_dir.mkdir(parents=True)
            accs = [10.0 + i + seed, 12.0 + i + 2 * seed]
            (run_dir / "curve.csv").write_text("iter,test_acc,test_loss,train_loss,lr,wall_s\n" + "".join(
                f"{2 * (k + 1)},{a},2.3,2.3,0.1,0.1\n" for k, a in enumerate(accs)))
            lines.append(results.format_line({
                "table": table, "row": row["label"], "row_id": row["id"], "variant": "", "seed": seed,
                "dataset": run.dataset["name"], "counted_params": 1000, "params_total": 1100,
                "paper_params": row["paper"].get("params", "-"), "paper_acc": row["paper"].get("acc", "-"),
                "final_acc": accs[-1], "best_acc": max(accs), "best_iter": 4, "iterations": 4, "epochs": 0.5,
                "wall_s": 1.0, "img_per_s": 32.0, "device": "cpu", "precision": "fp32", "step_mode": "eager",
                "profile": "smoke", "status": "ok", "config_hash": f"h{i}{seed}", "run_dir": str(run_dir),
                "finished_at": "2025-01-01T00:00:00Z"}))
    results.write(results.csv_path(out, table), lines)
    return out, report.collect(out, table)


@pytest.mark.parametrize("table", ["2", "6"])
def test_the_curves_figure_draws_the_authors_runs_beside_ours(tmp_path, table):
    from simpnet_cli.report import plots

    out, rep = smoke_report_of(tmp_path, table)
    tr, = rep.tables
    fig, note, warnings = plots.curves_figure(tr, out)
    assert not warnings and note == f"Curves: {2 * len(tr.table.rows)} of {2 * len(tr.table.rows)} run(s) have a " \
                                     f"readable curve.csv."
    ax = fig.axes[0]
    lines = {str(line.get_gid()): line for line in ax.get_lines()}
    logs = authors.authors_runs()
    logs = logs[logs["table"] == table]
    for row in tr.table.rows:
        theirs = logs[logs["row_id"] == row["id"]]
        drawn = {gid.split("|")[2]: line for gid, line in lines.items() if gid.startswith(f"authors|{row['id']}|")}
        assert set(drawn) == set(theirs["log"]), row["id"]  # one thin line per log
        for log in theirs.itertuples():
            x = list(drawn[log.log].get_xdata())
            assert (x[0], x[-1], len(x)) == (log.first_iter, log.last_iter, log.tests)  # a _r log from 90,000
            assert drawn[log.log].get_linewidth() < lines[f"ours|{row['id']}"].get_linewidth()
        mean = lines[f"ours|{row['id']}"]  # ours: the mean over the two seeds, their spread as a band
        i = [r["id"] for r in tr.table.rows].index(row["id"])
        assert list(mean.get_xdata()) == [2, 4] and list(mean.get_ydata()) == [10.5 + i, 13.0 + i]
        assert f"ours-spread|{row['id']}" in {c.get_gid() for c in ax.collections}
    drops = {int(gid.split("|")[1]) for gid in lines if gid.startswith("lr-drop|")}
    expected = {"2": {5000, 9500, 15500, 19500, 22000, 27000}, "6": {50000, 95000, 153000}}[table]
    assert expected <= drops  # the first test after each of the authors' lr drops
    if table == "6":
        assert any(gid.endswith("_r.log") for gid in lines)


def test_the_report_shows_the_authors_spread_and_where_each_row_falls(tmp_path):
    from simpnet_cli.report import text

    out, rep = smoke_report_of(tmp_path, "4")
    md = text.section(rep.tables[0])
    assert "86.89-87.2 (4 runs)" in md and "89.09-89.7 (3 runs)" in md and "95.19 (1 run)" in md
    assert "WE13 **below**: 15.00 (mean of 2 seeds, best at 4) vs the authors' 86.89-87.2 (4 runs, best at " \
           "50,000-67,000)" in md
    assert "the authors' spread is not used as noise" in md


# --------------------------------------------------------------------------- show and --dry-run

def test_show_prints_the_authors_best_final_and_hours_per_row(capsys):
    from simpnet_cli import cli

    assert cli.main(["show", "table=4", "row=WE13"]) == 0
    out = capsys.readouterr().out
    assert "authors' runs (4 logs; Caffe on their GPU): best 86.89-87.2%, final 86.81-87.11%, 0.74-0.75 h" in out
    assert "caffe_87.20.log: iterations 0-80,000, best 87.2% at 67,000, final 87.06%, 0.75 h" in out
    assert cli.main(["show", "table=12", "row=5M-C10-noaug"]) == 0
    assert "authors' runs: none published for this row" in capsys.readouterr().out
    assert cli.main(["show", "table=2", "row=8L", "--json"]) == 0
    shown, = json.loads(capsys.readouterr().out)
    assert shown["authors_runs"] == [{"log": "caffe_90.21.log", "first_iter": 0, "last_iter": 30000, "tests": 61,
                                      "best_acc": 90.21, "best_iter": 13500, "final_acc": 90.13,
                                      "median_iter_per_s": 23.41, "batch": 100, "wall_h": 0.375}]


def test_dry_run_prints_the_authors_hours_beside_each_estimate_and_the_total(tmp_path, capsys):
    from simpnet_cli import cli

    assert cli.main(["run", "table=2", "--dry-run", "dry_run.iters=1", "dry_run.batch_size=2", "quiet=true",
                     f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/e"]) == 0
    out = capsys.readouterr().out
    hours = authors.authors_runs().query("table == '2'")["wall_h"].sum()  # their four logs, 30,000 iterations each
    assert "| estimated time | the authors' hours |" in out
    cell = f"{int(hours)} h {int(hours * 60 % 60):02d} min"
    assert [line for line in out.splitlines() if line.startswith("| 2 | 4 | 120,000 |") and line.endswith(f"| {cell} |")]
    assert [line for line in out.splitlines() if line.startswith("| all | 4 | 120,000 |") and line.endswith(f"| {cell} |")]
