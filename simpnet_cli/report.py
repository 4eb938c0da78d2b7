"""results/*.csv -> results/REPORT.md: the paper's tables next to the reproduced ones, claims tested, plots.

``render`` reads every results/table<N>.csv, groups each table's runs by profile (one profile per table,
never mixed), and writes

* ``REPORT.md``: a header that defines the metrics and the claim test, a summary, then one section per table;
* ``report/table<N>.md`` (and ``.tex`` with ``latex=True``): the same section on its own;
* ``report/table<N>_params.png`` and ``report/table<N>_curves.png`` (see ``plots.py``).

Metrics. *final* is the test accuracy at the last iteration; *best-over-training* is the maximum test
accuracy seen during training, the figure the paper reports, which selects the iteration on the test set.
Each is shown as mean ± sample standard deviation over the seeds whose status is ``ok``; diverged runs are
counted and shown, never averaged.

Profile rule. A table shows the runs of one profile: the requested one (``full`` by default) when that
table has any run of it; otherwise the profile with the most runs (ties: alphabetical), under a banner saying
its figures are not comparable to the paper. Runs of the other profiles are only counted in a note.

Claims. ``holds_if`` entries are comparisons of row ids on accuracy ("A > B": A is more accurate).
With at least two ok runs on both sides the test is Welch's t-test, one-sided at alpha = 0.05:

* ``A > B``  holds if A > B significantly; fails if B > A significantly; else inconclusive.
* ``A >= B`` fails if B > A significantly; holds if mean(A) >= mean(B) (not significantly worse);
  else (A lower, within noise) inconclusive.
* ``A < B`` and ``A <= B`` are ``B > A`` and ``B >= A``.

With fewer than two runs on a side there is no noise estimate: the means are compared (``>``: holds iff
mean(A) > mean(B), else fails; ``>=``: holds iff mean(A) >= mean(B), else fails) and the verdict says so.
A row without an ok run makes the comparison "not run". A claim holds if all its comparisons hold, fails if
any fails, is "not run" if none fails and one is not run, and is inconclusive otherwise.

Nothing in the CSVs is fatal: a malformed line (``results.BadLine``) or a line naming an unknown table or row
id is listed under "Skipped lines" in REPORT.md and logged as a warning.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from scipy import stats
from tabulate import tabulate

from simpnet_cli import network, results, tables
from simpnet_cli.errors import UserError

log = logging.getLogger(__name__)

ALPHA = 0.05
DEFAULT_PROFILE = "full"
SMOKE_BANNER = "smoke runs (tiny subset, few iterations): not comparable to the paper"
BEST_LABEL = "best-over-training (paper's metric, selects on test)"
FINAL_LABEL = "final (last iteration)"
NO_NOISE_EACH = "one run each, no noise estimate"
NO_NOISE_SIDE = "one run on one side, no noise estimate"
VERDICTS = ("holds", "fails", "inconclusive", "not run")
REPO_DIR = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- statistics

def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    return m, (sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan"))


def welch_p_greater(a: Sequence[float], b: Sequence[float]) -> float:
    """One-sided p-value of Welch's t-test for H1: mean(a) > mean(b) (scipy's ttest_ind, unequal variances).

    With no spread on either side the test is undefined; then it is 0 or 1 when the means differ and 0.5
    when they are equal.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two values on each side")
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    if va == 0.0 and vb == 0.0:
        return 0.0 if ma > mb else 1.0 if ma < mb else 0.5
    return float(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)


@dataclass(frozen=True)
class Verdict:
    verdict: str            # one of VERDICTS
    mean_a: float | None = None
    mean_b: float | None = None
    n_a: int = 0
    n_b: int = 0
    p: float | None = None  # Welch p-value of the direction tested ("A better"), None without a test
    note: str = ""
    missing: tuple[str, ...] = ()  # the row ids without an ok run, when the verdict is "not run"

    def text(self, skip_note: bool = False) -> str:
        if self.verdict == "not run":
            return "not run" + (f" ({', '.join(self.missing)} not run)" if self.missing else "")
        bits = [f"{self.mean_a:.2f} vs {self.mean_b:.2f}", f"n={self.n_a}/{self.n_b}"]
        if self.p is not None:
            bits.append(f"p={self.p:.3g}")
        if self.note and not skip_note:
            bits.append(self.note)
        return f"{self.verdict} ({', '.join(bits)})"


def compare(a: Sequence[float], b: Sequence[float], op: str = ">", alpha: float = ALPHA) -> Verdict:
    """Test ``A op B`` on two samples of accuracies (see the module docstring for the rule)."""
    if op in ("<", "<="):
        v = compare(b, a, op.replace("<", ">"), alpha)
        return Verdict(v.verdict, v.mean_b, v.mean_a, v.n_b, v.n_a, v.p, v.note)
    if op not in (">", ">="):
        raise ValueError(f"unknown comparison {op!r}")
    a, b = [float(x) for x in a], [float(x) for x in b]
    if not a or not b:
        return Verdict("not run", n_a=len(a), n_b=len(b))
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        ok = ma > mb if op == ">" else ma >= mb
        note = NO_NOISE_EACH if len(a) == len(b) == 1 else NO_NOISE_SIDE
        return Verdict("holds" if ok else "fails", ma, mb, len(a), len(b), None, note)
    p_better = welch_p_greater(a, b)
    p_worse = welch_p_greater(b, a)
    if p_worse < alpha:
        verdict = "fails"
    elif op == ">":
        verdict = "holds" if p_better < alpha else "inconclusive"
    else:
        verdict = "holds" if ma >= mb else "inconclusive"
    return Verdict(verdict, ma, mb, len(a), len(b), p_better, "")


_CMP = re.compile(r"^\s*(.+?)\s*(>=|<=|>|<)\s*(.+?)\s*$")


def parse_comparison(expr: str) -> tuple[str, str, str]:
    m = _CMP.match(str(expr))
    if not m:
        raise ValueError(f"cannot read comparison {expr!r}; expected 'A > B', 'A >= B', 'A < B' or 'A <= B'")
    return m[1], m[2], m[3]


def combine(verdicts: Sequence[str]) -> str:
    """A claim holds if all comparisons hold, fails if any fails; else not run / inconclusive."""
    if not verdicts:
        return "inconclusive"
    if "fails" in verdicts:
        return "fails"
    if "not run" in verdicts:
        return "not run"
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "inconclusive"


@dataclass
class ClaimResult:
    text: str
    comparisons: list[str]
    per_metric: dict[str, tuple[str, list[Verdict]]]  # metric -> (overall verdict, one Verdict per comparison)
    error: str = ""

    def verdict(self, metric: str) -> str:
        return self.per_metric[metric][0] if metric in self.per_metric else "inconclusive"

    def cell(self, metric: str) -> str:
        if self.error:
            return f"invalid claim: {self.error}"
        overall, parts = self.per_metric[metric]
        notes = sorted({v.note for v in parts if v.note and v.verdict != "not run"})
        head = f"**{overall}**" + (f" ({'; '.join(notes)})" if notes and overall in ("holds", "fails") else "")
        missing = [r for v in parts if v.verdict == "not run" for r in v.missing]
        shown_in_head = set(notes) if overall in ("holds", "fails") else set()
        details = [f"{c}: {v.text(skip_note=v.note in shown_in_head)}"
                   for c, v in zip(self.comparisons, parts) if v.verdict != "not run"]
        if missing:
            details.append(", ".join(dict.fromkeys(missing)) + " not run")
        return f"{head}: " + "; ".join(details)


def evaluate_claim(claim: dict, samples: dict[str, dict[str, list[float]]], alpha: float = ALPHA) -> ClaimResult:
    """``samples[metric][row_id]`` = the ok runs' accuracies; metric is "best" or "final"."""
    text = str(claim.get("text", ""))
    exprs = claim.get("holds_if") or []
    if isinstance(exprs, str):
        exprs = [exprs]
    exprs = [str(e) for e in exprs]
    try:
        parsed = [parse_comparison(e) for e in exprs]
    except ValueError as err:
        return ClaimResult(text, exprs, {}, str(err))
    known = set().union(*(set(by_row) for by_row in samples.values())) if samples else set()
    unknown = [r for a, _, b in parsed for r in (a, b) if r not in known]
    if unknown:
        return ClaimResult(text, exprs, {}, f"unknown row id(s) {', '.join(dict.fromkeys(unknown))}")
    per_metric = {}
    for metric, by_row in samples.items():
        parts = []
        for a, op, b in parsed:
            v = compare(by_row.get(a, []), by_row.get(b, []), op, alpha)
            if v.verdict == "not run":
                v = Verdict("not run", n_a=v.n_a, n_b=v.n_b, missing=tuple(r for r in (a, b) if not by_row.get(r)))
            parts.append(v)
        per_metric[metric] = (combine([v.verdict for v in parts]), parts)
    return ClaimResult(text, exprs, per_metric)


# --------------------------------------------------------------------------- collecting runs

@dataclass
class RowReport:
    kind: str                     # "trained" | "cited"
    row_id: str
    label: str
    dataset: str
    paper_params: str
    paper_acc: float | None       # the paper's accuracy as a number (None when not a single number)
    paper_text: str               # the paper's figure as it is displayed (accuracy or error, per table)
    counted_params: int | None = None
    ok_runs: list[dict] = field(default_factory=list)
    diverged: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.ok_runs)

    def values(self, metric: str) -> list[float]:
        return [float(r[f"{metric}_acc"]) for r in self.ok_runs]


@dataclass
class TableReport:
    table: tables.Table
    profile: str | None           # the profile shown, None when the table has no run at all
    banner: str                   # "" for the requested profile, else why the figures are not comparable
    rows: list[RowReport]
    claims: list[ClaimResult]
    runs: list[dict]              # every run shown (ok and diverged), for the curves
    other_profiles: dict[str, int]
    plots: dict[str, Path] = field(default_factory=dict)
    curve_note: str = ""
    variant: str = ""             # "" for the paper's configuration; else the overrides of the runs shown
    variant_no: int = 0           # 1, 2, ... for the variants of one table (file names)

    @property
    def error_display(self) -> bool:
        return self.table.display == "error"

    @property
    def slug(self) -> str:
        """The stem of this section's files: table4, table4-variant1, ..."""
        return f"table{self.table.name}" + (f"-variant{self.variant_no}" if self.variant else "")

    @property
    def heading(self) -> str:
        title = f"Table {self.table.name}: {self.table.title}".rstrip(": ")
        return title + (f" (variant: {self.variant})" if self.variant else "")


@dataclass
class Report:
    tables: list[TableReport]
    skipped: list[str]            # malformed CSV lines and lines naming unknown tables / rows
    warnings: list[str]           # everything else worth a look (unreadable table configs, curves...)
    profile: str


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _g(x: float) -> str:
    return f"{round(x, 4):g}"


def _figure(spec: dict, dataset: str, display: str) -> tuple[float | None, str]:
    """(accuracy as a number or None, the text to display) from a paper/cited mapping holding acc or error."""
    if "acc" in spec and spec["acc"] is not None:
        value, given = spec["acc"], "acc"
    elif "error" in spec and spec["error"] is not None:
        value, given = spec["error"], "error"
    else:
        return None, "-"
    if isinstance(value, dict):
        value = value.get(dataset, value.get(str(dataset)))
        if value is None:
            return None, "-"
    x = _num(value)
    want = "error" if display == "error" else "acc"
    if x is None:
        return None, str(value) + ("" if given == want else f" ({given})")
    acc = x if given == "acc" else 100.0 - x
    shown = x if given == want else 100.0 - x
    return acc, (str(value) if given == want else _g(shown))


def _dataset_name(value: Any) -> str:
    """A row's dataset as shown: "cifar10", or "cifar10 (augment=False)" for a ``{base: ..., ...}`` mapping."""
    if isinstance(value, dict):
        extra = ", ".join(f"{k}={v}" for k, v in value.items() if k != "base")
        return str(value.get("base", "?")) + (f" ({extra})" if extra else "")
    return str(value)


def _line_numbers(path: Path, bad: list[results.BadLine], n_rows: int) -> list[int | None]:
    """Line numbers of the rows ``results.read`` returned, in order (it skips blank and bad lines)."""
    try:
        lines = path.read_text(errors="replace").split("\n")
    except OSError:
        return [None] * n_rows
    if lines and lines[-1] == "":
        lines.pop()
    skip = {b.lineno for b in bad}
    nums = [n for n, line in enumerate(lines[1:], 2) if line.strip() and n not in skip]
    return nums if len(nums) == n_rows else [None] * n_rows


def _load(selector: Any, warnings: list[str], results_dir: Path | None = None) -> list[tables.Table]:
    if isinstance(selector, (list, tuple)):
        return [t for s in selector for t in _load(s, warnings, results_dir)]
    if str(selector) != "all":
        name = str(selector).removeprefix("table")
        if tables.table_path(name) is None and results_dir is not None \
                and results.csv_path(results_dir, name).exists():
            return tables_from_results(results_dir, {name})  # a network of one's own (table custom)
        return tables.load_tables(selector)  # an unknown or broken table the user named: a UserError
    out = []
    for name in tables.table_names():
        try:
            out.append(tables.load_table(name))
        except UserError as err:  # a table file being edited must not stop the report of the others
            warnings.append(f"table {name} skipped: {err}")
    return out


def _read_runs(results_dir: Path, known: dict[str, tables.Table], skipped: list[str]) -> list[dict]:
    runs = []
    for path in sorted(Path(results_dir).glob("table*.csv")):
        try:
            rows, bad = results.read(path)
        except (OSError, UnicodeError) as err:
            skipped.append(f"{path}: unreadable ({err}); the whole file is skipped")
            continue
        skipped += [str(b) for b in bad]
        for rec, lineno in zip(rows, _line_numbers(path, bad, len(rows))):
            where = f"{path}:{lineno}" if lineno else f"{path}"
            table = known.get(str(rec["table"]))
            if table is None:
                skipped.append(f"{where}: unknown table {rec['table']!r} (row {rec['row_id']!r}, seed {rec['seed']})")
                continue
            if rec["row_id"] not in {r["id"] for r in table.rows}:
                skipped.append(f"{where}: table {table.name} has no row {rec['row_id']!r} "
                               f"(label {rec['row']!r}, seed {rec['seed']})")
                continue
            rec["_where"] = where
            runs.append(rec)
    return runs


def _choose_profile(runs: list[dict], wanted: str) -> tuple[str | None, str]:
    counts = Counter(r["profile"] for r in runs)
    if not counts:
        return None, ""
    if counts.get(wanted):
        chosen = wanted
    else:
        chosen = sorted(counts, key=lambda p: (-counts[p], p))[0]
    if chosen == DEFAULT_PROFILE:
        return chosen, ""
    if chosen == "smoke":
        return chosen, SMOKE_BANNER
    return chosen, f"{chosen} runs (profile {chosen!r}, not {DEFAULT_PROFILE!r}): not comparable to the paper"


def _counted(table: tables.Table, row: dict, warnings: list[str]) -> int | None:
    try:
        spec = tables.resolve(table, row, 0, {})
        return network.count_params(spec.spec, spec.in_shape)[0]
    except Exception as err:  # noqa: BLE001 - a row that does not build must not stop the report
        warnings.append(f"table {table.name}, row {row['id']}: cannot count parameters: {err}")
        return None


def _table_report(table: tables.Table, all_runs: list[dict], wanted: str, warnings: list[str],
                  variant: str = "", variant_no: int = 0) -> TableReport:
    """One table's section for the runs of one variant ("" = the paper's configuration): a variant's runs are
    never averaged with the paper's, and the table's claims are checked within each variant."""
    mine = [r for r in all_runs if str(r["table"]) == table.name and str(r.get("variant") or "") == variant]
    profile, banner = _choose_profile(mine, wanted)
    shown = [r for r in mine if r["profile"] == profile]
    others = Counter(r["profile"] for r in mine if r["profile"] != profile)
    rows = []
    for row in table.rows:
        dataset = _dataset_name(row.get("dataset", ""))
        paper = row.get("paper") or {}
        acc, text = _figure(paper, dataset.split(" ")[0], table.display)
        rr = RowReport("trained", row["id"], str(row["label"]), dataset, str(paper.get("params", "-")), acc, text)
        runs = [r for r in shown if r["row_id"] == row["id"]]
        rr.ok_runs = [r for r in runs if r["status"] == "ok"]
        rr.diverged = sum(r["status"] == "diverged" for r in runs)
        now = _counted(table, row, warnings) if table.path is not None else None  # (own networks: from runs)
        recorded = Counter(int(r["params_paper"]) for r in runs)
        if recorded:
            rr.counted_params = recorded.most_common(1)[0][0]
            if len(recorded) > 1:
                rr.notes.append("runs differ in params: " + ", ".join(_params(p) for p in sorted(recorded)))
            if now is not None and set(recorded) != {now}:
                rr.notes.append(f"config now counts {_params(now)}")
        else:
            rr.counted_params = now
        seeds = Counter(int(r["seed"]) for r in runs)
        dup = sorted(s for s, c in seeds.items() if c > 1)
        if dup:
            rr.notes.append(f"seed(s) {', '.join(map(str, dup))} recorded more than once (configs differ)")
        rows.append(rr)
    for c in table.cited:
        acc_spec = c.get("acc", c.get("error"))
        keys = sorted(acc_spec) if isinstance(acc_spec, dict) else [None]
        for key in keys:
            dataset = str(key) if key is not None else (str(c.get("dataset")) if c.get("dataset") else "")
            acc, text = _figure(c, key, table.display) if key is not None else _figure(c, "", table.display)
            source = c.get("source")
            rr = RowReport("cited", "", str(c.get("label", "?")), dataset, str(c.get("params", "-")), acc, text)
            rr.notes.append(f"cited ({source})" if source else "cited")
            rows.append(rr)
    samples = {m: {r.row_id: r.values(m) for r in rows if r.kind == "trained"} for m in ("best", "final")}
    claims = [evaluate_claim(c, samples) for c in table.claims]
    for c in claims:
        if c.error:
            warnings.append(f"table {table.name}: claim {c.text!r}: {c.error}")
    return TableReport(table, profile, banner, rows, claims, shown, dict(others), variant=variant,
                       variant_no=variant_no)


def tables_from_results(results_dir: Path, names: set[str]) -> list[tables.Table]:
    """Tables that have results but no table file (networks of one's own: ``simpnet run arch=...``), with their
    rows as the runs name them; they have no paper figures and no claims."""
    out = []
    for name in sorted(names):
        rows, _ = results.read(results.csv_path(results_dir, name))
        seen: dict[str, dict] = {}
        for r in rows:
            seen.setdefault(str(r["row_id"]), {"id": str(r["row_id"]), "label": str(r["row"]),
                                               "dataset": str(r["dataset"]), "paper": {}})
        if seen:
            out.append(tables.Table(name, "Networks of your own (in no table of the paper)", list(seen.values())))
    return out


def collect(results_dir: Path, tables_sel: Any = "all", profile: str = DEFAULT_PROFILE) -> Report:
    """Everything the report shows, without writing anything."""
    warnings: list[str] = []
    skipped: list[str] = []
    selected = _load(tables_sel, warnings, Path(results_dir))
    known = {t.name: t for t in selected}
    for name in tables.table_names():  # rows of tables not selected are not "unknown"
        if name not in known:
            try:
                known[name] = tables.load_table(name)
            except UserError:
                pass
    recorded = {p.stem.removeprefix("table") for p in Path(results_dir).glob("table*.csv")}
    own = tables_from_results(Path(results_dir), (recorded - set(known)) if str(tables_sel) == "all" else set())
    selected += own
    known.update({t.name: t for t in own})
    runs = _read_runs(Path(results_dir), known, skipped)
    names = {t.name for t in selected}
    reports = []
    for t in selected:
        mine = [r for r in runs if str(r["table"]) == t.name]
        variants = sorted({str(r.get("variant") or "") for r in mine} - {""})
        reports.append(_table_report(t, mine, profile, warnings))
        reports += [_table_report(t, mine, profile, warnings, v, i) for i, v in enumerate(variants, 1)]
    return Report(reports, skipped, warnings, profile)


# --------------------------------------------------------------------------- formatting

def _params(p: int | None) -> str:
    if p is None:
        return "?"
    if p >= 1e6:
        return f"{p / 1e6:.2f}M"
    if p >= 1e3:
        return f"{p / 1e3:.1f}K"
    return str(p)


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return ""
    m, v = _mean_var(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} ± {math.sqrt(v):.2f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def columns(error: bool) -> list[str]:
    what = "error (%) = 100 - acc" if error else "acc (%)"
    return ["Row", "Network", "Dataset", "Params (paper)", "Params (counted)",
            f"Paper {'error (%)' if error else 'acc (%)'}", "n (ok seeds)",
            f"Final {what}, {FINAL_LABEL}", f"Best {what}, {BEST_LABEL}",
            "Best - paper" + (" (error)" if error else ""), "Time (mean)", "Status"]


def frame(tr: TableReport) -> pd.DataFrame:
    """The table as strings, one line per trained row and per cited figure."""
    err = tr.error_display
    conv = (lambda x: 100.0 - x) if err else (lambda x: x)
    lines = []
    for r in tr.rows:
        if r.kind == "cited":
            lines.append([r.row_id, r.label, r.dataset, r.paper_params, "", r.paper_text, "", "", "", "", "",
                          "; ".join(r.notes)])
            continue
        final = [conv(x) for x in r.values("final")]
        best = [conv(x) for x in r.values("best")]
        diff = ""
        if best and r.paper_acc is not None:
            diff = f"{sum(best) / len(best) - conv(r.paper_acc):+.2f}"
        walls = [float(x["wall_s"]) for x in r.ok_runs]
        status = []
        if r.n:
            status.append(f"{r.n} ok")
        if r.diverged:
            status.append(f"{r.diverged} diverged")
        if not r.n and not r.diverged:
            status.append("not run")
        status += r.notes
        lines.append([r.row_id, r.label, r.dataset, r.paper_params, _params(r.counted_params), r.paper_text,
                      str(r.n) if (r.n or r.diverged) else "", _mean_std(final), _mean_std(best), diff,
                      _duration(sum(walls) / len(walls)) if walls else "", "; ".join(status)])
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


def to_latex(df: pd.DataFrame) -> str:
    return tabulate([[_tex_escape(v) for v in row] for row in df.itertuples(index=False)],
                    headers=[_tex_escape(c) for c in df.columns], tablefmt="latex_raw", disable_numparse=True)


def section(tr: TableReport, link_prefix: str = "", level: int = 2) -> str:
    t = tr.table
    out = [f"{'#' * level} {tr.heading}", ""]
    if tr.variant:
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
    if tr.claims:
        out += [f"Claims ({tr.profile or 'no'} runs; Welch's t-test, one-sided, alpha = {ALPHA}):", "",
                to_markdown(claims_frame(tr)), ""]
    if tr.plots:
        for kind, path in tr.plots.items():
            title = {"params": "Accuracy vs parameters", "curves": "Test accuracy during training"}.get(kind, kind)
            out.append(f"![{title}, table {t.name}]({link_prefix}{path.name})")
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
        "reports (the best of the authors' logs); it picks the iteration on the test set, so it is optimistic.",
        "- Both are mean ± sample standard deviation (n - 1) over the seeds whose status is ok; n is their "
        "number. Diverged runs are counted in Status and left out of every mean and test.",
        "- **Best - paper**: mean best-over-training minus the paper's figure (for error tables, errors).",
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
        "estimate. A row without an ok run makes a comparison \"not run\". A claim holds if all its comparisons "
        "hold, fails if any fails, else is not run or inconclusive.",
        "",
    ])


def summary(rep: Report) -> str:
    lines = []
    for tr in rep.tables:
        trained = [r for r in tr.rows if r.kind == "trained"]
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


# --------------------------------------------------------------------------- rendering

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
        from simpnet_cli import plots as _plots
        for tr in rep.tables:
            try:
                tr.plots, tr.curve_note, notes = _plots.table_plots(tr, sub, results_dir)
                rep.warnings += notes
            except Exception as err:  # noqa: BLE001 - a plot must never cost the report
                rep.warnings.append(f"table {tr.table.name}: plots failed: {type(err).__name__}: {err}")
    for tr in rep.tables:
        (sub / f"{tr.slug}.md").write_text(section(tr, "", level=1) + "\n")
        if latex:
            tex = [f"% Table {tr.table.name}: {tr.table.title}" + (f" -- {tr.banner}" if tr.banner else ""),
                   to_latex(frame(tr))]
            if tr.claims:
                tex += ["", to_latex(claims_frame(tr))]
            (sub / f"{tr.slug}.tex").write_text("\n".join(tex) + "\n")
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
