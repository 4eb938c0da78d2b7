"""How long a command's runs would take here (``simpnet run --dry-run``): the runs as the runner would train them
(planning.plan_groups), each distinct network's step timed for a few steps on this device, scaled to the runs'
iterations, beside the authors' own hours and images/s for the row (runs/authors.py)."""
from __future__ import annotations

import dataclasses
import sys

import torch

from simpnet_cli.config import schemas, tables
from simpnet_cli.errors import UserError
from simpnet_cli.nets import specs as network
from simpnet_cli.runs import authors, index
from simpnet_cli.runs.planning import device_memory, devices_for, pick_device, plan_groups
from simpnet_cli.train import state as run_state
from simpnet_cli.train import together


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def dry_run_summary(runs: list[tables.RunSpec], opts, iters: int | None = None, batch_size: int | None = None,
                    say=lambda line: print(line, file=sys.stderr, flush=True)) -> str:
    """Runs, iterations and an estimated time on this device, from a short measured warm-up per network.

    ``iters`` timed steps per network (default 20 on a GPU, 2 on the CPU), at ``batch_size`` images (default:
    the run's own) and scaled to the run's batch: ``iters=1 batch_size=8`` is a rough estimate in under a
    minute anywhere. ``say`` gets a line per network as it is timed, so a long estimate shows its progress."""
    device = pick_device(devices_for(opts)[0])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    recorded = {name: index.recorded(opts.results_dir, name, opts.runs_dir) for name in {r.table for r in runs}}
    distinct, seen = [], set()
    for run in runs:
        if run.config_hash not in seen:
            seen.add(run.config_hash)
            distinct.append(run)
    default_iters, warmup = (20, 10) if device.type == "cuda" else (2, 1)
    if iters is not None:
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise UserError(f"dry_run.iters={iters!r}: give a whole number of timed steps >= 1")
        warmup = min(warmup, iters)
    iters = iters or default_iters
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"dry_run.batch_size={batch_size!r}: give a whole number of images >= 1")
    if batch_size is not None:  # the timed steps at this batch must fit and train, as a run's own batch must
        checked = set()
        for run in distinct:
            if repr(run.spec) in checked:
                continue
            checked.add(repr(run.spec))
            try:
                schemas.check_fits(run.spec, run.in_shape, {**run.train, "batch_size": batch_size}, run.dataset,
                                   device_memory(device), "this device")
                network.check_batchnorm_batch(run.spec, run.in_shape, batch_size)
            except UserError as err:
                raise UserError(f"dry_run.batch_size={batch_size} (table {run.table}, row {run.row_id}): "
                                f"{err}") from None
    # The runs as the runner would train them: one at a time, or k to a step (planning.plan_groups; a stacked
    # run's hash names its step, so what is recorded is looked up after planning).
    groups = plan_groups(distinct, opts, device)
    group_of = {id(run): (len(group), how) for group, how in groups for run in group}
    todo = [run for group, _ in groups for run in group
            if (run.row_id, run.config_hash, run.seed) not in recorded[run.table]]
    size = max((len(group) for group, _ in groups), default=1)
    speed: dict[tuple, float] = {}
    per_table: dict[str, list[float]] = {}
    per_row: dict[tuple, list] = {}  # (table, row id, label): [runs, iterations, seconds, img/s of one run]
    networks = len({(repr(r.spec), r.train["batch_size"], r.training.precision, r.in_shape,
                     group_of[id(r)]) for r in todo})
    for run in todo:
        k, how = group_of[id(run)]
        key = (repr(run.spec), run.train["batch_size"], run.training.precision, run.in_shape, (k, how))
        if key not in speed:
            say(f"dry-run: timing network {len(speed) + 1}/{networks} (table {run.table}, row {run.row_id}, "
                f"{network.count_params(run.spec, run.in_shape)[0]:,} params"
                + (f", {k} runs in one step, {how})" if k > 1 else ")"))
            timed = run if batch_size is None else dataclasses.replace(run, train={**run.train, "batch_size": batch_size})
            # the runner's own step (graphed on a GPU, in the run's precision); a stacked step trains k runs at
            # once, so each of them costs a k-th of its time: its images per second, counted over all k, are each
            # run's share
            images_per_s = together.time_steps(timed, device, how if k > 1 else "separate", k, iters, warmup)
            speed[key] = images_per_s / run.train["batch_size"]  # steps/s at the run's own batch
        per_table.setdefault(run.table, [0, 0, 0.0])
        entry = per_table[run.table]
        entry[0] += 1
        entry[1] += run.train["iterations"]
        entry[2] += run.train["iterations"] / speed[key]
        row = per_row.setdefault((run.table, run.row_id, run.label), [0, 0, 0.0, speed[key] * run.train["batch_size"]])
        row[0] += 1
        row[1] += run.train["iterations"]
        row[2] += run.train["iterations"] / speed[key]
    slots = len(devices_for(opts))
    shared_hows = ", ".join(sorted({how for group, how in groups if len(group) > 1}))
    stacking = f"up to {size} runs in one step ({shared_hows})" if size > 1 else "one run at a time"
    lines = [f"{len(runs)} run(s) asked for, {len(todo)} still to train ({len(runs) - len(todo)} recorded or "
             f"shared with another table); estimate on {run_state.device_name(device)} from {iters} timed steps "
             + (f"at batch {batch_size} (scaled to each run's batch: rough) " if batch_size is not None else "")
             + f"per network, {stacking} "
             + f"per device, {slots} device(s), evaluation excluded:",
             "| table | runs | iterations | estimated time | the authors' hours |", "|---|---|---|---|---|"]
    total = [0, 0, 0.0]
    theirs = authors_hours(todo)
    for name, (n, it, secs) in per_table.items():
        lines.append(f"| {name} | {n} | {it:,} | {_duration(secs / slots)} | {_hours_cell(*theirs[name])} |")
        total = [total[0] + n, total[1] + it, total[2] + secs]
    every = [sum(col) for col in zip(*theirs.values())] if theirs else [0.0, 0, 0]
    lines.append(f"| all | {total[0]} | {total[1]:,} | {_duration(total[2] / slots)} | {_hours_cell(*every)} |")
    lines += ["", "Per row, on one device, beside the authors' own run of the row (their Caffe log, authors_runs.csv: "
                  "images/s and hours of one run; vs authors = our estimated img/s per run over theirs):",
              "| table | row | runs | iterations | estimated time | img/s per run (estimated) | authors' img/s | "
              "authors' h | vs authors |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, row_id, label), (n, it, secs, rate) in per_row.items():
        lines.append(f"| {name} | {row_id} | {n} | {it:,} | {_duration(secs)} | {rate:,.0f} | "
                     f"{authors.beside(name, label, rate)} |")
    return "\n".join(lines)


def authors_hours(runs: list[tables.RunSpec]) -> dict[str, list]:
    """Per table, [the authors' hours for these runs' iterations (runs/authors.hours: their GPU, Caffe, their
    tests included, one after another), runs with a figure, runs]: what the estimate beside it would have taken
    them."""
    out: dict[str, list] = {}
    for run in runs:
        h = authors.hours(run.table, run.row_id, int(run.train["iterations"]))
        entry = out.setdefault(run.table, [0.0, 0, 0])
        entry[0] += h or 0.0
        entry[1] += h is not None
        entry[2] += 1
    return out


def _hours_cell(hours: float, known: int, runs: int) -> str:
    if not known:
        return "-"
    return _duration(hours * 3600) + ("" if known == runs else f" ({known} of {runs} runs)")
