"""The authors' own training runs (their Caffe logs, summarised in authors_runs.csv): the speed baseline that
``simpnet bench`` and ``simpnet run --dry-run`` put beside each row's measured or estimated time."""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGED = Path(__file__).resolve().parents[1] / "data" / "authors_runs.csv"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "authors_runs.csv"


@functools.cache
def authors_runs() -> tuple[dict, ...]:
    """Every row of authors_runs.csv (one per training log), from the package's copy if present, else from
    ../shared/reference beside the repository; empty when neither is there."""
    for path in (PACKAGED, SHARED):
        if path.is_file():
            with open(path, newline="") as fh:
                return tuple(csv.DictReader(fh))
    return ()


@dataclass(frozen=True)
class AuthorsSpeed:
    """One row's speed in the authors' run: images/s (median iterations/s x batch; None where the log gives no
    iteration times) and wall-clock hours (evaluations included)."""
    img_per_s: float | None
    hours: float
    iterations: int


def authors_speed(table: str, label: str) -> AuthorsSpeed | None:
    """The authors' speed for a table row (by its paper label): of its logs, the one with the row's best accuracy
    (the run the paper reports; the first such). None when the row has no log with a time."""
    logs = [r for r in authors_runs() if r["table"] == str(table) and r["row"] == label and r.get("wall_h")]
    if not logs:
        return None
    best = max(logs, key=lambda r: float(r["best_acc"] or "-inf"))
    rate = float(best["median_iter_per_s"]) * float(best["batch"]) if best.get("median_iter_per_s") else None
    return AuthorsSpeed(rate, float(best["wall_h"]),
                        int(best["last_iter"]) - int(best["first_iter"]))


def beside(table: str, label: str, ours_img_per_s: float | None = None, ours_hours: float | None = None) -> str:
    """``authors' img/s | authors' h | ours / authors'`` cells for a markdown row: the ratio is ours over theirs in
    images/s (above 1: faster than the authors' GTX 1080), or in hours the other way round when only a time is
    known; '-' where there is nothing to compare."""
    ref = authors_speed(table, label)
    if ref is None:
        return "- | - | -"
    if ours_img_per_s and ref.img_per_s:
        ratio = f"{ours_img_per_s / ref.img_per_s:.2f}x"
    elif ours_hours:
        ratio = f"{ref.hours / ours_hours:.2f}x"
    else:
        ratio = "-"
    rate = f"{ref.img_per_s:,.0f}" if ref.img_per_s else "-"
    return f"{rate} | {ref.hours:.3g} | {ratio}"
