"""What the report shows, computed from results/*.csv and the table files, before anything is rendered.

``collect`` reads every results/table<N>.csv and returns a ``Report``: per table and per variant a
``TableReport`` (its rows with their ok runs, the paper's figures, the claims' verdicts), the lines it
skipped and warnings. ``ablation_points`` and ``differs_in_size`` are the data of the report's figures.
Nothing here writes a file or draws; ``report_text`` and ``plots`` render what this module computes.

Metrics. *final* is the test accuracy at the last iteration; *best-over-training* is the maximum test
accuracy seen during training, the figure the paper reports, which selects the iteration on the test set.
Each is shown as mean ± sample standard deviation over the seeds whose status is ``ok``; diverged runs are
counted and shown, never averaged.

The paper's statistic. A row's printed figure is not always the best of the authors' best run: its ``paper``
mapping says which statistic of the authors' runs it is (``stat``, see ``PAPER_STATS``), and "Best - paper"
compares it with the same statistic of our seeds' best-over-training accuracies (``paper_comparison``): the
maximum for ``best`` (a maximum over runs), the mean for ``mean`` (a mean of runs) and for ``run`` (one run,
not selected as the best). An unknown ``stat`` is a note and a warning, and that row is not compared.

Profile rule. A table shows the runs of one profile: the requested one (``full`` by default) when that
table has any run of it; otherwise the profile with the most runs (ties: alphabetical), under a banner saying
its figures are not comparable to the paper. Runs of the other profiles are only counted in a note.

Variants. Runs whose ``variant`` column is not empty (command-line overrides of a paper's row) form a
``TableReport`` of their own per variant: never averaged with the paper's configuration, claims checked
within the variant.

One row, one computation. A row's figures pool only the seeds of one computation (the ``computation`` column:
the run's identity but its seed, tables.RunSpec.computation; for a line written before the column, computed
from its run folder's config.yaml). Runs of a row under any other computation (two networks under one
``custom.row``, another dataset, a conf_dir table or arch that redefines the row, an older simpnet's folder of
the same seed under another hash) are a line of their own below the row's, named by what differs (the keys of
config.yaml whose values differ, else the line's dataset or size, else the computation's hash), never
compared with the paper and left out of the claims. The row's own line is the computation the table file
gives the row now, else the one with the most ok seeds. A line whose computation cannot be known (no column,
no folder) is grouped by its dataset, size and length, and a seed is never counted twice in one line.

Nothing in the CSVs is fatal: a malformed line (``results.BadLine``) or a line naming an unknown table or row
id is listed under "Skipped lines" and logged as a warning.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from simpnet_cli.nets import specs as network
from simpnet_cli.runs import authors, results, sources
from simpnet_cli.config import tables
from simpnet_cli.report.claims import ClaimResult, evaluate_claim, mean_var
from simpnet_cli.errors import UserError

DEFAULT_PROFILE = "full"
SMOKE_BANNER = "smoke runs (tiny subset, few iterations): not comparable to the paper"
BEST_LABEL = "best-over-training (paper's metric, selects on test)"
FINAL_LABEL = "final (last iteration)"

# ``paper.stat`` of a table row: which statistic of the authors' runs (each run's best-over-training) the
# printed figure is -> (what the paper's figure is, how our seeds' bests are reduced to compare with it).
# The paper's figure is a maximum over runs only for "best"; comparing a mean of runs or one unselected run
# with our maximum would flatter us, so those compare with our mean.
PAPER_STATS = {
    "best": ("the authors' best run", "max"),
    "mean": ("the mean of the authors' runs", "mean"),
    "run": ("one of the authors' runs", "mean"),
}
DEFAULT_STAT = "best"


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
    paper_stat: str | None = DEFAULT_STAT  # a PAPER_STATS key; None: the table file's stat is unknown
    # The authors' runs of the row (runs/authors.py: one dict per log, best_acc, best_iter, final_acc, wall_h...);
    # empty for a row without logs, for a row's other computations, and where the runs shown are on another
    # dataset than the row's.
    authors: list[dict] = field(default_factory=list)
    computation: str = ""         # the computation whose seeds this line pools ("" before any run)
    differs: str = ""             # "" for the row's own computation; else what differs from it (its own line)

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
    # False for the first variant of a table whose rows as printed have no section (a table with no file and
    # no run without overrides): its section holds the table's figure instead of pointing to another's.
    beside_base: bool = True

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


def _paper_stat(spec: dict) -> tuple[str | None, str]:
    """(the PAPER_STATS key of a row's ``paper`` mapping, a problem to note): absent means "best"; an unknown
    value gives (None, why), so a table being edited costs one row's comparison, never the report."""
    raw = spec.get("stat")
    if raw is None:
        return DEFAULT_STAT, ""
    stat = str(raw).strip().lower()
    if stat in PAPER_STATS:
        return stat, ""
    return None, f"unknown paper stat {raw!r} (known: {', '.join(PAPER_STATS)}): not compared with the paper"


@dataclass(frozen=True)
class PaperComparison:
    """"Best - paper" of one row, in the table's display (accuracy, or error = 100 - accuracy)."""
    stat: str       # a PAPER_STATS key
    ours: float     # our seeds' statistic (best seed's best, or mean of the bests)
    paper: float
    n: int          # ok seeds

    @property
    def diff(self) -> float:
        return self.ours - self.paper

    @property
    def text(self) -> str:
        """What is compared with what: "best of 3 seeds vs the authors' best run"."""
        paper, ours = PAPER_STATS[self.stat]
        seeds = f"{self.n} seed" + ("" if self.n == 1 else "s")
        return f"{'best' if ours == 'max' else 'mean'} of {seeds} vs {paper}"


def paper_comparison(r: RowReport, error: bool = False) -> PaperComparison | None:
    """Our seeds' best-over-training reduced as the paper's figure was (``PAPER_STATS``), against that figure;
    None without an ok run, a numeric paper figure or a known stat. Reduced on accuracy, then shown as error
    where the table is (the best seed is the most accurate: the lowest error)."""
    bests = r.values("best")
    if not bests or r.paper_acc is None or r.paper_stat not in PAPER_STATS:
        return None
    ours = max(bests) if PAPER_STATS[r.paper_stat][1] == "max" else sum(bests) / len(bests)
    conv = (lambda a: 100.0 - a) if error else (lambda a: a)
    return PaperComparison(r.paper_stat, conv(ours), conv(r.paper_acc), len(bests))


def authors_spread(r: RowReport, error: bool = False) -> str:
    """The authors' runs' best-over-training beside the paper's figure: "89.66-90.21 (3 runs)" (as errors, 100 -
    accuracy, for error tables), "" without."""
    if not r.authors:
        return ""
    bests = [round(100.0 - float(a["best_acc"]), 4) if error else float(a["best_acc"]) for a in r.authors]
    span = f"{min(bests):g}" if len(bests) == 1 else f"{min(bests):g}-{max(bests):g}"
    return f"{span} ({len(bests)} run{'s' * (len(bests) > 1)})"


def _iters(values: list) -> str:
    lo, hi = int(min(values)), int(max(values))
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


@dataclass(frozen=True)
class AgainstAuthors:
    """Where a row's best-over-training falls against the authors' runs of the same row, and when each peaked."""
    row_id: str
    where: str              # "below" | "inside" | "above" their range of bests
    ours: float             # the mean of our ok seeds' bests
    n: int
    ours_iters: str         # the iteration (range) of our seeds' bests
    theirs: str             # their range of bests, "89.66-90.21"
    runs: int
    theirs_iters: str

    @property
    def text(self) -> str:
        seeds = f"mean of {self.n} seeds" if self.n > 1 else "1 seed"
        return (f"{self.row_id} **{self.where}**: {self.ours:.2f} ({seeds}, best at {self.ours_iters}) vs the "
                f"authors' {self.theirs} ({self.runs} run{'s' * (self.runs > 1)}, best at {self.theirs_iters})")


def against_authors(r: RowReport) -> AgainstAuthors | None:
    """Our seeds' mean best-over-training against the range of the authors' runs' bests (below, inside, above);
    None without an ok run or an authors' log."""
    if not r.authors or not r.ok_runs:
        return None
    ours = sum(r.values("best")) / r.n
    bests = [float(a["best_acc"]) for a in r.authors]
    where = "below" if ours < min(bests) else "above" if ours > max(bests) else "inside"
    return AgainstAuthors(r.row_id, where, ours, r.n, _iters([int(x["best_iter"]) for x in r.ok_runs]),
                          authors_spread(r).split(" ")[0], len(bests), _iters([a["best_iter"] for a in r.authors]))


def _dataset_name(value: Any, feed: Any = None) -> str:
    """A row's dataset as shown: "cifar10", or "cifar10 (augment=none)" where the row changes its dataset or
    feed mapping (``{base: ..., ...}``) from the named config."""
    extra = [f"{k}={v}" for part in (value, feed) if isinstance(part, dict) for k, v in part.items() if k != "base"]
    name = str(value.get("base", "?")) if isinstance(value, dict) else str(value)
    return name + (f" ({', '.join(extra)})" if extra else "")


def run_path(run_dir: str, results_dir: Path) -> Path:
    """A CSV's run_dir (relative to the repository, where runs are launched) as a path that exists if any does."""
    p = Path(run_dir)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), Path(results_dir).resolve().parent, Path(results_dir)):
        if (base / p).exists():
            return base / p
    return Path.cwd() / p


def _run_config(rec: dict, results_dir: Path | None) -> dict | None:
    """The config.yaml of a line's run folder, when it is there and is that run's."""
    import yaml

    if results_dir is None:
        return None
    try:
        config = yaml.safe_load((run_path(str(rec["run_dir"]), results_dir) / "config.yaml").read_text())
    except (OSError, UnicodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) and str(config.get("config_hash")) == str(rec["config_hash"]) else None


def _computations(runs: list[dict], results_dir: Path | None) -> dict[str, list[dict]]:
    """A row's runs by computation: the ``computation`` column, else from the run's config.yaml, else (nothing
    says) by what the line says of its data, size and length, with a seed never twice in one group."""
    groups: dict[str, list[dict]] = {}
    for rec in runs:
        key = str(rec.get("computation") or "")
        if not key:
            config = _run_config(rec, results_dir)
            key = (tables.computation_of(config) if config else None) or ""
        if not key:
            key = f"?{rec.get('dataset')}|{rec['counted_params']}|{rec['params_total']}|{rec['iterations']}"
            n = 0
            while any(int(r["seed"]) == int(rec["seed"]) for r in groups.get(f"{key}#{n}", [])):
                n += 1
            key = f"{key}#{n}"
        groups.setdefault(key, []).append(rec)
    return groups


def _identity_keys(config: dict) -> dict:
    """What a run folder's config.yaml says the run computes, flattened (``net.widths``, ``dataset.name``...)."""
    train = {k: v for k, v in (config.get("train") or {}).items() if k not in tables.NON_IDENTITY_TRAIN_KEYS}
    flat = tables._flat({"net": config.get("net") or {}, "dataset": config.get("dataset") or {},
                         "solver": config.get("solver") or {}, "train": train})
    return {**flat, **({"step": config["step"]} if config.get("step") else {})}  # a stacked run's shared step


SHOWN_DIFFERENCES = 3  # keys named in a line's "what differs"; the rest are counted


def _differences(main: list[dict], other: list[dict], other_key: str, results_dir: Path | None) -> str:
    """What makes ``other``'s computation not ``main``'s, in words: differing config keys (names first), else
    the lines' dataset or size, else its computation's hash."""
    configs = [next((c for c in (_run_config(r, results_dir) for r in runs) if c), None) for runs in (main, other)]
    if all(configs):
        a, b = (_identity_keys(c) for c in configs)
        keys = sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k)),
                      key=lambda k: (not k.endswith((".name", "widths")), k))
        if keys:
            words = [f"{k}={tables._word(b[k]) if k in b else 'unset'}" for k in keys[:SHOWN_DIFFERENCES]]
            more = len(keys) - SHOWN_DIFFERENCES
            return ", ".join(words) + (f" (+{more} more)" if more > 0 else "")
    facts = [("dataset", lambda r: str(r.get("dataset"))), ("params", lambda r: params_text(int(r["counted_params"]))),
             ("iterations", lambda r: str(r["iterations"]))]
    for name, fact in facts:
        mine, theirs = {fact(r) for r in main}, {fact(r) for r in other}
        if mine != theirs:
            return f"{name} {', '.join(sorted(theirs))}"
    return f"computation {other_key[:8]}" if not other_key.startswith("?") else "another computation"


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
            return tables_from_results(results_dir, {name})  # own networks, or a conf_dir table kept by `run`
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


def _row_first(groups: dict[str, list[dict]], table: tables.Table, row: dict, variant: str,
               profile: str | None) -> list[str]:
    """A row's computations in the order of its lines: the one the table file gives the row now (for the rows
    as printed, under a profile of conf/profile/), else the one with the most ok seeds, first; then by ok seeds
    and by when their first run finished."""
    def rank(key):
        runs = groups[key]
        return (-sum(r["status"] == "ok" for r in runs), min(str(r.get("finished_at")) for r in runs), key)

    order = sorted(groups, key=rank)
    if len(order) > 1 and not variant and table.path is not None and profile is not None:
        try:
            now = tables.resolve(table, row, 0, tables.load_named("profile", profile)).computation
        except Exception:  # noqa: BLE001 - a row or profile that no longer resolves: the most seeds first
            now = None
        if now in groups:
            order.remove(now)
            order.insert(0, now)
    return order


def _table_report(table: tables.Table, all_runs: list[dict], wanted: str, warnings: list[str],
                  variant: str = "", variant_no: int = 0, results_dir: Path | None = None) -> TableReport:
    """One table's section for the runs of one variant ("" = the paper's configuration): a variant's runs are
    never averaged with the paper's, and the table's claims are checked within each variant; a row's runs
    of another computation are lines of their own (``_computations``)."""
    mine = [r for r in all_runs if str(r["table"]) == table.name and str(r.get("variant") or "") == variant]
    profile, banner = _choose_profile(mine, wanted)
    shown = [r for r in mine if r["profile"] == profile]
    others = Counter(r["profile"] for r in mine if r["profile"] != profile)
    rows, other_dataset = [], False
    for row in table.rows:
        dataset = _dataset_name(row.get("dataset", ""), row.get("feed"))
        paper = row.get("paper") or {}
        acc, text = _figure(paper, dataset.split(" ")[0], table.display)
        rr = RowReport("trained", row["id"], str(row["label"]), dataset, str(paper.get("params", "-")), acc, text)
        rr.paper_stat, problem = _paper_stat(paper)
        if problem:
            rr.notes.append(problem)
            warnings.append(f"table {table.name}, row {row['id']}: {problem}")
        groups = _computations([r for r in shown if r["row_id"] == row["id"]], results_dir)
        order = _row_first(groups, table, row, variant, profile)
        now = _counted(table, row, warnings) if table.path is not None else None  # (own networks: from runs)
        for i, key in enumerate(order or [""]):
            line = rr if i == 0 else dataclasses.replace(rr, notes=[], ok_runs=[], authors=[])
            runs = groups.get(key, [])
            line.computation = key
            if i:  # another computation of the row: its own line, named by what differs, never the paper's
                line.differs = _differences(groups[order[0]], runs, key, results_dir)
                own = Counter(str(r.get("row") or line.label) for r in runs).most_common(1)[0][0]  # its label
                line.label = f"{own} ({line.differs})"
                line.dataset = ", ".join(sorted({str(r.get("dataset")) for r in runs})) or line.dataset
                line.paper_acc, line.paper_text, line.paper_stat = None, "-", None
            elif len(order) > 1:
                line.notes.append(f"{len(order) - 1} other computation(s) of this row on their own line(s) below")
            ran_on = {str(r.get("dataset") or "") for r in runs} - {""}
            if not i and ran_on and ran_on != {dataset.split(" ")[0]}:
                # A variant on another dataset: the paper's figure (and any cited row) is no yardstick for it.
                line.paper_acc, line.paper_text = None, f"({line.paper_text} on {dataset.split(' ')[0]})"
                line.notes.append(f"trained on {', '.join(sorted(ran_on))}, not the paper's {dataset.split(' ')[0]}")
                other_dataset = True
            elif not i and table.path is not None:
                line.authors = authors.runs_of(table.name, row["id"]).to_dict("records")
            line.ok_runs = [r for r in runs if r["status"] == "ok"]
            line.diverged = sum(r["status"] == "diverged" for r in runs)
            recorded = Counter(int(r["counted_params"]) for r in runs)
            if recorded:
                line.counted_params = recorded.most_common(1)[0][0]
                if len(recorded) > 1:
                    line.notes.append("runs differ in params: " + ", ".join(params_text(p) for p in sorted(recorded)))
                if now is not None and set(recorded) != {now} and not i:
                    line.notes.append(f"config now counts {params_text(now)}")
            else:
                line.counted_params = now
            rows.append(line)
    for c in ([] if other_dataset else table.cited):
        acc_spec = c.get("acc", c.get("error"))
        keys = sorted(acc_spec) if isinstance(acc_spec, dict) else [None]
        for key in keys:
            dataset = str(key) if key is not None else (str(c.get("dataset")) if c.get("dataset") else "")
            acc, text = _figure(c, key, table.display) if key is not None else _figure(c, "", table.display)
            source = c.get("source")
            rr = RowReport("cited", "", str(c.get("label", "?")), dataset, str(c.get("params", "-")), acc, text)
            rr.notes.append(f"cited ({source})" if source else "cited")
            rows.append(rr)
    samples = {m: {r.row_id: r.values(m) for r in rows if r.kind == "trained" and not r.differs}
               for m in ("best", "final")}
    claims = [evaluate_claim(c, samples, judge=profile != "smoke") for c in table.claims]
    for c in claims:
        if c.error:
            warnings.append(f"table {table.name}: claim {c.text!r}: {c.error}")
    return TableReport(table, profile, banner, rows, claims, shown, dict(others), variant=variant,
                       variant_no=variant_no)


def tables_from_results(results_dir: Path, names: set[str]) -> list[tables.Table]:
    """Tables that have results but no table file on the search path: a conf_dir's table as ``simpnet run``
    kept it (runs/sources.py: title, claims, axis, paper figures), else a network of one's own (``simpnet run
    arch=...``) with no paper figures and no claims; either way with every row its runs name."""
    out = []
    for name in sorted(names):
        rows, _ = results.read(results.csv_path(results_dir, name))
        kept = sources.recall(results_dir, name)
        seen: dict[str, dict] = {r["id"]: r for r in (kept.rows if kept is not None else [])}
        for r in rows:
            seen.setdefault(str(r["row_id"]), {"id": str(r["row_id"]), "label": str(r["row"]),
                                               "dataset": str(r["dataset"]), "paper": {}})
        if kept is not None:
            out.append(dataclasses.replace(kept, rows=list(seen.values())))
        elif seen:
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
    reports = []
    for t in selected:
        mine = [r for r in runs if str(r["table"]) == t.name]
        variants = sorted({str(r.get("variant") or "") for r in mine} - {""})
        with_variants = [_table_report(t, mine, profile, warnings, v, i, Path(results_dir))
                         for i, v in enumerate(variants, 1)]
        if t.path is None and variants and not any(str(r.get("variant") or "") == "" for r in mine):
            # Rows known only from their runs (or from what `run` kept of a conf_dir's table), all run with
            # overrides: a section of the rows without them would be rows that were never meant to run.
            with_variants[0].beside_base = False
        else:
            reports.append(_table_report(t, mine, profile, warnings, results_dir=Path(results_dir)))
        reports += with_variants
    return Report(reports, skipped, warnings, profile)


def params_text(p: int | None) -> str:
    if p is None:
        return "?"
    if p >= 1e6:
        return f"{p / 1e6:.2f}M"
    if p >= 1e3:
        return f"{p / 1e3:.1f}K"
    return str(p)


# --------------------------------------------------------------------------- the figures' data

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
# Rows "differ in size" when the largest is at least this many times the smallest: Tables 3, 4, 7, 9, 10,
# 12-14 (1.5x to 60x), not Tables 2, 5, 8 (one size) nor 6 and 11 (within 1.4x, where the plot would
# only show the rows stacked at one size).
SIZE_SPREAD = 1.5


def parse_params(text: str) -> float | None:
    """The paper's printed size as a number: "300K" -> 3e5, "1.6M" -> 1.6e6, "300K.v1" -> 3e5; else None."""
    m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([KkMmGg]?)", str(text))
    if not m:
        return None
    return float(m[1]) * _SUFFIX[m[2].lower()]


def row_size(r: RowReport) -> float | None:
    """A trained row's size: counted (from its runs or its config), else as the paper prints it."""
    return r.counted_params or parse_params(r.paper_params)


def differs_in_size(tr: TableReport) -> bool:
    """Whether the accuracy-vs-parameters figure says anything: the trained rows span SIZE_SPREAD or more."""
    sizes = [s for s in (row_size(r) for r in tr.rows if r.kind == "trained") if s]
    return len(sizes) > 1 and max(sizes) / min(sizes) >= SIZE_SPREAD


@dataclass(frozen=True)
class AxisSlot:
    """One trained row's place on its table's ablation axis."""
    row_id: str
    x: int          # 0, 1, ... in the axis's order
    tick: str       # what the axis calls the row ("8 layers", "pool after conv 5")


@dataclass(frozen=True)
class Marker:
    """One figure of one row in the ablation figure."""
    row_id: str
    x: float        # the row's slot plus this series' offset within it
    series: str     # "paper", or the configuration's name ("as printed", a variant's overrides)
    metric: str     # "paper" | "best" | "final"
    mean: float     # accuracy, or error for error tables
    std: float      # sample standard deviation over the ok seeds; 0 for the paper and for one seed
    n: int          # ok seeds (0 for the paper's figure)
    stat: str = ""  # the paper's figure only: its PAPER_STATS key ("" when the table file's stat is unknown)


@dataclass
class Ablation:
    """The data of a table's ablation figure: its rows along the axis, every configuration's markers."""
    table: str
    axis_name: str
    slots: list[AxisSlot]
    markers: list[Marker]
    series: list[str]          # the configurations drawn, in order (the paper's rows as printed first)
    error: bool                # error = 100 - accuracy (Tables 13 and 14)
    profiles: list[str]        # the profile each configuration shows
    notes: list[str] = field(default_factory=list)  # problems with the table file's axis


SLOT_WIDTH = 0.7  # of the unit between two rows: the markers of one row never reach into the next


def axis_slots(table: tables.Table) -> tuple[str, list[AxisSlot], list[str]]:
    """(axis name, the trained rows in the axis's order, problems) from the table file's ``axis``:

        axis:
          name: depth (conv layers)       # what varies along the rows
          rows: {8L: "8", 9L: "9", ...}   # every row id, in the axis's order, with what the axis calls it

    Rows the axis does not name follow in the table's order (their id as tick), and a table without an axis
    keeps the table's order, so a table of one's own draws too; a malformed axis is a note, never an error."""
    ids = [r["id"] for r in table.rows]
    axis = table.axis if isinstance(table.axis, dict) else {}
    notes = [] if table.axis is None or axis else [f"axis must be a mapping with name and rows, got {table.axis!r}"]
    named = axis.get("rows") if isinstance(axis.get("rows"), dict) else {}
    if axis and not named:
        notes.append("axis has no rows mapping (row id: tick label); the table's order is used")
    unknown = [str(k) for k in named if str(k) not in ids]
    if unknown:
        notes.append(f"axis names row(s) {', '.join(unknown)} that the table does not have")
    order = [(str(k), str(v)) for k, v in named.items() if str(k) in ids]
    # Without an axis (a table of one's own) a row's label says what the network is (custom.label, or its
    # template and widths); the id alone (a, b) would not.
    labels = {r["id"]: str(r.get("label") or "") for r in table.rows} if table.axis is None else {}
    order += [(i, i if labels.get(i, i) in ("", i) else f"{i}: {labels[i]}") for i in ids if i not in dict(order)]
    name = str(axis.get("name") or "row (the table's order)")
    return name, [AxisSlot(rid, x, tick) for x, (rid, tick) in enumerate(order)], notes


def _series_name(tr: TableReport) -> str:
    return f"{tr.variant or 'as printed'} ({tr.profile} runs)"


def ablation_points(configurations: Sequence[TableReport]) -> Ablation:
    """The ablation figure of one table: ``configurations`` are its TableReports (the paper's rows as printed,
    then each variant), all of the same table. Per row, the paper's figure, then per configuration with ok runs
    the mean best-over-training and the mean final accuracy with their seed spread, side by side in the row's
    slot (a variant is never averaged with the paper's configuration)."""
    table = configurations[0].table
    error = configurations[0].error_display
    conv = (lambda a: 100.0 - a) if error else (lambda a: a)
    name, slots, notes = axis_slots(table)
    drawn = [tr for tr in configurations if tr.profile is not None]
    kinds = [("paper", "paper")] + [(_series_name(tr), m) for tr in drawn for m in ("best", "final")]
    span = min(SLOT_WIDTH, 0.2 * (len(kinds) - 1))  # a row's markers close together, never into the next row
    offset = {k: (i - (len(kinds) - 1) / 2) * span / max(len(kinds) - 1, 1) for i, k in enumerate(kinds)}
    markers = []
    for slot in slots:
        paper_row = _trained(configurations[0], slot.row_id)
        if paper_row is not None and paper_row.paper_acc is not None:
            markers.append(Marker(slot.row_id, slot.x + offset[("paper", "paper")], "paper", "paper",
                                  conv(paper_row.paper_acc), 0.0, 0, paper_row.paper_stat or ""))
        for tr in drawn:
            r = _trained(tr, slot.row_id)
            for metric in ("best", "final"):
                values = [conv(v) for v in r.values(metric)] if r is not None else []
                if not values:
                    continue
                mean, var = mean_var(values)
                markers.append(Marker(slot.row_id, slot.x + offset[(_series_name(tr), metric)], _series_name(tr),
                                      metric, mean, math.sqrt(var) if len(values) > 1 else 0.0, len(values)))
    return Ablation(table.name, name, slots, markers, [_series_name(tr) for tr in drawn], error,
                    [str(tr.profile) for tr in drawn], notes)


def _trained(tr: TableReport, row_id: str) -> RowReport | None:
    return next((r for r in tr.rows if r.kind == "trained" and r.row_id == row_id), None)
