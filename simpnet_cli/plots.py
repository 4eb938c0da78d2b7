"""The report's figures: accuracy vs parameters, and test-accuracy curves, one pair per table (PNG, Agg).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so rendering
touches no global backend state and works without a display. A missing or unreadable curve.csv only shrinks
the curves figure; a table without any curve gets no curves figure.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from simpnet_cli.report import TableReport

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_params(text: str) -> float | None:
    """The paper's printed size as a number: "300K" -> 3e5, "1.6M" -> 1.6e6, "300K.v1" -> 3e5; else None."""
    m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([KkMmGg]?)", str(text))
    if not m:
        return None
    return float(m[1]) * _SUFFIX[m[2].lower()]


def run_path(run_dir: str, results_dir: Path) -> Path:
    """A CSV's run_dir (relative to the repository, where runs are launched) as a path that exists if any does."""
    p = Path(run_dir)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), Path(results_dir).resolve().parent, Path(results_dir)):
        if (base / p).exists():
            return base / p
    return Path.cwd() / p


def read_curve(run_dir: Path) -> pd.DataFrame | None:
    """curve.csv of one run (iter and test_acc at least), or None when it is missing; ValueError if unreadable."""
    path = Path(run_dir) / "curve.csv"
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - empty, truncated, binary...
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not {"iter", "test_acc"} <= set(df.columns):
        raise ValueError(f"{path}: lacks columns iter/test_acc (has {', '.join(map(str, df.columns))})")
    df = df[["iter", "test_acc"]].apply(pd.to_numeric, errors="coerce").dropna(subset=["iter"])
    return df.sort_values("iter")


def _human(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}K"
    return f"{v:g}"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _colors(ids: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if len(ids) <= 10 else "tab20"]
    return {rid: cmap(i % cmap.N) for i, rid in enumerate(ids)}


def params_plot(tr: "TableReport", path: Path) -> Path | None:
    """Paper's points (hollow) and reproduced best (filled, ± std) and final (x) against parameters."""
    err = tr.error_display
    conv = (lambda a: 100.0 - a) if err else (lambda a: a)
    trained = [r for r in tr.rows if r.kind == "trained"]
    colors = _colors([r.row_id for r in trained])
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    drawn = False
    for i, r in enumerate(trained):
        c = colors[r.row_id]
        x_paper = parse_params(r.paper_params) or r.counted_params
        x_ours = r.counted_params or x_paper
        if r.paper_acc is not None and x_paper:
            ax.scatter([x_paper], [conv(r.paper_acc)], facecolors="none", edgecolors=[c], s=70, linewidths=1.5,
                       label="paper" if not drawn else None, zorder=3)
            ax.annotate(r.row_id, (x_paper, conv(r.paper_acc)), textcoords="offset points",
                        xytext=(6, 4 + 7 * (i % 3)), fontsize=8, color=c)
            drawn = True
        if r.n and x_ours:
            best = [conv(a) for a in r.values("best")]
            final = [conv(a) for a in r.values("final")]
            mb = sum(best) / len(best)
            sb = (sum((b - mb) ** 2 for b in best) / (len(best) - 1)) ** 0.5 if len(best) > 1 else 0.0
            ax.errorbar([x_ours], [mb], yerr=[sb], fmt="o", color=c, capsize=3, zorder=4)
            ax.scatter([x_ours], [sum(final) / len(final)], marker="x", color=c, zorder=4)
            ax.annotate(r.row_id, (x_ours, mb), textcoords="offset points", xytext=(6, -10 - 7 * (i % 3)),
                        fontsize=8, color=c, fontweight="bold")
            drawn = True
    if not drawn:
        return None
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="paper"),
               Line2D([], [], marker="o", ls="", color="k", label="reproduced best-over-training (± std)"),
               Line2D([], [], marker="x", ls="", color="k", label="reproduced final")]
    ax.legend(handles=handles, fontsize=8, loc="best")
    xs = [x for r in trained for x in (parse_params(r.paper_params), r.counted_params) if x]
    if xs and max(xs) / min(xs) > 5:
        ax.set_xscale("log")
    elif xs:  # all rows near one size (Tables 2, 5, 8): a little room either side, not a 0.01% wide axis
        ax.set_xlim(min(xs) * 0.9, max(xs) * 1.1)
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("parameters (paper: printed; reproduced: counted, BatchNorm excluded)")
    ax.margins(y=0.12)  # room for the row labels
    ax.set_ylabel("test error (%)" if err else "test accuracy (%)")
    title = f"Table {tr.table.name}: {'error' if err else 'accuracy'} vs parameters"
    if tr.profile:
        title += f" ({tr.profile} runs)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def curves_plot(tr: "TableReport", path: Path, results_dir: Path) -> tuple[Path | None, str, list[str]]:
    """Test accuracy (error for error tables) against iteration, one line per run, one colour per row."""
    err = tr.error_display
    warnings, found = [], 0
    ids = [r.row_id for r in tr.rows if r.kind == "trained"]
    colors = _colors(ids)
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    labelled = set()
    for run in sorted(tr.runs, key=lambda r: (ids.index(r["row_id"]) if r["row_id"] in ids else 0, r["seed"])):
        try:
            df = read_curve(run_path(str(run["run_dir"]), results_dir))
        except ValueError as e:
            warnings.append(f"table {tr.table.name}, row {run['row_id']}, seed {run['seed']}: curve {e}")
            continue
        if df is None or df.empty:
            continue
        found += 1
        y = 100.0 - df["test_acc"] if err else df["test_acc"]
        rid = run["row_id"]
        ax.plot(df["iter"], y, color=colors.get(rid, "grey"), lw=1.2, alpha=0.85,
                ls="-" if run["status"] == "ok" else "--", label=None if rid in labelled else rid)
        labelled.add(rid)
    total = len(tr.runs)
    note = "" if not total else f"Curves: {found} of {total} run(s) have a readable curve.csv."
    if not found:
        return None, note, warnings
    ax.set_xlabel("iteration")
    ax.set_ylabel("test error (%)" if err else "test accuracy (%)")
    ax.set_title(f"Table {tr.table.name}: test {'error' if err else 'accuracy'} during training "
                 f"({tr.profile} runs; dashed = diverged)", fontsize=10)
    ax.legend(fontsize=8, loc="best", title="row")
    ax.grid(alpha=0.3)
    ys = [v for line in ax.get_lines() for v in line.get_ydata() if math.isfinite(v)]
    if ys and not err:  # early evaluations near chance squash the interesting part
        top = max(ys)
        ax.set_ylim(max(min(ys), top - 40) - 1, min(100.0, top + 2))
    fig.tight_layout()
    return _save(fig, path), note, warnings


def table_plots(tr: "TableReport", out: Path, results_dir: Path) -> tuple[dict[str, Path], str, list[str]]:
    """Both figures of one table under ``out``: ({"params": png, "curves": png}, curves note, warnings)."""
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    params_png, curves_png = out / f"{tr.slug}_params.png", out / f"{tr.slug}_curves.png"
    for stale in (params_png, curves_png):  # a figure not drawn this time must not linger from an older report
        stale.unlink(missing_ok=True)
    if params_plot(tr, params_png):
        made["params"] = params_png
    c, note, warnings = curves_plot(tr, curves_png, results_dir)
    if c:
        made["curves"] = c
    return made, note, warnings
