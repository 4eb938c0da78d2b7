"""simpnet report: tables, claims, plots and skipped lines from a hand-made results directory (CPU, fast)."""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pytest

from simpnet_cli.report import write as report
from simpnet_cli.runs import results
from simpnet_cli.config import tables

T2 = tables.load_table("2")
LABEL = {r["id"]: r["label"] for r in T2.rows}


def run_row(tmp: Path, row_id: str, seed: int, best: float, final: float, *, table: str = "2",
            status: str = "ok", profile: str = "full", wall_s: float = 600.0, label: str | None = None) -> dict:
    run_dir = tmp / "experiments" / f"{table}-{row_id}-{profile}-{seed}"
    return {
        "table": table, "row": label or LABEL.get(row_id, row_id), "row_id": row_id, "variant": "", "seed": seed,
        "dataset": "cifar10", "params_paper": 300213, "params_total": 301291, "paper_params": "300K",
        "paper_acc": 90.21, "final_acc": final, "best_acc": best, "best_iter": 900, "iterations": 1000,
        "epochs": 2.0, "wall_s": wall_s, "img_per_s": 1000.0, "device": "cpu", "precision": "fp32",
        "step_mode": "eager", "profile": profile, "status": status, "config_hash": f"h{row_id}{seed}{profile}", "run_dir": str(run_dir),
        "finished_at": "2025-01-01T00:00:00",
    }


def append(results_dir: Path, table: str, row: dict) -> None:
    """One line added to a hand-made results file (the report reads what the index or a person wrote)."""
    path = results.csv_path(results_dir, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((path.read_text() if path.exists() else results.HEADER) + results.format_line(row))


def write_curve(row: dict, accs: list[float]) -> None:
    d = Path(row["run_dir"])
    d.mkdir(parents=True, exist_ok=True)
    lines = ["iter,test_acc,test_loss,train_loss,lr,wall_s"]
    lines += [f"{(i + 1) * 100},{a},1.0,1.0,0.1,{i}" for i, a in enumerate(accs)]
    (d / "curve.csv").write_text("\n".join(lines) + "\n")


def row_line(md: str, row_id: str) -> str:
    """The markdown table line of one row (its first cell is the row id)."""
    lines = [ln for ln in md.splitlines() if re.match(rf"^\|\s*{re.escape(row_id)}\s*\|", ln)]
    assert len(lines) == 1, (row_id, lines)
    return lines[0]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


# --------------------------------------------------------------------------- the main fixture

BEST_8L, FINAL_8L = [90.0, 90.3, 90.5], [89.6, 89.9, 89.7]
BEST_10L, FINAL_10L = [91.5, 91.7, 91.6], [91.0, 91.2, 91.1]
BEST_9L, FINAL_9L = [90.9], [90.4]


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    rdir = tmp_path / "results"
    for seed, (b, f) in enumerate(zip(BEST_8L, FINAL_8L)):
        row = run_row(tmp_path, "8L", seed, b, f)
        append(rdir, "2", row)
        write_curve(row, [40.0, 80.0, b, f])
    append(rdir, "2", run_row(tmp_path, "8L", 3, 10.0, float("nan"), status="diverged"))
    for seed, (b, f) in enumerate(zip(BEST_10L, FINAL_10L)):
        row = run_row(tmp_path, "10L", seed, b, f)
        append(rdir, "2", row)
        if seed == 0:
            write_curve(row, [45.0, 85.0, b, f])  # the other 10L runs have no curve.csv
    append(rdir, "2", run_row(tmp_path, "9L", 0, BEST_9L[0], FINAL_9L[0]))
    append(rdir, "2", run_row(tmp_path, "8L", 0, 55.0, 50.0, profile="smoke", wall_s=5))
    with open(results.csv_path(rdir, "2"), "a") as fh:
        fh.write("2,Arch1 8 layers,8L,7,cifar10\n")  # torn: 5 fields
    append(rdir, "2", run_row(tmp_path, "99L", 0, 91.0, 90.0, label="no such row"))
    append(rdir, "77", run_row(tmp_path, "8L", 0, 91.0, 90.0, table="77"))
    return rdir


def test_render_table2(results_dir: Path):
    path = report.render(results_dir, tables="2", latex=True)
    assert path == results_dir / "REPORT.md"
    md = path.read_text()
    t2 = (results_dir / "report" / "table2.md").read_text()
    assert (results_dir / "report" / "table2.tex").stat().st_size > 0

    # header: both metrics defined, the claim test named
    assert report.BEST_LABEL in md and report.FINAL_LABEL in md
    assert "Welch's t-test" in md and "one-sided" in md and "alpha = 0.05" in md

    # (REPORT.md holds every table with results, Table 77's 8L too: read Table 2's section of it.)
    table2 = md[md.index("## Table 2:"):]
    table2 = table2[:table2.index("\n## ", 1)]
    for text in (table2, t2):
        head = cells([ln for ln in text.splitlines() if ln.startswith("| Row")][0])
        line = cells(row_line(text, "8L"))
        col = dict(zip(head, line))
        assert col["n (ok seeds)"] == "3"
        assert col[f"Best acc (%), {report.BEST_LABEL}"] == mean_std(BEST_8L)
        assert col[f"Final acc (%), {report.FINAL_LABEL}"] == mean_std(FINAL_8L)
        assert col["Paper acc (%)"] == "90.21"
        # Table 2's figures are the authors' best runs (no stat): our best seed is compared, and the table says so
        assert col["Best - paper"] == f"{max(BEST_8L) - 90.21:+.2f}"
        assert col["Best - paper compares"] == "best of 3 seeds vs the authors' best run"
        assert col["Params (paper)"] == "300K" and col["Params (counted)"] == "300.2K"
        assert col["Time (mean)"] == "10.0 min"
        assert "1 diverged" in col["Status"] and "3 ok" in col["Status"]

        col9 = dict(zip(head, cells(row_line(text, "9L"))))
        assert col9["n (ok seeds)"] == "1"
        assert col9[f"Best acc (%), {report.BEST_LABEL}"] == f"{BEST_9L[0]:.2f}"
        assert col9["Best - paper compares"] == "best of 1 seed vs the authors' best run"
        assert "config now counts 299.7K" in col9["Status"]  # the fixture records 8L's count for every row

        col13 = dict(zip(head, cells(row_line(text, "13L"))))
        assert col13["Status"] == "not run"
        assert col13[f"Best acc (%), {report.BEST_LABEL}"] == ""
        assert col13["Best - paper"] == "" and col13["Best - paper compares"] == "(paper: the authors' best run)"
        assert col13["Params (counted)"].endswith("K")  # counted from the config: no run to take it from

    # smoke runs are never mixed into the full table
    assert "1 smoke run(s)" in t2
    assert report.SMOKE_BANNER not in t2

    # skipped lines: the torn line (line number included), the unknown row id and the unknown table
    skipped = md.split("## Skipped lines", 1)[1]
    csv2 = str(results.csv_path(results_dir, "2"))
    assert re.search(re.escape(csv2) + r":\d+: 5 fields", skipped)
    assert "99L" in skipped and "unknown table '77'" in skipped

    # figures exist, are non-empty and linked; Table 2's rows are all ~300K: no accuracy-vs-parameters figure
    for name in ("table2_ablation.png", "table2_curves.png"):
        png = results_dir / "report" / name
        assert png.is_file() and png.stat().st_size > 1000
        assert f"report/{name}" in md and f"]({name})" in t2
    assert not (results_dir / "report" / "table2_params.png").exists() and "params.png" not in md
    assert "Curves: 4 of 8 run(s) have a readable curve.csv." in t2  # 3 (8L) + 1 (10L) of 7 ok + 1 diverged


def test_claims_table2(results_dir: Path):
    rep = report.collect(results_dir, "2")
    (tr,) = rep.tables
    by_cmp = {tuple(c.comparisons): c for c in tr.claims}
    depth = by_cmp[("9L > 8L", "10L > 9L")]
    for metric in ("best", "final"):
        overall, (v98, v109) = depth.per_metric[metric]
        assert v98.verdict == "holds" and v98.p is None and "no noise estimate" in v98.note  # 1 run vs 3
        assert v109.verdict == "holds" and v109.note == report.NO_NOISE_SIDE  # 3 runs vs 1
        assert overall == "holds"
    assert "no noise estimate" in depth.cell("best")
    deep = by_cmp[("10L > 13L",)]
    assert deep.verdict("best") == "not run" and deep.verdict("final") == "not run"
    assert deep.cell("final") == "**not run**: 13L not run"
    md = report.render(results_dir, "2").read_text()
    claim_line = [ln for ln in md.splitlines() if ln.startswith(f"| {depth.text}")][0]
    assert "**holds** (one run on one side, no noise estimate)" in claim_line


def test_claims_significant_hold_and_fail(tmp_path: Path):
    rdir = tmp_path / "results"
    accs = {"8L": [90.0, 90.1, 90.2], "9L": [91.0, 91.1, 91.2], "10L": [92.0, 92.1, 92.2], "13L": [93.0, 93.2, 93.1]}
    for rid, xs in accs.items():
        for seed, a in enumerate(xs):
            append(rdir, "2", run_row(tmp_path, rid, seed, a, a - 0.5))
    md = report.render(rdir, "2", plots=False).read_text()
    (tr,) = report.collect(rdir, "2").tables
    by_cmp = {tuple(c.comparisons): c for c in tr.claims}
    for metric in ("best", "final"):
        overall, parts = by_cmp[("9L > 8L", "10L > 9L")].per_metric[metric]
        assert overall == "holds" and all(v.p < 0.05 for v in parts)
        overall, (v,) = by_cmp[("10L > 13L",)].per_metric[metric]
        assert overall == "fails" and v.p > 0.95
    assert "**holds**" in md and "**fails**" in md and "no noise estimate" not in md.split("## Table 2")[1]
    assert not list((rdir / "report").glob("*.png"))  # plots=False


def test_claims_inconclusive_and_one_run_each(tmp_path: Path):
    rdir = tmp_path / "results"
    for seed, (a, b) in enumerate([(90.0, 90.2), (90.4, 89.9), (90.1, 90.3)]):  # 9L vs 8L: within noise
        append(rdir, "2", run_row(tmp_path, "9L", seed, a, a))
        append(rdir, "2", run_row(tmp_path, "8L", seed, b, b))
    append(rdir, "2", run_row(tmp_path, "10L", 0, 91.0, 91.0))
    append(rdir, "2", run_row(tmp_path, "13L", 0, 90.0, 90.0))
    (tr,) = report.collect(rdir, "2").tables
    by_cmp = {tuple(c.comparisons): c for c in tr.claims}
    overall, (v98, v109) = by_cmp[("9L > 8L", "10L > 9L")].per_metric["best"]
    assert v98.verdict == "inconclusive" and 0.05 <= v98.p <= 0.95
    assert overall == "inconclusive"
    overall, (v,) = by_cmp[("10L > 13L",)].per_metric["best"]
    assert overall == "holds" and v.note == report.NO_NOISE_EACH
    assert report.NO_NOISE_EACH in by_cmp[("10L > 13L",)].cell("best")


def test_smoke_only_table_is_labelled(tmp_path: Path):
    rdir = tmp_path / "results"
    append(rdir, "2", run_row(tmp_path, "8L", 0, 30.0, 28.0, profile="smoke", wall_s=3))
    append(rdir, "2", run_row(tmp_path, "8L", 1, 32.0, 29.0, profile="smoke", wall_s=3))
    md = report.render(rdir, "2").read_text()
    assert report.SMOKE_BANNER in md
    assert "Profile shown: **smoke**" in md
    assert mean_std([30.0, 32.0]) in row_line(md, "8L")
    # asking for the smoke profile when full runs exist shows smoke, still labelled
    append(rdir, "2", run_row(tmp_path, "8L", 0, 90.0, 89.0))
    md_full = report.render(rdir, "2").read_text()
    assert report.SMOKE_BANNER not in md_full and "90.00" in row_line(md_full, "8L")
    md_smoke = report.render(rdir, "2", profile="smoke").read_text()
    assert report.SMOKE_BANNER in md_smoke and "1 full run(s)" in md_smoke


def test_latex_has_a_caption_booktabs_rules_and_a_visible_smoke_note(tmp_path: Path):
    rdir = tmp_path / "results"
    for seed in (0, 1):
        append(rdir, "2", run_row(tmp_path, "8L", seed, 30.0 + seed, 28.0, profile="smoke", wall_s=3))
    report.render(rdir, "2", latex=True, plots=False)
    tex = (rdir / "report" / "table2.tex").read_text()
    assert r"\caption{Table 2: " in tex and r"\label{tab:simpnet-table2}" in tex and "booktabs" in tex
    assert [tex.count(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule")] == [2, 2, 2]  # rows, claims
    assert r"\hline" not in tex and tex.count(r"\textbf{Smoke runs (tiny subset") == 2
    assert r"30.50 $\pm$ 0.71" in tex


@pytest.mark.slow
def test_empty_results_render_every_table(tmp_path: Path):
    rdir = tmp_path / "results"
    rdir.mkdir()
    md = report.render(rdir, latex=True).read_text()
    for t in tables.load_tables("all"):
        assert f"## Table {t.name}:" in md
        section = (rdir / "report" / f"table{t.name}.md").read_text()
        assert (rdir / "report" / f"table{t.name}.tex").is_file()
        assert (rdir / "report" / f"table{t.name}_ablation.png").stat().st_size > 0  # the paper's figures
        assert (rdir / "report" / f"table{t.name}_params.png").exists() == (t.name in DIFFER_IN_SIZE)
        for r in t.rows:
            assert cells(row_line(section, r["id"]))[-1] == "not run"
    assert md.split("## Skipped lines", 1)[1].strip().startswith("None.")
    assert not list((rdir / "report").glob("*_curves.png"))


def test_error_display_tables(tmp_path: Path):
    err_tables = [t for t in tables.load_tables("all") if t.display == "error" and t.rows]
    if not err_tables:
        pytest.skip("no error-display table configured yet")
    t = err_tables[0]
    row = t.rows[0]
    rdir = tmp_path / "results"
    for seed, acc in enumerate([99.70, 99.74]):
        rec = run_row(tmp_path, row["id"], seed, acc, acc - 0.02, table=t.name, label=row["label"])
        rec["dataset"] = row["dataset"]  # (the fixture's default is CIFAR-10; this row's data is its own)
        append(rdir, t.name, rec)
    md = report.render(rdir, t.name).read_text()
    head = cells([ln for ln in md.splitlines() if ln.startswith("| Row")][0])
    col = dict(zip(head, cells(row_line(md, row["id"]))))
    best_err = [100 - 99.70, 100 - 99.74]
    assert col[f"Best error (%) = 100 - acc, {report.BEST_LABEL}"] == mean_std(best_err)
    paper_err = 100 - float(row["paper"]["acc"]) if "acc" in row["paper"] else float(row["paper"]["error"])
    # the most accurate seed is the lowest error, whichever statistic the table file names
    ours = min(best_err) if row["paper"].get("stat", "best") == "best" else statistics.mean(best_err)
    assert col["Best - paper (error)"] == f"{ours - paper_err:+.2f}"
    assert "error = 100 - accuracy" in md


# --------------------------------------------------------------------------- the paper's statistic (paper.stat)

STAT_TABLE = """\
table: stats
title: One network, three ways the paper's figure was made
display: {display}
row_defaults: {{arch: arch1, dataset: cifar10, solver: adadelta_30k, iterations: 30000}}
rows:
  - {{id: D, label: default stat, net: {{widths: "C41, C43, C70{{4}}, C85, C90", pools_after: [3, 7]}},
     paper: {{params: 300K, {fig}}}}}
  - {{id: M, label: mean stat, net: {{widths: "C41, C43, C70{{4}}, C85, C90", pools_after: [3, 7]}},
     paper: {{params: 300K, {fig}, stat: mean}}}}
  - {{id: R, label: one run, net: {{widths: "C41, C43, C70{{4}}, C85, C90", pools_after: [3, 7]}},
     paper: {{params: 300K, {fig}, stat: run}}}}
  - {{id: X, label: bad stat, net: {{widths: "C41, C43, C70{{4}}, C85, C90", pools_after: [3, 7]}},
     paper: {{params: 300K, {fig}, stat: median}}}}
"""
STAT_BESTS = [89.0, 89.6, 90.2]  # max 90.2, mean 89.6: the statistics differ by 0.6


@pytest.fixture
def stat_conf(tmp_path):
    """A folder of one's own with a table file written by ``make(display, figure)``: its four rows (default,
    mean, run and an unknown stat) are one network with one paper figure, so only ``stat`` tells them apart."""
    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)

    def make(display: str = "accuracy", fig: str = "acc: 89.45") -> Path:
        (root / "tables" / "stats.yaml").write_text(STAT_TABLE.format(display=display, fig=fig))
        tables.SEARCH.use(root)  # (put back after the test: conftest's conf_search)
        tables.load_table.cache_clear()  # the file may be rewritten within one test
        rdir = tmp_path / "results"
        for rid in ("D", "M", "R", "X"):
            for seed, best in enumerate(STAT_BESTS):
                append(rdir, "stats", run_row(tmp_path, rid, seed, best, best - 0.3, table="stats", label=rid))
        return rdir
    yield make


def stat_cols(md: str, row_id: str) -> dict[str, str]:
    head = cells([ln for ln in md.splitlines() if ln.startswith("| Row")][0])
    return dict(zip(head, cells(row_line(md, row_id))))


def test_best_minus_paper_uses_the_papers_statistic(stat_conf):
    rdir = stat_conf()
    md = report.render(rdir, "stats", latex=True, plots=False).read_text()
    mean = statistics.mean(STAT_BESTS)
    expected = {"D": (max(STAT_BESTS), "best of 3 seeds vs the authors' best run"),
                "M": (mean, "mean of 3 seeds vs the mean of the authors' runs"),
                "R": (mean, "mean of 3 seeds vs one of the authors' runs")}
    for rid, (ours, says) in expected.items():
        col = stat_cols(md, rid)
        assert col["Best - paper"] == f"{ours - 89.45:+.2f}", rid
        assert col["Best - paper compares"] == says, rid
        assert col[f"Best acc (%), {report.BEST_LABEL}"] == mean_std(STAT_BESTS)  # the seeds' spread, unchanged
    # an unknown stat costs that row's comparison, with a note and a warning, never the report
    bad = stat_cols(md, "X")
    assert bad["Best - paper"] == "" and "not compared" in bad["Best - paper compares"]
    assert "unknown paper stat 'median'" in bad["Status"] and "## Warnings" in md
    # the legend explains the three cases; the LaTeX table carries the statistic too
    for phrase in ("best of n seeds vs the authors' best run", "mean of n seeds vs the mean of the authors' runs",
                   "mean of n seeds vs one of the authors' runs"):
        assert phrase in md.split("## Summary")[0]
    tex = (rdir / "report" / "tablestats.tex").read_text()
    assert "mean of 3 seeds vs the mean of the authors' runs" in tex and f"{mean - 89.45:+.2f}" in tex


@pytest.mark.parametrize("fig", ["acc: 89.45", "error: 10.55"])
def test_error_tables_compare_the_papers_statistic_in_error(stat_conf, fig):
    """Table 13/14 style: error = 100 - acc on both sides; the best seed is the LOWEST error (not the max)."""
    rdir = stat_conf(display="error", fig=fig)
    md = report.render(rdir, "stats", plots=False).read_text()
    errs = [100 - b for b in STAT_BESTS]
    for rid, ours in (("D", min(errs)), ("M", statistics.mean(errs)), ("R", statistics.mean(errs))):
        col = stat_cols(md, rid)
        assert col["Paper error (%)"] == "10.55"
        assert col["Best - paper (error)"] == f"{ours - 10.55:+.2f}", rid
        assert col[f"Best error (%) = 100 - acc, {report.BEST_LABEL}"] == mean_std(errs)
    assert stat_cols(md, "D")["Best - paper compares"] == "best of 3 seeds vs the authors' best run"
    assert stat_cols(md, "M")["Best - paper compares"] == "mean of 3 seeds vs the mean of the authors' runs"


def test_ablation_figure_shapes_the_papers_marker_by_its_statistic(stat_conf):
    rdir = stat_conf()
    (tr,) = report.collect(rdir, "stats").tables
    ab = report_data.ablation_points([tr])
    assert {m.row_id: m.stat for m in ab.markers if m.metric == "paper"} == {"D": "best", "M": "mean", "R": "run",
                                                                              "X": ""}
    fig = plots.ablation_figure(ab)
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"paper: the authors' best run", "paper: the mean of the authors' runs",
            "paper: one of the authors' runs"} <= set(legend)
    assert plots.overlapping_texts(fig, list(ax.get_xticklabels()) + list(ax.get_legend().get_texts())) == []


# --------------------------------------------------------------------------- statistics

WELCH_CASES = [  # (a, b, scipy.stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
    ([90.1, 90.3, 90.2], [90.0, 89.9, 90.05], 0.02211806724354657),
    ([1, 2, 3, 4], [1.5, 2.5, 2.8], 0.38539629195806047),
    ([90.0, 92.0], [91.0, 91.1, 91.2, 90.9], 0.5158947551881371),
    ([5.0, 5.1, 4.9, 5.3, 5.2], [5.0, 5.05, 5.1], 0.27037885978850296),
]


@pytest.mark.parametrize("a,b,expected", WELCH_CASES)
def test_welch_p_matches_scipy(a, b, expected):
    p = report.welch_p_greater(a, b)
    assert p == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert report.welch_p_greater(b, a) == pytest.approx(1 - expected, rel=1e-9, abs=1e-12)


def test_welch_degenerate():
    assert report.welch_p_greater([1.0, 1.0], [0.0, 0.0]) == 0.0
    assert report.welch_p_greater([0.0, 0.0], [1.0, 1.0]) == 1.0
    assert report.welch_p_greater([1.0, 1.0], [1.0, 1.0]) == 0.5
    with pytest.raises(ValueError):
        report.welch_p_greater([1.0], [1.0, 2.0])


def test_compare_rules():
    hi, lo, mid = [92.0, 92.1, 92.2], [90.0, 90.1, 90.2], [91.0, 93.0, 89.0]
    assert report.compare(hi, lo, ">").verdict == "holds"
    assert report.compare(lo, hi, ">").verdict == "fails"
    assert report.compare(mid, lo, ">").verdict == "inconclusive"
    assert report.compare(hi, lo, ">=").verdict == "holds"
    assert report.compare(lo, hi, ">=").verdict == "fails"
    assert report.compare([90.0, 90.2, 90.1], [90.1, 90.3, 89.95], ">=").verdict == "inconclusive"  # lower, in noise
    assert report.compare([90.2, 90.3, 90.1], [90.1, 90.3, 89.95], ">=").verdict == "holds"  # higher, in noise
    assert report.compare(lo, hi, "<").verdict == "holds"
    assert report.compare(hi, lo, "<=").verdict == "fails"
    one = report.compare([91.0], [90.0], ">")
    assert (one.verdict, one.note, one.p) == ("holds", report.NO_NOISE_EACH, None)
    assert report.compare([90.0], [90.0], ">").verdict == "fails"
    assert report.compare([90.0], [90.0], ">=").verdict == "holds"
    side = report.compare([90.0], hi, ">")
    assert (side.verdict, side.note) == ("fails", report.NO_NOISE_SIDE)
    assert report.compare([], hi, ">").verdict == "not run"
    assert report.combine(["holds", "holds"]) == "holds"
    assert report.combine(["holds", "fails", "not run"]) == "fails"
    assert report.combine(["holds", "not run"]) == "not run"
    assert report.combine(["holds", "inconclusive"]) == "inconclusive"


def test_bad_claims_are_reported_not_fatal():
    samples = {"best": {"8L": [90.0], "9L": [91.0]}, "final": {"8L": [90.0], "9L": [91.0]}}
    bad = report.evaluate_claim({"text": "x", "holds_if": ["9L ~ 8L"]}, samples)
    assert bad.error and "cannot read comparison" in bad.cell("best")
    unknown = report.evaluate_claim({"text": "y", "holds_if": ["9L > 14L"]}, samples)
    assert "unknown row id(s) 14L" in unknown.error
    ok = report.evaluate_claim({"text": "z", "holds_if": "9L > 8L"}, samples)
    assert ok.verdict("best") == "holds" and not math.isnan(ok.per_metric["best"][1][0].mean_a)


# --------------------------------------------------------------------------- variants and own networks

def test_a_variant_is_reported_beside_the_papers_rows_with_its_own_claims(tmp_path):
    """Table 4 as printed (BW10 above WE10) and on CIFAR-100 (WE10 above BW10): two sections, never averaged."""
    out = tmp_path / "results"
    paper = {"WE10": [95.0, 95.1], "BW10": [95.6, 95.7]}
    c100 = {"WE10": [78.0, 78.2], "BW10": [75.0, 75.1]}
    for variant, figures in (("", paper), ("dataset=cifar100", c100)):
        for row_id, accs in figures.items():
            for seed, acc in enumerate(accs):
                row = run_row(tmp_path, row_id, seed, acc, acc - 0.2, table="4", label=row_id)
                row.update(variant=variant, config_hash=f"{row_id}{seed}{variant[:3]}")
                append(out, "4", row)
    path = report.render(out, tables="4", plots=False)
    md = path.read_text()
    assert "## Table 4: Balanced distribution (Arch2)\n" in md
    assert "## Table 4: Balanced distribution (Arch2) (variant: dataset=cifar100)" in md
    rep = report.collect(out, "4")
    base, variant = rep.tables
    assert (base.variant, variant.variant) == ("", "dataset=cifar100")
    assert {r.row_id: r.values("best") for r in base.rows if r.kind == "trained" and r.n} == paper
    assert {r.row_id: r.values("best") for r in variant.rows if r.kind == "trained" and r.n} == c100
    # The 8M claim holds as printed and fails on CIFAR-100 (significantly, n = 2 each).
    assert base.claims[0].verdict("best") == "holds" and variant.claims[0].verdict("best") == "fails"
    assert (out / "report" / "table4-variant1.md").is_file()


@pytest.mark.slow
def test_networks_of_ones_own_are_reported_from_their_csv(tmp_path):
    out = tmp_path / "results"
    for seed, acc in enumerate([61.0, 63.0]):
        row = run_row(tmp_path, "arch2", seed, acc, acc, table="custom", label="arch2 (a network of your own)")
        row.update(variant="net.widths=C64,C128{2}", config_hash=f"c{seed}")
        append(out, "custom", row)
    md = report.render(out, tables="custom", plots=False).read_text()
    assert "Table custom: Networks of your own" in md and "(variant: net.widths=C64,C128{2})" in md
    everything = report.render(out, plots=False).read_text()
    assert "Table custom" in everything and "unknown table" not in everything


# --------------------------------------------------------------------------- figures

from simpnet_cli.nets import specs as network
from simpnet_cli.report import plots
from simpnet_cli.report import data as report_data  # noqa: E402

# The tables whose trained rows differ in size (report_data.SIZE_SPREAD): the only ones with a params figure.
DIFFER_IN_SIZE = {"3", "4", "7", "9", "10", "12", "13", "14", "14b"}


def smoke_like(tmp_path: Path, table: str, seeds=(0, 1)) -> Path:
    """Two smoke-profile seeds of every row of ``table``, with accuracies as scattered as a smoke run's."""
    rdir = tmp_path / "results"
    t = tables.load_table(table)
    counted = {r["id"]: counted_params(t, r) for r in t.rows}
    for i, row in enumerate(t.rows):
        for seed in seeds:
            best = 10.0 + 3 * i + 5 * seed
            rec = run_row(tmp_path, row["id"], seed, best, best - 2, table=table, profile="smoke", label=row["label"])
            rec["params_paper"] = counted[row["id"]]
            append(rdir, table, rec)
    return rdir


def counted_params(table: tables.Table, row: dict) -> int:
    spec = tables.resolve(table, row, 0, {})
    return network.count_params(spec.spec, spec.in_shape)[0]


def axis_order(table: str) -> list[tuple[str, str]]:
    """(row id, tick) in the order the table file's ``axis`` names them."""
    return [(str(k), str(v)) for k, v in tables.load_table(table).axis["rows"].items()]


@pytest.mark.parametrize("table", ["2", "5", "8"])
def test_ablation_figure_shows_every_row_readably(tmp_path, table):
    """The figure's data, not its pixels: each row in its slot in the axis's order, the paper's figure beside the
    reproduced best and final means with their seed spread, and no tick label overprinting another."""
    rdir = smoke_like(tmp_path, table)
    (tr,) = report.collect(rdir, table).tables
    ab = report_data.ablation_points([tr])
    assert [(s.row_id, s.tick) for s in ab.slots] == axis_order(table) and ab.axis_name
    assert [s.x for s in ab.slots] == list(range(len(ab.slots)))
    assert ab.series == ["as printed (smoke runs)"]
    for slot in ab.slots:
        mine = {m.metric: m for m in ab.markers if m.row_id == slot.row_id}
        assert set(mine) == {"paper", "best", "final"}
        row = tables.load_table(table).row(slot.row_id)
        assert mine["paper"].mean == pytest.approx(float(row["paper"]["acc"]))
        r = next(r for r in tr.rows if r.row_id == slot.row_id)
        for metric in ("best", "final"):
            assert mine[metric].n == 2
            assert mine[metric].mean == pytest.approx(statistics.mean(r.values(metric)))
            assert mine[metric].std == pytest.approx(statistics.stdev(r.values(metric)))
        xs = sorted(m.x for m in mine.values())
        assert len(set(xs)) == 3 and slot.x - 0.5 < xs[0] and xs[-1] < slot.x + 0.5  # side by side, in its slot
    fig = plots.ablation_figure(ab)
    (ax,) = fig.axes
    ticks = ax.get_xticklabels()
    assert [t.get_text().replace("\n", " ") for t in ticks] == [tick for _, tick in axis_order(table)]
    assert plots.overlapping_texts(fig, ticks) == []
    legend = ax.get_legend().get_texts()
    assert plots.overlapping_texts(fig, list(ticks) + list(legend) + [ax.xaxis.label]) == []
    md = report.render(rdir, table).read_text()
    assert f"report/table{table}_ablation.png" in md
    assert not (rdir / "report" / f"table{table}_params.png").exists()  # all rows at one size


def test_every_table_file_names_its_axis_and_every_row_once():
    for t in tables.load_tables("all"):
        name, slots, notes = report_data.axis_slots(t)
        assert not notes and t.axis.get("name") == name, t.name
        assert sorted(s.row_id for s in slots) == sorted(r["id"] for r in t.rows), t.name
        assert len({s.tick for s in slots}) == len(slots), f"table {t.name}: two rows share a tick label"


def test_a_broken_or_missing_axis_keeps_the_tables_order_and_says_so():
    t2 = tables.load_table("2")
    bare = tables.Table("x", "", t2.rows)
    assert [s.row_id for s in report_data.axis_slots(bare)[1]] == [r["id"] for r in t2.rows]
    odd = tables.Table("x", "", t2.rows, axis={"name": "depth", "rows": {"13L": "13", "99L": "?"}})
    name, slots, notes = report_data.axis_slots(odd)
    assert [s.row_id for s in slots] == ["13L", "8L", "9L", "10L"] and "99L" in notes[0]
    assert report_data.axis_slots(tables.Table("x", "", t2.rows, axis="depth"))[2]


def test_params_figure_only_where_rows_differ_in_size(tmp_path):
    rdir = tmp_path / "results"
    rdir.mkdir()
    differ = {tr.table.name for tr in report.collect(rdir).tables if report_data.differs_in_size(tr)}
    assert differ == DIFFER_IN_SIZE


def test_params_figure_labels_never_overprint(tmp_path):
    """Table 7 puts three rows at 300K and three at 1.6M, paper and reproduced points close together."""
    rdir = smoke_like(tmp_path, "7")
    (tr,) = report.collect(rdir, "7").tables
    fig = plots.params_figure(tr)
    assert len(fig.point_labels) == 12  # paper and reproduced, six rows
    assert plots.overlapping_texts(fig, fig.point_labels) == []
    report.render(rdir, "7")
    assert (rdir / "report" / "table7_params.png").stat().st_size > 1000


def test_variants_are_drawn_beside_the_papers_rows_in_one_figure(tmp_path):
    out = tmp_path / "results"
    for variant, acc in (("", 95.0), ("dataset=cifar100", 78.0)):
        for row_id in ("WE10", "BW10"):
            for seed in (0, 1):
                row = run_row(tmp_path, row_id, seed, acc + seed, acc, table="4", label=row_id)
                row.update(variant=variant, config_hash=f"{row_id}{seed}{variant[:3]}")
                append(out, "4", row)
    base, variant = report.collect(out, "4").tables
    ab = report_data.ablation_points([base, variant])
    assert ab.series == ["as printed (full runs)", "dataset=cifar100 (full runs)"]
    we10 = {(m.series, m.metric): m.mean for m in ab.markers if m.row_id == "WE10"}
    assert we10[("as printed (full runs)", "best")] == pytest.approx(95.5)  # never averaged with the variant
    assert we10[("dataset=cifar100 (full runs)", "best")] == pytest.approx(78.5)
    assert not any(m.row_id == "WE13" and m.metric != "paper" for m in ab.markers)  # not run: paper only
    md = report.render(out, "4").read_text()
    assert md.count("table4_ablation.png") == 2  # drawn under the paper's rows, linked from the variant's section
    assert (out / "report" / "table4-variant1_curves.png").exists() is False  # (no curve.csv in this fixture)
    assert (out / "report" / "table4-variant1_params.png").is_file()  # Table 4: 8M and 128K rows


@pytest.mark.slow
def test_networks_of_ones_own_get_figures_too(tmp_path):
    out = tmp_path / "results"
    for seed, acc in enumerate([61.0, 63.0]):
        row = run_row(tmp_path, "arch2", seed, acc, acc, table="custom", label="arch2 (a network of your own)")
        row.update(variant="net.widths=C64,C128{2}", config_hash=f"c{seed}")
        write_curve(row, [30.0, acc])
        append(out, "custom", row)
    md = report.render(out, "custom").read_text()
    assert "report/tablecustom_ablation.png" in md and "plots failed" not in md


def test_zero_variance_on_both_sides_is_inconclusive_not_a_p_of_zero():
    """Smoke-like seeds with identical accuracies: Welch's t is undefined, so no holds/fails and no p=0."""
    from simpnet_cli.report import claims as C

    v = C.compare([21.88, 21.88], [10.94, 10.94], ">")
    assert (v.verdict, v.p, v.note) == ("inconclusive", None, C.NO_NOISE_ZERO)
    assert "p=" not in v.text()
    # One side with spread is a real test again.
    assert C.compare([21.0, 21.5, 22.0], [10.94, 10.94, 10.94], ">").verdict == "holds"


def test_smoke_runs_are_never_judged():
    from simpnet_cli.report import claims as C

    claim = {"text": "A beats B", "holds_if": ["A > B"]}
    samples = {"best": {"A": [90.0, 91.0, 92.0], "B": [50.0, 51.0, 52.0]}}
    judged = C.evaluate_claim(claim, samples)
    smoke = C.evaluate_claim(claim, samples, judge=False)
    assert judged.verdict("best") == "holds"
    assert smoke.verdict("best") == "inconclusive"
    assert "holds" not in smoke.cell("best") and "fails" not in smoke.cell("best")
    assert C.NOT_JUDGED in smoke.cell("best")


def test_report_of_one_table_keeps_the_other_tables_sections_and_figures(tmp_path):
    """`simpnet report table=7` re-draws Table 7 and keeps Table 2's section, and the figure an earlier report
    drew for it, in REPORT.md."""
    rdir = tmp_path / "results"
    for table, row_id in (("2", "8L"), ("7", "3x3-300K")):
        for seed, acc in enumerate([90.0, 90.5]):
            row = run_row(tmp_path, row_id, seed, acc, acc - 0.1, table=table)
            write_curve(row, [50.0, acc])
            append(rdir, table, row)
    report.render(rdir, "2")  # draws Table 2's figures
    drawn = (rdir / "report" / "table2_ablation.png").stat().st_mtime_ns
    md = report.render(rdir, "7").read_text()
    assert "## Table 2:" in md and "## Table 7:" in md
    assert "report/table2_ablation.png" in md and "report/table7_ablation.png" in md
    assert (rdir / "report" / "table2_ablation.png").stat().st_mtime_ns == drawn  # not re-drawn


def test_a_variant_on_another_dataset_has_no_paper_yardstick(tmp_path):
    """Table 12 on CIFAR-100 for a CIFAR-10 row: "Best - paper" is blank and the cited rows (other papers'
    CIFAR figures) are left out of that variant's section."""
    out = tmp_path / "results"
    for seed, acc in enumerate([70.0, 71.0]):
        row = run_row(tmp_path, "5M-C10", seed, acc, acc - 0.2, table="12", label="SimpNet 5.48M, CIFAR-10")
        row.update(variant="dataset=cifar100", dataset="cifar100", config_hash=f"v{seed}")
        append(out, "12", row)
    rep = report.collect(out, "12")
    (variant,) = [tr for tr in rep.tables if tr.variant]
    (r,) = [r for r in variant.rows if r.row_id == "5M-C10"]
    assert r.paper_acc is None and "not the paper's cifar10" in " ".join(r.notes)
    assert not [row for row in variant.rows if row.kind == "cited"]
    (paper,) = [tr for tr in rep.tables if not tr.variant]
    assert [row for row in paper.rows if row.kind == "cited"]  # the paper's configuration keeps them


def test_curves_title_names_the_variant_and_short_runs(tmp_path):
    """A figure is read apart from its section: its title says which variant it shows and that the runs
    stopped before their rows' schedules end."""
    from simpnet_cli.report import plots

    out = tmp_path / "results"
    full = T2.row("8L")["iterations"]
    for seed, acc in enumerate([60.0, 61.0]):
        row = run_row(tmp_path, "8L", seed, acc, acc - 0.5)
        append(out, "2", row)  # 1,000 iterations
        variant = dict(row, variant="net.dropout.head=0.3", config_hash=f"v{seed}", iterations=full)
        append(out, "2", variant)
    rep = report.collect(out, "2")
    paper, = [tr for tr in rep.tables if not tr.variant]
    other, = [tr for tr in rep.tables if tr.variant]
    assert f"short runs: 1,000 of {full:,} iterations" in plots.curves_title(paper)
    assert "net.dropout.head=0.3" not in plots.curves_title(paper)
    assert plots.curves_title(other).endswith("\nnet.dropout.head=0.3") and "short" not in plots.curves_title(other)
