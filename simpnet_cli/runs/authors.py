"""The authors' own runs: their 114 Caffe logs of the paper's 52 rows, as data (simpnet_cli/data/, copies of
the project's reference files; simpnet_cli/data/README.md says where they come from).

``authors_runs()`` (one line per log: first/last tested iteration, best and final accuracy, iter/s, hours) and
``authors_curves()`` (one line per test of a log) are pandas frames with a ``row_id`` column added: the row of
``conf/tables/table<N>.yaml`` whose label is the logs' row (they join on (table, row label), as the reference's
``experiments.yaml``). A log whose name ends in ``_r`` starts at a resume, at iteration 90,000.

What they are used for: the yardstick of a run in training (``yardstick_for``: the band of the authors' runs
of its row, ``train.callbacks.Yardstick`` compares), the report's figures and lines (report/), ``simpnet
show`` (``show_lines``) and the authors' hours beside a dry run's estimate (``hours``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from simpnet_cli.config import tables
from simpnet_cli.errors import UserError
from simpnet_cli.train.callbacks import AuthorsBand

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
RUNS_CSV = DATA_DIR / "authors_runs.csv"
CURVES_CSV = DATA_DIR / "authors_curves.csv"
# The noise of one of the authors' evaluations at an iteration is read off their tests within this many test
# intervals on either side (second differences: a straight trend cancels, the scatter stays).
NOISE_WINDOW = 5


@lru_cache(maxsize=1)
def _row_ids() -> dict[tuple[str, str], str]:
    """(table, row label) -> row id, for the tables the logs name (the built-in ones, or a conf_dir's copy)."""
    ids = {}
    for name in sorted(set(pd.read_csv(RUNS_CSV, usecols=["table"], dtype=str)["table"])):
        try:
            table = tables.load_table(name)
        except UserError:
            continue
        ids.update({(table.name, str(row["label"])): row["id"] for row in table.rows})
    return ids


def _read(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"table": str, "row": str, "log": str})
    except OSError as err:
        raise UserError(f"cannot read the authors' runs {path}: {err.strerror or err} (reinstall simpnet)") from None
    ids = _row_ids()
    df.insert(2, "row_id", [ids.get((t, r)) for t, r in zip(df["table"], df["row"])])
    return df


@lru_cache(maxsize=1)
def _runs() -> pd.DataFrame:
    return _read(RUNS_CSV)


@lru_cache(maxsize=1)
def _curves() -> pd.DataFrame:
    return _read(CURVES_CSV).sort_values(["table", "row", "log", "iteration"], kind="stable").reset_index(drop=True)


def authors_runs() -> pd.DataFrame:
    """One line per log (a copy: change it freely)."""
    return _runs().copy()


def authors_curves() -> pd.DataFrame:
    """One line per test of a log, in iteration order per log (a copy)."""
    return _curves().copy()


def unmatched() -> list[tuple[str, str]]:
    """(table, row label) of the logs whose row no table file has: none when the configs and the data agree."""
    runs = _runs()
    return sorted({(t, r) for t, r, i in zip(runs["table"], runs["row"], runs["row_id"]) if i is None})


def runs_of(table: str, row_id: str) -> pd.DataFrame:
    runs = _runs()
    return runs[(runs["table"] == str(table)) & (runs["row_id"] == str(row_id))].reset_index(drop=True)


def curves_of(table: str, row_id: str) -> pd.DataFrame:
    curves = _curves()
    return curves[(curves["table"] == str(table)) & (curves["row_id"] == str(row_id))].reset_index(drop=True)


# --------------------------------------------------------------------------- the yardstick of a run

def _noise_at(iters: np.ndarray, acc: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The scatter of one evaluation of one log at each ``grid`` iteration: the RMS second difference of its
    tests within NOISE_WINDOW test intervals, over sqrt(6) (a - 2b + c of three independent evaluations of equal
    noise s has variance 6 s^2); NaN where the log has too few tests nearby."""
    out = np.full(len(grid), np.nan)
    if len(iters) < 3:
        return out
    d2 = acc[:-2] - 2 * acc[1:-1] + acc[2:]
    at = iters[1:-1]
    window = NOISE_WINDOW * float(np.median(np.diff(iters)))
    for k, g in enumerate(grid):
        near = d2[np.abs(at - g) <= window]
        if len(near):
            out[k] = math.sqrt(float(np.mean(near ** 2)) / 6.0)
    return out


@lru_cache(maxsize=None)
def band(table: str, row_id: str) -> AuthorsBand | None:
    """The band of the authors' runs of one row: at every iteration any of them tested, the lowest and highest of
    the runs that cover it (each interpolated between its own tests; a resumed ``_r`` log covers its iterations
    only) and the largest noise among them. None for a row without logs."""
    curves = curves_of(table, row_id)
    if curves.empty:
        return None
    grid = np.unique(curves["iteration"].to_numpy(dtype=float))
    accs, noises = [], []
    for _, log in curves.groupby("log", sort=True):
        it, acc = log["iteration"].to_numpy(dtype=float), log["test_acc"].to_numpy(dtype=float)
        inside = (grid >= it[0]) & (grid <= it[-1])
        accs.append(np.where(inside, np.interp(grid, it, acc), np.nan))
        noises.append(np.where(inside, _noise_at(it, acc, grid), np.nan))
    accs, noises = np.vstack(accs), np.vstack(noises)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (all-NaN columns: no noise estimate there)
            noise = np.nan_to_num(np.nanmax(noises, axis=0), nan=0.0)
    return AuthorsBand(str(row_id), tuple(grid.tolist()), tuple(np.nanmin(accs, axis=0).tolist()),
                       tuple(np.nanmax(accs, axis=0).tolist()), tuple(noise.tolist()), int(curves["log"].nunique()))


def why_no_yardstick(run) -> str | None:
    """Why a run (a tables.RunSpec) has no yardstick, or None when it has one. Only the paper's row as printed,
    trained as the authors did (their dataset, whole, at their batch for their length), is compared: a variant
    changes the recipe, a smoke or subset run is not their training."""
    if run.variant:
        return f"a variant ({run.variant})"
    data = run.dataset
    if data.get("source") == "synthetic" or data.get("train_size") or data.get("test_size"):
        return "a smoke run or a data subset"
    try:
        row = tables.load_table(run.table).row(run.row_id)
    except UserError:
        return "a row in no table of the paper"
    logs = runs_of(run.table, run.row_id)
    if logs.empty:
        return "no log of the authors' for this row"
    if int(run.train.get("batch_size", 0)) not in set(logs["batch"].astype(int)):
        return f"batch {run.train.get('batch_size')}, not the authors' {int(logs['batch'].iloc[0])}"
    if int(run.train.get("iterations", 0)) != int(row.get("iterations", 0)):
        return f"{run.train.get('iterations')} iterations, not the row's {row.get('iterations')}"
    return None


def yardstick_for(run) -> AuthorsBand | None:
    """The band a run in training is compared with (train.callbacks.Yardstick), or None (why_no_yardstick)."""
    return None if why_no_yardstick(run) else band(run.table, run.row_id)


# --------------------------------------------------------------------------- summaries

def hours(table: str, row_id: str, iterations: int) -> float | None:
    """The authors' hours for ``iterations`` of a row on their GPU: the median over its logs of hours per tested
    iteration (a log's wall time includes its tests), times ``iterations``; None for a row without logs."""
    logs = runs_of(table, row_id)
    logs = logs[logs["last_iter"] > logs["first_iter"]]
    if logs.empty:
        return None
    per_iter = (logs["wall_h"] / (logs["last_iter"] - logs["first_iter"])).median()
    return float(per_iter) * int(iterations)


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def show_lines(table: str, row_id: str) -> list[str]:
    """`simpnet show`'s lines for a row: the authors' runs' best, final and hours, then one line per log."""
    logs = runs_of(table, row_id)
    if logs.empty:
        return ["authors' runs: none published for this row"]
    lines = [f"authors' runs ({len(logs)} log{'s' * (len(logs) > 1)}; Caffe on their GPU): best "
             f"{_span(logs['best_acc'])}%, final {_span(logs['final_acc'])}%, {_span(logs['wall_h'].round(2))} h"]
    for log in logs.itertuples(index=False):
        lines.append(f"  {log.log}: iterations {log.first_iter:,}-{log.last_iter:,}, best {log.best_acc:g}% at "
                     f"{log.best_iter:,}, final {log.final_acc:g}%, {log.wall_h:g} h")
    return lines


# --------------------------------------------------------------------------- their speed

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
    logs = authors_runs()
    logs = logs[(logs["table"].astype(str) == str(table)) & (logs["row"] == label) & logs["wall_h"].notna()]
    if logs.empty:
        return None
    best = logs.loc[logs["best_acc"].fillna(-math.inf).idxmax()]
    rate = (float(best["median_iter_per_s"]) * float(best["batch"])
            if pd.notna(best.get("median_iter_per_s")) else None)
    return AuthorsSpeed(rate, float(best["wall_h"]), int(best["last_iter"]) - int(best["first_iter"]))


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
