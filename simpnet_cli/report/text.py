"""The report's text: a ``report_data.TableReport`` as a pandas frame, markdown and LaTeX, and REPORT.md's
header, summary and per-table sections. Pure formatting: it computes nothing the report shows.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from simpnet_cli.report.claims import ALPHA, mean_var
from simpnet_cli.report.data import (BEST_LABEL, FINAL_LABEL, PAPER_STATS, PaperComparison, Report, RowReport,
                                     TableReport, against_authors, authors_spread, paper_comparison, params_text)

REPO_DIR = Path(__file__).resolve().parents[2]
# The report's figures by kind (``TableReport.plots`` keys), in the order a section shows them.
PLOT_TITLES = {"ablation": "The rows along the table's ablation axis", "params": "Accuracy vs parameters",
               "curves": "Test accuracy during training"}




def _mean_std(xs: list[float]) -> str:
    if not xs:
        return ""
    m, v = mean_var(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} ± {math.sqrt(v):.2f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


COMPARED = "Best - paper compares"  # the column saying which statistics "Best - paper" compares
AUTHORS = "Authors' runs, best"  # the range of the authors' runs' best-over-training, beside the paper's figure


def columns(error: bool) -> list[str]:
    what = "error (%) = 100 - acc" if error else "acc (%)"
    return ["Row", "Network", "Dataset", "Params (paper)", "Params (counted)",
            f"Paper {'error (%)' if error else 'acc (%)'}", f"{AUTHORS} {'error' if error else 'acc'} (%)",
            "n (ok seeds)",
            f"Final {what}, {FINAL_LABEL}", f"Best {what}, {BEST_LABEL}",
            "Best - paper" + (" (error)" if error else ""), COMPARED, "Time (mean)", "Status"]


def _compared(r: RowReport, cmp: PaperComparison | None) -> str:
    """The statistics "Best - paper" compares, or, before any run, what the paper's figure is."""
    if r.paper_acc is None:
        return ""
    if r.paper_stat not in PAPER_STATS:
        return "unknown paper stat: not compared"
    return cmp.text if cmp is not None else f"(paper: {PAPER_STATS[r.paper_stat][0]})"


def frame(tr: TableReport) -> pd.DataFrame:
    """The table as strings, one line per trained row and per cited figure."""
    err = tr.error_display
    conv = (lambda x: 100.0 - x) if err else (lambda x: x)
    lines = []
    for r in tr.rows:
        if r.kind == "cited":
            lines.append([r.row_id, r.label, r.dataset, r.paper_params, "", r.paper_text, "", "", "", "", "", "",
                          "", "; ".join(r.notes)])
            continue
        final = [conv(x) for x in r.values("final")]
        best = [conv(x) for x in r.values("best")]
        cmp = paper_comparison(r, err)  # the statistic the paper's figure is, on both sides
        diff = f"{cmp.diff:+.2f}" if cmp is not None else ""
        walls = [float(x["wall_s"]) for x in r.ok_runs]
        status = []
        if r.n:
            status.append(f"{r.n} ok")
        if r.diverged:
            status.append(f"{r.diverged} diverged")
        if not r.n and not r.diverged:
            status.append("not run")
        status += r.notes
        lines.append([r.row_id, r.label, r.dataset, r.paper_params, params_text(r.counted_params), r.paper_text,
                      authors_spread(r, err), str(r.n) if (r.n or r.diverged) else "", _mean_std(final), _mean_std(best), diff,
                      _compared(r, cmp), _duration(sum(walls) / len(walls)) if walls else "", "; ".join(status)])
    df = pd.DataFrame(lines, columns=columns(err))
    if len({r.dataset for r in tr.rows if r.dataset}) <= 1:
        df = df.drop(columns="Dataset")
    return df


def claims_frame(tr: TableReport) -> pd.DataFrame:
    lines = [[c.text, ", ".join(c.comparisons), c.cell("best"), c.cell("final")] for c in tr.claims]
    return pd.DataFrame(lines, columns=["Claim", "Comparisons (on accuracy)", f"Verdict, {BEST_LABEL}",
                                        f"Verdict, {FINAL_LABEL}"])


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    return tabulate([[_md_escape(v) for v in row] for row in df.itertuples(index=False)],
                    headers=[_md_escape(c) for c in df.columns], tablefmt="pipe", disable_numparse=True)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "<": r"$<$", ">": r"$>$"}


def _tex_escape(s: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s).replace("**", ""))


def to_latex(df: pd.DataFrame, caption: str = "", label: str = "", note: str = "") -> str:
    """``df`` as a booktabs tabular (\\toprule, \\midrule, \\bottomrule: ``\\usepackage{booktabs}``); with a
    ``caption`` a whole table float, whose caption ends with ``note`` in bold (a smoke banner must be seen
    wherever the table is pasted, not only in a comment)."""
    body = [" & ".join(_tex_escape(v) for v in row) + r" \\" for row in df.itertuples(index=False)]
    tabular = [r"\begin{tabular}{" + "l" * len(df.columns) + "}", r"\toprule",
               " & ".join(_tex_escape(c) for c in df.columns) + r" \\", r"\midrule", *body, r"\bottomrule",
               r"\end{tabular}"]
    if not caption:
        return "\n".join(tabular)
    text = _tex_escape(caption) + (r" \textbf{" + _tex_escape(note) + "}" if note else "")
    return "\n".join([r"\begin{table}[htbp]", r"\centering", r"\small", r"\caption{" + text + "}",
                      *([r"\label{" + label + "}"] if label else []), *tabular, r"\end{table}"])


def section(tr: TableReport, link_prefix: str = "", level: int = 2) -> str:
    t = tr.table
    out = [f"{'#' * level} {tr.heading}", ""]
    if tr.variant and not tr.beside_base:
        out += [f"The rows of Table {t.name}, every one trained with `{tr.variant}` (the claims are checked "
                "within these runs).", ""]
    elif tr.variant:
        out += [f"The rows of Table {t.name} trained with `{tr.variant}` (a variant: its runs are never averaged "
                "with the paper's configuration; the paper's figures are those of the rows as printed, for "
                "reference, and the claims are checked within this variant).", ""]
    if tr.profile is None:
        out.append("No runs recorded yet.")
    else:
        n_ok = sum(r.n for r in tr.rows)
        n_div = sum(r.diverged for r in tr.rows)
        out.append(f"Profile shown: **{tr.profile}** ({n_ok} ok run(s)" + (f", {n_div} diverged" if n_div else "")
                   + ").")
    if tr.banner:
        out += ["", f"> **{tr.banner}**"]
    if tr.other_profiles:
        out += ["", "Not shown (profiles are never mixed): "
                + ", ".join(f"{n} {p} run(s)" for p, n in sorted(tr.other_profiles.items())) + "."]
    if tr.error_display:
        out += ["", "This table is printed as error = 100 - accuracy, as in the paper."]
    out += ["", to_markdown(frame(tr)), ""]
    standing = [a.text for a in (against_authors(r) for r in tr.rows if r.kind == "trained") if a is not None]
    if standing:
        out += ["Against the authors' runs of the same row (best-over-training accuracy, %; our seeds' mean "
                "below, inside or above the range of theirs): " + "; ".join(standing) + ".", ""]
    if tr.claims:
        out += [f"Claims ({tr.profile or 'no'} runs; Welch's t-test, one-sided, alpha = {ALPHA}; on this "
                "project's seeds only, the authors' spread is not used as noise):", "",
                to_markdown(claims_frame(tr)), ""]
    if tr.plots:
        for kind in sorted(tr.plots, key=lambda k: list(PLOT_TITLES).index(k) if k in PLOT_TITLES else 99):
            title, link = PLOT_TITLES.get(kind, kind), f"{link_prefix}{tr.plots[kind].name}"
            if tr.variant and tr.beside_base and kind == "ablation":  # one figure per table, drawn once
                out.append(f"This variant's rows are drawn beside the paper's configuration in [{title.lower()}, "
                           f"table {t.name}]({link}).")
            else:
                out.append(f"![{title}, table {t.name}]({link})")
        out.append("")
    if tr.curve_note:
        out += [tr.curve_note, ""]
    return "\n".join(out)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def header(rep: Report, results_dir: Path) -> str:
    commit = _commit()
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return "\n".join([
        "# SimpNet reproduction report",
        "",
        f"Generated {when} from `{results_dir}`" + (f" at commit {commit}" if commit else "") + ".",
        "Paper: Hasanpour et al., *Towards Principled Design of Deep Convolutional Networks: Introducing SimpNet*"
        " (arXiv 1802.06205).",
        "",
        "## How to read it",
        "",
        f"- **{FINAL_LABEL}**: test accuracy at the last training iteration. No choice is made on the test set.",
        f"- **{BEST_LABEL}**: the maximum test accuracy seen over training. This is the figure the paper "
        "reports (for most rows, that of the authors' best run; see Best - paper); it picks the iteration on "
        "the test set, so it is optimistic.",
        "- Both are mean ± sample standard deviation (n - 1) over the seeds whose status is ok; n is their "
        "number. Diverged runs are counted in Status and left out of every mean and test.",
        "- **Best - paper**: our seeds' best-over-training minus the paper's figure (for error tables, errors), "
        "reduced over seeds as the paper's figure was over the authors' runs; the next column says which: "
        "*best of n seeds vs the authors' best run* (the default: the paper's figure is a maximum over runs, "
        "so our most accurate seed is compared, for error tables the lowest error); *mean of n seeds vs the "
        "mean of the authors' runs* (figures the paper averages over runs); *mean of n seeds vs one of the "
        "authors' runs* (a figure from one run that is not the authors' best). Before any run the column says "
        "which the paper's figure is.",
        "- **Authors' runs, best**: the range of the best-over-training accuracy of the authors' own runs of the "
        "row (their Caffe logs, shipped in simpnet_cli/data/), beside the paper's figure, which is one of them or "
        "their mean. It shows how far the authors' runs of one row spread; the claims are still tested on this "
        "project's seeds alone (Welch's t-test needs the runs of both rows compared, and the authors have one run "
        "of most rows). The line under each table says where our mean best falls against that range (below, "
        "inside, above) and at which iteration each peaked; the curves figure draws their runs beside ours.",
        "- **Params (counted)**: conv and classifier weights and biases, BatchNorm excluded (the paper's count), "
        "from the runs' CSV, or from the current config for rows not run.",
        "- Tables 13 and 14 are printed as error = 100 - accuracy, as the paper prints them. Cited rows are "
        "other papers' figures as printed; they are never trained.",
        f"- **Profiles** are never mixed: each table shows its {rep.profile!r} runs when it has any, otherwise "
        "the profile with the most runs, under a banner saying it is not comparable to the paper. "
        "Runs of other profiles are only counted.",
        f"- **Claims** compare rows on accuracy (A > B: A is more accurate), for each metric. With at least two "
        f"ok runs on both sides: Welch's t-test (unequal variances), one-sided, alpha = {ALPHA}. "
        "`A > B` holds if A is significantly above B, fails if B is significantly above A, else inconclusive. "
        "`A >= B` fails if B is significantly above A, holds if mean A >= mean B, else (A lower within noise) "
        "inconclusive. With one run on a side the means are compared and the verdict says there is no noise "
        "estimate; with no spread on either side (identical seeds) the comparison is inconclusive, and smoke runs "
        "are never judged. A row without an ok run makes a comparison \"not run\". A claim holds if all its comparisons "
        "hold, fails if any fails, else is not run or inconclusive.",
        "",
    ])


def summary(rep: Report) -> str:
    lines = []
    for tr in rep.tables:
        trained = [r for r in tr.rows if r.kind == "trained" and not r.differs]  # (a row's own lines)
        done = sum(1 for r in trained if r.n)
        def tally(metric):
            c = Counter(cl.verdict(metric) if not cl.error else "invalid" for cl in tr.claims)
            return ", ".join(f"{n} {v}" for v, n in sorted(c.items())) or "-"
        prof = (tr.profile or "-") + (" (not comparable)" if tr.banner else "")
        anchor = re.sub(r"[^a-z0-9 _-]", "", tr.heading.lower()).replace(" ", "-")
        name = tr.table.name + (f" ({tr.variant})" if tr.variant else "")
        lines.append([f"[{name}](#{anchor})", tr.table.title, prof, f"{done}/{len(trained)}", tally("best"),
                      tally("final")])
    df = pd.DataFrame(lines, columns=["Table", "Title", "Profile shown", "Rows with ok runs",
                                      f"Claims, {BEST_LABEL}", f"Claims, {FINAL_LABEL}"])
    return "## Summary\n\n" + to_markdown(df) + "\n"
