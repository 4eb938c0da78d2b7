"""The table's claims, tested on the reproduced accuracies: Welch's t-test and the verdict rules.

Claims. ``holds_if`` entries are comparisons of row ids on accuracy ("A > B": A is more accurate).
With at least two ok runs on both sides the test is Welch's t-test, one-sided at alpha = 0.05:

* ``A > B``  holds if A > B significantly; fails if B > A significantly; else inconclusive.
* ``A >= B`` fails if B > A significantly; holds if mean(A) >= mean(B) (not significantly worse);
  else (A lower, within noise) inconclusive.
* ``A < B`` and ``A <= B`` are ``B > A`` and ``B >= A``.

With fewer than two runs on a side there is no noise estimate: the means are compared (``>``: holds iff
mean(A) > mean(B), else fails; ``>=``: holds iff mean(A) >= mean(B), else fails) and the verdict says so.
With two or more runs on each side but no spread on either (identical seeds, e.g. smoke runs on a few test
images) there is no noise estimate either, and the comparison is inconclusive. Smoke runs are never judged:
their comparisons are inconclusive whatever the numbers. A row without an ok run makes the comparison "not run". A claim holds if all its comparisons hold, fails if
any fails, is "not run" if none fails and one is not run, and is inconclusive otherwise.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

ALPHA = 0.05
NO_NOISE_EACH = "one run each, no noise estimate"
NO_NOISE_SIDE = "one run on one side, no noise estimate"
NO_NOISE_ZERO = "no spread on either side, no noise estimate"
NOT_JUDGED = "smoke runs, not judged"
VERDICTS = ("holds", "fails", "inconclusive", "not run")

# --------------------------------------------------------------------------- statistics

def mean_var(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample variance (n - 1; NaN for one value)."""
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
    (ma, va), (mb, vb) = mean_var(a), mean_var(b)
    if va == 0.0 and vb == 0.0:
        return 0.0 if ma > mb else 1.0 if ma < mb else 0.5
    with warnings.catch_warnings():  # one side with identical seeds: scipy warns of precision loss, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
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


def compare(a: Sequence[float], b: Sequence[float], op: str = ">", alpha: float = ALPHA,
            judge: bool = True) -> Verdict:
    """Test ``A op B`` on two samples of accuracies (see the module docstring for the rule); ``judge=False``
    (smoke runs) reports the means but never a holds/fails verdict."""
    if op in ("<", "<="):
        v = compare(b, a, op.replace("<", ">"), alpha, judge)
        return Verdict(v.verdict, v.mean_b, v.mean_a, v.n_b, v.n_a, v.p, v.note)
    if op not in (">", ">="):
        raise ValueError(f"unknown comparison {op!r}")
    a, b = [float(x) for x in a], [float(x) for x in b]
    if not a or not b:
        return Verdict("not run", n_a=len(a), n_b=len(b))
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if not judge:
        return Verdict("inconclusive", ma, mb, len(a), len(b), None, NOT_JUDGED)
    if len(a) < 2 or len(b) < 2:
        ok = ma > mb if op == ">" else ma >= mb
        note = NO_NOISE_EACH if len(a) == len(b) == 1 else NO_NOISE_SIDE
        return Verdict("holds" if ok else "fails", ma, mb, len(a), len(b), None, note)
    if mean_var(a)[1] == 0.0 and mean_var(b)[1] == 0.0:  # Welch's t is undefined: no p-value to print as 0
        return Verdict("inconclusive", ma, mb, len(a), len(b), None, NO_NOISE_ZERO)
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
        shown = overall in ("holds", "fails") or set(notes) <= {NO_NOISE_ZERO, NOT_JUDGED} and notes
        head = f"**{overall}**" + (f" ({'; '.join(notes)})" if notes and shown else "")
        missing = [r for v in parts if v.verdict == "not run" for r in v.missing]
        shown_in_head = set(notes) if shown else set()
        details = [f"{c}: {v.text(skip_note=v.note in shown_in_head)}"
                   for c, v in zip(self.comparisons, parts) if v.verdict != "not run"]
        if missing:
            details.append(", ".join(dict.fromkeys(missing)) + " not run")
        return f"{head}: " + "; ".join(details)


def evaluate_claim(claim: dict, samples: dict[str, dict[str, list[float]]], alpha: float = ALPHA,
                   judge: bool = True) -> ClaimResult:
    """``samples[metric][row_id]`` = the ok runs' accuracies; metric is "best" or "final"; ``judge=False`` for
    smoke runs, whose comparisons are never holds/fails."""
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
            v = compare(by_row.get(a, []), by_row.get(b, []), op, alpha, judge)
            if v.verdict == "not run":
                v = Verdict("not run", n_a=v.n_a, n_b=v.n_b, missing=tuple(r for r in (a, b) if not by_row.get(r)))
            parts.append(v)
        per_metric[metric] = (combine([v.verdict for v in parts]), parts)
    return ClaimResult(text, exprs, per_metric)
