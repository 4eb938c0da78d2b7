"""The report's figures (PNG, Agg), drawn from what ``report_data`` computed; nothing here decides a number.

Per table: the *ablation* figure (its rows along the table's ablation axis, named and ordered in the table file:
the paper's figure beside each configuration's reproduced best-over-training and final means with their seed
spread), the *test curves* of each section, and *accuracy vs parameters* only where the rows differ in size
(``report_data.differs_in_size``). No two labels of a figure overprint: tick labels are wrapped and, when they
would still touch, turned; point labels are moved apart (``overlapping_texts`` is what the tests check).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so rendering
touches no global backend state and works without a display. A missing or unreadable curve.csv only shrinks
the curves figure; a section without any curve gets no curves figure.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from simpnet_cli.report.claims import mean_var
from simpnet_cli.report.data import (PAPER_STATS, Ablation, TableReport, ablation_points, axis_slots,
                                     differs_in_size, parse_params, run_path)
from simpnet_cli.runs import authors

PAPER_COLOR = "black"
# The paper's figure by its statistic (report_data.PAPER_STATS; "": the table file's stat is unknown): a hollow
# black marker whose shape says what the printed figure is, so a mean of runs is not read as a best run.
PAPER_MARKERS = {"best": "D", "mean": "s", "run": "^", "": "h"}
TICK_WIDTH = 14  # characters per line of a tick label before it wraps


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
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legend placed below the axes
    return path


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # a renderer to measure labels with before saving
    return fig


def overlapping_texts(fig: Figure, texts: Sequence[Text]) -> list[tuple[str, str]]:
    """The pairs of visible, non-empty ``texts`` whose drawn boxes overlap (what "overprint" means here)."""
    fig.canvas.draw()  # places every text (legend entries, ticks) where it will be saved
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]


def _colors(ids: list[str]) -> dict[str, tuple]:
    """One colour per row id (or per series of the ablation figure), distinct up to 20."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if len(ids) <= 10 else "tab20"]
    return {rid: cmap(i % cmap.N) for i, rid in enumerate(ids)}


# --------------------------------------------------------------------------- the ablation figure

def _paper_label(stat: str) -> str:
    return f"paper: {PAPER_STATS[stat][0]}" if stat in PAPER_STATS else "paper (as printed, stat unknown)"


def _paper_stats(ab: Ablation) -> list[str]:
    """The statistics of the paper's figures drawn, in PAPER_MARKERS' order."""
    drawn = {m.stat for m in ab.markers if m.metric == "paper"}
    return [s for s in PAPER_MARKERS if s in drawn]


def _draw_markers(ax, ab: Ablation, colors: dict[str, tuple]) -> None:
    """Per series and metric one errorbar artist: paper (hollow, shaped by its statistic), best (filled dot),
    final (cross)."""
    paper = dict(mfc="none", mec=PAPER_COLOR, ms=7, mew=1.5)
    style = {"best": dict(fmt="o", ms=6), "final": dict(fmt="X", ms=6, mfc="white")}
    for stat in _paper_stats(ab):
        points = [m for m in ab.markers if m.metric == "paper" and m.stat == stat]
        ax.errorbar([m.x for m in points], [m.mean for m in points], yerr=None,  # (no caps across the markers)
                    color=PAPER_COLOR, ls="none", zorder=3, fmt=PAPER_MARKERS[stat], **paper)
    for series in ab.series:
        for metric in ("best", "final"):
            points = [m for m in ab.markers if m.series == series and m.metric == metric]
            if not points:
                continue
            ax.errorbar([m.x for m in points], [m.mean for m in points], yerr=[m.std for m in points],
                        color=colors[series], capsize=3, lw=1.2, ls="none", zorder=3, **style[metric])


def _legend_handles(ab: Ablation, colors: dict[str, tuple]) -> list:
    """The kinds of marker in black (the paper's, one per statistic drawn), then one colour per configuration:
    short entries, so the legend stays within the figure's width however many variants there are."""
    from matplotlib.patches import Patch
    handles = [Line2D([], [], marker=PAPER_MARKERS[s], ls="", mfc="none", mec=PAPER_COLOR, mew=1.5,
                      label=_paper_label(s)) for s in _paper_stats(ab)]
    handles += [Line2D([], [], marker="o", ls="", color="dimgrey", label="best-over-training, mean ± std"),
               Line2D([], [], marker="X", ls="", color="dimgrey", mfc="white", label="final, mean ± std")]
    return handles + [Patch(color=colors[s], label=s) for s in ab.series]


def _readable_ticks(fig: Figure, ax) -> None:
    """Wrapped tick labels that still touch are turned, then made smaller, until none overprints another."""
    for rotation, size in ((0, 9), (30, 9), (45, 8), (60, 7), (90, 6)):
        for label in ax.get_xticklabels():
            label.set_rotation(rotation)
            label.set_ha("center" if rotation in (0, 90) else "right")
            label.set_fontsize(size)
        if not overlapping_texts(fig, ax.get_xticklabels()):
            return


def ablation_figure(ab: Ablation) -> Figure | None:
    """The rows along the table's axis; None when there is nothing to draw (no paper figure, no run)."""
    if not ab.markers:
        return None
    width = max(7.5, 1.6 + 0.95 * len(ab.slots))
    fig = _new_figure(width, 5.2)
    ax = fig.add_subplot()
    colors = _colors(ab.series)
    _draw_markers(ax, ab, colors)
    for slot in ab.slots[1:]:  # a faint line between rows: each row's markers read as one group
        ax.axvline(slot.x - 0.5, color="grey", alpha=0.2, lw=0.8)
    ax.set_xticks([s.x for s in ab.slots], [textwrap.fill(s.tick, TICK_WIDTH) for s in ab.slots])
    ax.set_xlim(-0.6, len(ab.slots) - 0.4)
    ax.set_xlabel(ab.axis_name)
    ax.set_ylabel("test error (%)" if ab.error else "test accuracy (%)")
    ax.margins(y=0.1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Table {ab.table}: {'error' if ab.error else 'accuracy'} along the ablation axis", fontsize=10)
    ax.legend(handles=_legend_handles(ab, colors), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=3 if width >= 9 else 2, frameon=False)
    fig.tight_layout()
    _readable_ticks(fig, ax)
    return fig


def ablation_plot(ab: Ablation, path: Path) -> Path | None:
    fig = ablation_figure(ab)
    return _save(fig, path) if fig is not None else None


# --------------------------------------------------------------------------- accuracy vs parameters

def _separate(fig: Figure, labels: list, step: float = 9.0, tries: int = 40) -> None:
    """Move point labels up or down (in points) until none overlaps one placed before it."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for label in labels:
        x0, y0 = label.xyann
        for k in range(tries):
            shift = ((k + 1) // 2) * step * (1 if k % 2 else -1)  # 0, +1, -1, +2, -2 ... steps
            label.xyann = (x0, y0 + shift)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)


def params_figure(tr: TableReport) -> Figure | None:
    """Paper's points (hollow) and reproduced best (filled, ± std) and final (x) against parameters; the row
    labels are ``fig.point_labels`` (None when there is no point to draw)."""
    err = tr.error_display
    conv = (lambda a: 100.0 - a) if err else (lambda a: a)
    trained = [r for r in tr.rows if r.kind == "trained"]
    colors = _colors([r.row_id for r in trained])
    fig = _new_figure(7.5, 5)
    ax = fig.add_subplot()
    labels = []
    for r in trained:
        c = colors[r.row_id]
        x_paper = parse_params(r.paper_params) or r.counted_params
        x_ours = r.counted_params or x_paper
        if r.paper_acc is not None and x_paper:
            ax.scatter([x_paper], [conv(r.paper_acc)], facecolors="none", edgecolors=[c], s=70, linewidths=1.5,
                       zorder=3)
            labels.append(ax.annotate(r.row_id, (x_paper, conv(r.paper_acc)), textcoords="offset points",
                                      xytext=(7, 3), fontsize=8, color=c))
        if r.n and x_ours:
            best = [conv(a) for a in r.values("best")]
            final = [conv(a) for a in r.values("final")]
            mb, vb = mean_var(best)
            sb = math.sqrt(vb) if len(best) > 1 else 0.0
            ax.errorbar([x_ours], [mb], yerr=[sb], fmt="o", color=c, capsize=3, zorder=4)
            ax.scatter([x_ours], [mean_var(final)[0]], marker="x", color=c, zorder=4)
            labels.append(ax.annotate(r.row_id, (x_ours, mb), textcoords="offset points", xytext=(7, -10),
                                      fontsize=8, color=c, fontweight="bold"))
    if not labels:
        return None
    handles = [Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="paper"),
               Line2D([], [], marker="o", ls="", color="k", label="reproduced best-over-training (± std)"),
               Line2D([], [], marker="x", ls="", color="k", label="reproduced final")]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    xs = [x for r in trained for x in (parse_params(r.paper_params), r.counted_params) if x]
    if xs and max(xs) / min(xs) > 5:
        ax.set_xscale("log")
        if max(xs) / min(xs) < 100:  # under two decades a log axis shows one or two ticks: add 2x and 5x
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    elif xs:
        ax.set_xlim(min(xs) * 0.8, max(xs) * 1.25)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("parameters (paper: printed; reproduced: counted, BatchNorm excluded)")
    ax.margins(y=0.15)  # room for the row labels
    ax.set_ylabel("test error (%)" if err else "test accuracy (%)")
    title = f"Table {tr.table.name}: {'error' if err else 'accuracy'} vs parameters"
    if tr.profile:
        title += f" ({tr.profile} runs)"
    ax.set_title(title + (f"\n{tr.variant}" if tr.variant else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _separate(fig, labels)  # after the layout: the labels are placed where they are drawn
    fig.point_labels = labels
    return fig


def params_plot(tr: TableReport, path: Path) -> Path | None:
    fig = params_figure(tr)
    return _save(fig, path) if fig is not None else None


# --------------------------------------------------------------------------- test curves

def curves_title(tr: TableReport) -> str:
    """The curves figure's title: the table, the profile, the variant (a figure is read apart from its section)
    and, when the runs stopped before their rows' schedules end, how far they went."""
    title = (f"Table {tr.table.name}: test {'error' if tr.error_display else 'accuracy'} during training "
             f"({tr.profile} runs; dashed = diverged)")
    schedule = {r["id"]: r.get("iterations") for r in tr.table.rows}
    short = sorted({(int(run["iterations"]), int(schedule[run["row_id"]])) for run in tr.runs
                    if isinstance(schedule.get(run["row_id"]), int) and _is_number(run.get("iterations"))
                    and int(run["iterations"]) < schedule[run["row_id"]]})
    if short:
        ran = ", ".join(f"{done:,} of {full:,}" for done, full in short[:3]) + (", ..." if len(short) > 3 else "")
        title += f"\nshort runs: {ran} iterations of the row's schedule"
    return title + (f"\n{tr.variant}" if tr.variant else "")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _our_curves(tr: TableReport, results_dir: Path) -> tuple[dict[str, list], list[str], int]:
    """({row id: [(run, curve frame)]}, warnings, curves found) of the section's runs."""
    by_row: dict[str, list] = {}
    warnings, found = [], 0
    for run in sorted(tr.runs, key=lambda r: r["seed"]):
        try:
            df = read_curve(run_path(str(run["run_dir"]), results_dir))
        except ValueError as e:
            warnings.append(f"table {tr.table.name}, row {run['row_id']}, seed {run['seed']}: curve {e}")
            continue
        if df is None or df.empty:
            continue
        found += 1
        by_row.setdefault(run["row_id"], []).append((run, df))
    return by_row, warnings, found


def seeds_band(curves: list[pd.DataFrame]) -> pd.DataFrame:
    """Mean, lowest and highest test accuracy over seeds at each iteration all of them tested (or, if they share
    none, at every iteration any did)."""
    both = pd.concat([c.assign(_run=i) for i, c in enumerate(curves)])
    stats = both.groupby("iter")["test_acc"].agg(["mean", "min", "max", "count"]).reset_index()
    shared = stats[stats["count"] == len(curves)]
    return shared if not shared.empty else stats


def lr_drops(curves: pd.DataFrame) -> list[int]:
    """The iterations where an authors' log's learning rate falls (first test after the drop)."""
    drops = set()
    for _, log in curves.groupby("log"):
        lr = log["lr"].to_numpy()
        it = log["iteration"].to_numpy()
        drops.update(int(it[k]) for k in range(1, len(lr)) if lr[k] < lr[k - 1])
    return sorted(drops)


def curves_figure(tr: TableReport, results_dir: Path) -> tuple[Figure | None, str, list[str]]:
    """Test accuracy (error for error tables) against iteration, one colour per row: this project's runs as the
    mean over ok seeds (thick) with their lowest-highest band, a diverged run dashed on its own; the authors' runs
    of the same row thin, one line per log (a resumed ``_r`` log from its first iteration); the authors'
    learning-rate drops as dotted verticals. Every line has a gid: ``ours|ROW``, ``ours-diverged|ROW|SEED``,
    ``authors|ROW|LOG``, ``lr-drop|ITERATION``; the seed band is a PolyCollection with gid ``ours-spread|ROW``."""
    err = tr.error_display
    conv = (lambda a: 100.0 - a) if err else (lambda a: a)
    ids = [s.row_id for s in axis_slots(tr.table)[1]]  # the ablation figure's order
    colors = _colors(ids)
    by_row, warnings, found = _our_curves(tr, results_dir)
    total = len(tr.runs)
    note = "" if not total else f"Curves: {found} of {total} run(s) have a readable curve.csv."
    if not found:
        return None, note, warnings
    fig = _new_figure(8.5, 5.2)
    ax = fig.add_subplot()
    rows = {r.row_id: r for r in tr.rows if r.kind == "trained"}
    drops: set[int] = set()
    order = sorted(by_row, key=lambda rid: ids.index(rid) if rid in ids else len(ids))
    for rid in order:
        color = colors.get(rid, "grey")
        row = rows.get(rid)
        if row is not None and row.authors:
            theirs = authors.curves_of(tr.table.name, rid)
            for log, curve in theirs.groupby("log", sort=True):
                ax.plot(curve["iteration"], conv(curve["test_acc"]), color=color, lw=0.6, alpha=0.55, zorder=1,
                        gid=f"authors|{rid}|{log}")
            drops.update(lr_drops(theirs))
        ok = [df for run, df in by_row[rid] if run["status"] == "ok"]
        if ok:
            band = seeds_band(ok)
            if len(ok) > 1:
                ax.fill_between(band["iter"], conv(band["min"]), conv(band["max"]), color=color, alpha=0.25,
                                lw=0, zorder=2).set_gid(f"ours-spread|{rid}")
            ax.plot(band["iter"], conv(band["mean"]), color=color, lw=1.8, zorder=3, gid=f"ours|{rid}")
        for run, df in by_row[rid]:
            if run["status"] != "ok":
                ax.plot(df["iter"], conv(df["test_acc"]), color=color, lw=1.2, ls="--", zorder=3,
                        gid=f"ours-diverged|{rid}|{run['seed']}")
    for it in sorted(drops):
        ax.axvline(it, color="grey", ls=":", lw=0.9, zorder=0, gid=f"lr-drop|{it}")
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a 4-iteration run has no iteration 2.5
    ax.set_ylabel("test error (%)" if err else "test accuracy (%)")
    ax.set_title(curves_title(tr), fontsize=10)
    handles = [Patch(color=colors.get(rid, "grey"), label=rid) for rid in order]
    handles += [Line2D([], [], color="dimgrey", lw=1.8, label="this project: mean over seeds\n(band: lowest-highest)"),
                Line2D([], [], color="dimgrey", lw=0.6, label="the authors' runs, one line\nper log (their Caffe logs)")]
    if drops:
        handles.append(Line2D([], [], color="grey", ls=":", lw=0.9, label="lr drop (authors' logs:\nthe first test after it)"))
    # beside the axes: a legend inside would cover curves
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="row", frameon=False)
    ax.grid(alpha=0.3)
    ys = [v for line in ax.get_lines() if not str(line.get_gid()).startswith("lr-drop")
          for v in line.get_ydata() if math.isfinite(v)]
    if ys and not err:  # the first evaluations near chance squash the interesting part: the lowest 2% are cut
        top, low = max(ys), sorted(ys)[len(ys) // 50]
        ax.set_ylim(max(low, top - 60) - 1, min(100.0, top + 2))
    fig.tight_layout()
    return fig, note, warnings


def curves_plot(tr: TableReport, path: Path, results_dir: Path) -> tuple[Path | None, str, list[str]]:
    fig, note, warnings = curves_figure(tr, results_dir)
    return (_save(fig, path) if fig is not None else None), note, warnings


# --------------------------------------------------------------------------- one table's figures

def _remove(paths: list[Path]) -> None:
    for stale in paths:  # a figure not drawn this time must not linger from an older report
        stale.unlink(missing_ok=True)


def table_figures(configurations: list[TableReport], out: Path, results_dir: Path) -> list[str]:
    """The figures of one table under ``out``: ``configurations`` are its sections (the paper's rows as printed
    first, then each variant). Records them in each section's ``plots`` and ``curve_note``; returns warnings."""
    out.mkdir(parents=True, exist_ok=True)
    name = configurations[0].table.name
    ablation_png = out / f"table{name}_ablation.png"
    _remove([ablation_png] + [out / f"{tr.slug}_{kind}.png" for tr in configurations for kind in ("params", "curves")])
    ab = ablation_points(configurations)
    warnings = [f"table {name}: {note}" for note in ab.notes]
    if ablation_plot(ab, ablation_png):
        for tr in configurations:
            tr.plots["ablation"] = ablation_png
    for tr in configurations:
        params_png, curves_png = out / f"{tr.slug}_params.png", out / f"{tr.slug}_curves.png"
        if differs_in_size(tr) and params_plot(tr, params_png):
            tr.plots["params"] = params_png
        drawn, tr.curve_note, notes = curves_plot(tr, curves_png, results_dir)
        warnings += notes
        if drawn:
            tr.plots["curves"] = drawn
    return warnings
