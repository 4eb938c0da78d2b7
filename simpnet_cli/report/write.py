"""results/*.csv -> results/REPORT.md: the paper's tables next to the reproduced ones, claims tested, figures.

``render`` reads every results/table<N>.csv, groups each table's runs by profile (one profile per table,
never mixed) and by variant (never averaged with the paper's configuration), and writes

* ``REPORT.md``: a header that defines the metrics and the claim test, a summary, then one section per table
  and per variant;
* ``report/table<N>.md`` (and ``.tex`` with ``latex=True``): the same section on its own;
* ``report/table<N>_ablation.png`` (the rows along the table's ablation axis, every configuration),
  ``report/<section>_curves.png`` and, where the rows differ in size, ``report/<section>_params.png``.

The data flows one way: ``claims`` (the statistics) -> ``report_data`` (what is shown: ``collect``) ->
``report_text`` (markdown, LaTeX) and ``plots`` (figures) -> this module, which writes the files. The names
below are re-exported so ``report.collect``, ``report.compare`` ... keep working.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from simpnet_cli.report.claims import (ALPHA, NO_NOISE_EACH, NO_NOISE_SIDE, VERDICTS, ClaimResult, Verdict,  # noqa: F401
                                combine, compare, evaluate_claim, parse_comparison, welch_p_greater)
from simpnet_cli.report.data import (BEST_LABEL, DEFAULT_PROFILE, FINAL_LABEL, SMOKE_BANNER, Report,  # noqa: F401
                                     RowReport, TableReport, ablation_points, collect, differs_in_size)
from simpnet_cli.report.text import claims_frame, frame, header, section, summary, to_latex, to_markdown  # noqa: F401

log = logging.getLogger(__name__)


def _draw_figures(rep: Report, sub: Path, results_dir: Path) -> None:
    """Every table's figures under ``sub``, recorded in each TableReport's ``plots``; a figure that fails
    becomes a warning, never a lost report."""
    from simpnet_cli.report import plots  # matplotlib only when figures are wanted

    by_table: dict[str, list[TableReport]] = {}
    for tr in rep.tables:
        by_table.setdefault(tr.table.name, []).append(tr)
    for name, configurations in by_table.items():
        try:
            rep.warnings += plots.table_figures(configurations, sub, results_dir)
        except Exception as err:  # noqa: BLE001 - a plot must never cost the report
            rep.warnings.append(f"table {name}: plots failed: {type(err).__name__}: {err}")


def _adopt_figures(tr: TableReport, sub: Path) -> None:
    """A section not re-drawn this time links the figures already on disk for it (see plots.table_figures)."""
    for kind, path in (("ablation", sub / f"table{tr.table.name}_ablation.png"),
                       ("params", sub / f"{tr.slug}_params.png"), ("curves", sub / f"{tr.slug}_curves.png")):
        if path.is_file():
            tr.plots[kind] = path


def _write_section_files(tr: TableReport, sub: Path, latex: bool) -> None:
    (sub / f"{tr.slug}.md").write_text(section(tr, "", level=1) + "\n")
    if latex:
        note = (tr.banner[0].upper() + tr.banner[1:] + ".") if tr.banner else ""
        tex = [r"% simpnet report: needs \usepackage{booktabs}",
               to_latex(frame(tr), f"{tr.heading}.", f"tab:simpnet-{tr.slug}", note)]
        if tr.claims:
            tex += ["", to_latex(claims_frame(tr), f"{tr.heading}: claims, Welch's t-test, one-sided.",
                                 f"tab:simpnet-{tr.slug}-claims", note)]
        (sub / f"{tr.slug}.tex").write_text("\n".join(tex) + "\n")


def render(results_dir: Path, tables: Any = "all", out_dir: Path | None = None, latex: bool = False,
           profile: str = DEFAULT_PROFILE, plots: bool = True) -> Path:
    """Write ``REPORT.md`` and ``report/table<N>.{md,tex,png}`` under ``out_dir`` (default: ``results_dir``).

    ``tables``: "all", a table name or a list of names. ``profile``: the profile to show where a table has
    runs of it. Returns the path of REPORT.md. Skipped CSV lines and other problems are logged as warnings
    and listed in the report; none is fatal.
    """
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    sub = out_dir / "report"
    sub.mkdir(parents=True, exist_ok=True)
    rep = collect(results_dir, tables, profile)
    if plots:
        _draw_figures(rep, sub, results_dir)
    for tr in rep.tables:
        _write_section_files(tr, sub, latex)
    if tables != "all":
        # REPORT.md keeps every table that has runs: the chosen ones are re-drawn above, the others show the
        # figures an earlier report drew for them (their numbers are re-read from their CSVs either way).
        fresh = {(tr.table.name, tr.variant): tr for tr in rep.tables}
        everything = collect(results_dir, "all", profile)
        kept = []
        for tr in everything.tables:
            if (tr.table.name, tr.variant) in fresh:
                kept.append(fresh[tr.table.name, tr.variant])
            elif tr.runs:
                _adopt_figures(tr, sub)
                kept.append(tr)
        everything.tables = kept
        everything.warnings = list(dict.fromkeys(rep.warnings + everything.warnings))
        everything.skipped = list(dict.fromkeys(rep.skipped + everything.skipped))
        rep = everything
    parts = [header(rep, results_dir), summary(rep)]
    parts += [section(tr, "report/") for tr in rep.tables]
    parts.append("## Skipped lines\n")
    if rep.skipped:
        parts.append("Lines of the results CSVs left out of every table:\n")
        parts += [f"- `{s}`" for s in rep.skipped]
    else:
        parts.append("None.")
    if rep.warnings:
        parts += ["", "## Warnings", ""] + [f"- {w}" for w in rep.warnings]
    for s in rep.skipped:
        log.warning("skipped results line: %s", s)
    for w in rep.warnings:
        log.warning("%s", w)
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path
