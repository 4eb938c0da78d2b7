"""Execute what runs/planning.py planned: skip finished runs, resume interrupted ones, record each.

A run's identity is the hash of its resolved config and seed (tables.RunSpec.config_hash) and its folder,
``runs_dir/<hash>``, is its record: ``results/table<N>.csv`` is an index rebuilt from the folders after each
run and at the end of each command (runs/index.py). Rows that are the same network trained the same way in two
tables (Table 2's 8-layer net is Table 7's 3x3 300K and Table 9's first row) share one run folder, with a
record for each table row, and get one line in each table's CSV.

Runs that can share a training step (the same network, data, solver and length, whatever their seeds, rates
and schedules: a row's seeds and its lr variants) are trained together, ``stack`` at a time or as ``stack=auto``
measures (train/together.py); each still gets its own folder, record and CSV line. A run of a shared step is a
computation of its own (its hash names the step's way and size: tables.RunSpec.step), so it always trains and
resumes in a step of that size: with its group, or with passengers in the places of group mates that are
recorded or busy. Packed workers (``jobs_per_device``) are runs/pool.py's.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from simpnet_cli.runs import authors, index
from simpnet_cli.runs import pool
from simpnet_cli.runs import progress
from simpnet_cli.runs import schedule
from simpnet_cli.runs.planning import (Options, decide_in_worker, devices_for, pick_device, plan_groups,
                                       preflight)
from simpnet_cli.config import tables
from simpnet_cli.train import callbacks
from simpnet_cli.train import checkpoint
from simpnet_cli.train import data as D
from simpnet_cli.train import loop as train
from simpnet_cli.train import state as run_state
from simpnet_cli.errors import UserError


class RunLock:
    """An exclusive, non-blocking lock on a run folder, so two processes never train the same run."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fh = open(self.path, "a")
        except OSError as err:  # a folder or a device where the lock file should be
            raise UserError(f"cannot lock the run folder: {self.path} {err.strerror or err}; remove it (it holds "
                            f"nothing of the run) and run the command again") from None
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            return False
        return True

    def __exit__(self, *exc):
        if not self.fh.closed:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


def remove_stale_temporaries(run_dir: Path) -> None:
    """Half-written ``.<name>.tmp<pid>`` files of a process that was killed mid-write (the files they were
    to replace are intact: writes go through a temporary and a rename). Called under the run lock."""
    for tmp in run_dir.glob(".*.tmp*"):
        try:
            tmp.unlink()
        except OSError:
            pass


def yardsticks() -> list[callbacks.Callback]:
    """The callbacks the runner adds to every training run: the authors' runs of its row as its yardstick (a
    variant or a smoke run gets none: authors.why_no_yardstick)."""
    return [callbacks.Yardstick(authors.yardstick_for)]


def finished_message(name: str, result: dict) -> str:
    metric = f"final {result['final_acc']:.2f}%, best {result['best_acc']:.2f}% @ {result['best_iter']}"
    return f"{name}: {result['status']} ({metric}, {result['img_per_s']:.0f} img/s)"


def prepare_device(dev: torch.device, opts: Options) -> None:
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # streams, graphs and synchronize default to the current device
    if dev.type == "cpu" and opts.jobs_per_device > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.jobs_per_device))


def execute_group(group: list[tables.RunSpec], opts: Options, device: str,
                  shown: progress.Reporter | progress.Forwarder | None = None,
                  auto: bool = False) -> list[tuple[tables.RunSpec, str, str]]:
    """Train (or resume, or just record) the runs of ``group``: one run, or the runs of one shared step (one
    plan_groups group); returns (run as trained, outcome, message) for each, in the group's order, for the
    caller to show. Runs already recorded are skipped, those another process holds are busy, and the rest train
    in the step their hash names (``RunSpec.step``), with as many runs in it as that says: places left by skipped
    or busy runs are taken by passengers (copies of a run, trained and thrown away), so the arithmetic of every
    run is its hash's. ``auto``: a stack=auto group, its way decided here first, on this worker's device."""
    if auto and len(group) > 1:  # decided for the runs still to train (those recorded alone are only recorded)
        todo = [run for run in group if not index.is_recorded(opts.results_dir, opts.runs_dir, run)]
        parts = (decide_in_worker(todo, opts, pick_device(device)) if len(todo) > 1 else [([r], "") for r in todo])
        parts += [([run], "") for run in group if all(run is not t for t in todo)]
        place = {run.config_hash: n for n, run in enumerate(group)}
        outcomes = [outcome for part, _ in parts for outcome in execute_group(part, opts, device, shown)]
        return sorted(outcomes, key=lambda o: place[o[0].alone_hash])
    how, k = group[0].shared_step
    if k == 1 and len(group) > 1:  # runs that each train alone
        return [outcome for run in group for outcome in execute_group([run], opts, device, shown)]
    if shown is None:
        shown = progress.Reporter({}, 0, quiet=opts.quiet, tty=False)
    outcomes, todo = [], []
    for run in group:
        if index.is_recorded(opts.results_dir, opts.runs_dir, run):
            outcomes.append((run, "skipped", f"{progress.run_name(run)}: already recorded"))
            continue
        run_dir = opts.runs_dir / run.config_hash
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create run folder {run_dir}: {err.strerror or err}") from None
        # The run's membership in this table goes in before it trains, so whichever process finishes the run
        # (this one, or another that holds it now) indexes it in this table too.
        index.write_record(run_dir, opts.results_dir, index.record_of(run, run_dir, opts.profile))
        todo.append(run)
    finished = []
    with contextlib.ExitStack() as locks:
        held = []
        for run in todo:
            run_dir = opts.runs_dir / run.config_hash
            if locks.enter_context(RunLock(run_dir)):
                remove_stale_temporaries(run_dir)
                # finished already (a twin in another table, or by another command since): only recorded here
                (finished if run_state.read_result(run_dir) else held).append(run)
            else:
                outcomes.append((run, "busy", f"{progress.run_name(run)}: being trained by another process "
                                              f"({run_dir})"))
        if held:
            dev = pick_device(device)
            prepare_device(dev, opts)
            dirs = [opts.runs_dir / r.config_hash for r in held]
            keys = [progress.run_key(r) for r in held]
            if k > 1:
                align_checkpoints(dirs, lambda msg: shown.note(keys[0], msg))
            for run, key, run_dir in zip(held, keys, dirs):
                shown.run_started(key, progress.run_name(run), str(run_dir))
            with passengers(held[0], dirs[0], k - len(held), opts.runs_dir) as riders:
                train.train(held + [held[0]] * len(riders), dirs + riders, dev, opts.data_dir, opts.download, how,
                            lambda msg: shown.note(keys[0], msg),
                            progress=[lambda ev, key=key: shown.event(key, ev) for key in keys] + [None] * len(riders),
                            loggers=opts.logger, callbacks=yardsticks(), passengers=len(riders))
            finished += held
        for run in finished:
            # Checked against the folder's name and config.yaml (a finished result found here may be another
            # run's), and tied to its run in result.json.
            result = index.seal(opts.runs_dir / run.config_hash)
            outcomes.append((run, result["status"], finished_message(progress.run_name(run), result)))
    # After the locks: a process that found a run busy has written its record before trying the lock.
    for run in finished:
        index.rebuild_tables(opts.results_dir, opts.runs_dir,
                             index.tables_recorded(opts.runs_dir, opts.results_dir, opts.runs_dir / run.config_hash),
                             warn, lasting=False)
    order = {id(r): n for n, r in enumerate(group)}
    return sorted(outcomes, key=lambda o: order[id(o[0])])


def align_checkpoints(run_dirs: list[Path], log) -> None:
    """The runs of one shared step resume from one iteration. A process killed between two of the group's
    checkpoint writes leaves some runs one checkpoint ahead: those go back to the previous checkpoint that
    loop.fit keeps beside it. Should that not reach (a checkpoint missing or damaged), the group
    starts over: a run resumed alone would be another computation than its hash."""
    paths = [d / run_state.CHECKPOINT for d in run_dirs]
    starts = [checkpoint.iteration(p) or 0 for p in paths]
    if len(set(starts)) < 2:
        return
    low = min(starts)
    for path, start in zip(paths, starts):
        previous = path.with_name(run_state.PREVIOUS_CHECKPOINT)
        if start > low and (checkpoint.iteration(previous) or 0) == low and low > 0:
            os.replace(previous, path)
    if len({checkpoint.iteration(p) or 0 for p in paths}) > 1:
        for path in paths:
            path.unlink(missing_ok=True)
            path.with_name(run_state.PREVIOUS_CHECKPOINT).unlink(missing_ok=True)
        log(f"the checkpoints of the runs trained together stood at iterations {sorted(set(starts))} and could "
            f"not be brought to one: they start over")
    else:
        log(f"the runs trained together resume from iteration {low} (a process was killed between two of their "
            f"checkpoint writes)")


@contextlib.contextmanager
def passengers(run: tables.RunSpec, run_dir: Path, n: int, runs_dir: Path):
    """``n`` throw-away folders for copies of ``run`` that fill the places of a shared step whose own runs are
    recorded or busy (with ``run``'s checkpoint, so they stand at its iteration); removed afterwards."""
    if n <= 0:
        yield []
        return
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix=".passengers-", dir=runs_dir))
    try:
        dirs = []
        for i in range(n):
            rider = root / str(i)
            rider.mkdir()
            for name in (run_state.CHECKPOINT,):
                if (run_dir / name).exists():
                    shutil.copyfile(run_dir / name, rider / name)
            dirs.append(rider)
        yield dirs
    finally:
        shutil.rmtree(root, ignore_errors=True)


def warn(msg: str) -> None:
    print(f"simpnet: warning: {msg}", file=sys.stderr, flush=True)


def execute(runs: list[tables.RunSpec], opts: Options) -> dict[str, int]:
    """Run everything in ``runs``: one after another, or ``jobs_per_device`` at once on every visible device."""
    preflight(runs, opts)
    counts: dict[str, int] = {}
    steps: dict[str, str] = {}  # a trained run's hash alone -> its step as trained (stack=auto decides in workers)

    def tally(run: tables.RunSpec, outcome: str, msg: str, step: str | None = None) -> None:
        counts[outcome] = counts.get(outcome, 0) + 1
        steps[run.alone_hash] = run.step if step is None else step
        shown.run_finished(progress.run_key(run), outcome, msg)

    def as_trained(twin: tables.RunSpec) -> tables.RunSpec:
        """A twin (the same run in another table) is recorded from its first run's folder: the same step, so the
        same hash."""
        return twin.in_step(steps.get(twin.alone_hash, ""))

    # Train each distinct run once; its twins in other tables are recorded from its result afterwards.
    first, twins, seen = [], [], set()
    for run in runs:
        (twins if run.config_hash in seen else first).append(run)
        seen.add(run.config_hash)
    slots = devices_for(opts)
    groups = plan_groups(first, opts, torch.device(slots[0]), defer=True)
    runs = [run for group, _ in groups for run in group] + twins  # (explicitly stacked runs: as they train)
    if opts.shards is not None or opts.shard is not None:  # a cluster job: its slice of the longest-first jobs
        groups = schedule.shard_of(schedule.longest_first(groups), opts.shard, opts.shards)
        mine = {run.alone_hash for group, _ in groups for run in group}
        twins = [twin for twin in twins if twin.alone_hash in mine]
        runs = [run for run in runs if run.alone_hash in mine]
    if opts.jobs_per_device == "auto":
        opts = replace(opts, jobs_per_device=schedule.auto_jobs(first, slots[0], warn_plain))
    workers = min(len(slots) * max(1, opts.jobs_per_device), len(groups))
    if workers > 1:  # the longest jobs start first, on every device
        groups = schedule.longest_first(groups)
        note = schedule.mps_note(opts.jobs_per_device, slots[0])
        if note:
            warn(note)
    with progress_for(runs, opts, run_bars=workers <= 1) as shown:
        if workers <= 1:  # in this process; the first bad input stops everything, with its own message
            for group, how in groups:
                for outcome in execute_group(group, opts, slots[0], shown, auto=how == "auto"):
                    tally(*outcome)
            for twin in twins:
                tally(*execute_group([as_trained(twin)], opts, slots[0], shown)[0])
        else:
            pool.execute_packed(execute_group, groups, twins, fetch_datasets(first, opts), slots, workers, shown,
                                tally, as_trained)
    # Every table of the command, whatever its runs did: a damaged or stale file is rebuilt, runs killed
    # before their rebuild are indexed, and what was refused or dropped is said once.
    index.rebuild_tables(opts.results_dir, opts.runs_dir, {r.table for r in runs}, warn)
    if counts.get("error"):
        raise UserError(f"{counts['error']} run(s) failed; see the messages above")
    return counts


def warn_plain(msg: str) -> None:
    print(f"simpnet: {msg}", file=sys.stderr, flush=True)


def fetch_datasets(runs: list[tables.RunSpec], opts: Options) -> Options:
    """With download=true, each dataset the runs read is fetched here, once, before any worker starts: workers
    downloading into one folder at once would race on its files. The workers then only read (download=false)."""
    if not opts.download:
        return opts
    seen = set()
    for run in runs:
        cfg = run.dataset
        key = (cfg.get("torchvision"), cfg.get("name"), cfg.get("extra", True))
        if cfg.get("source") == "synthetic" or key in seen:
            continue
        seen.add(key)
        for train_split in (True, False):
            D.load_split(cfg, opts.data_dir, train_split, True)
    return replace(opts, download=False)


def progress_for(runs: list[tables.RunSpec], opts: Options, run_bars: bool) -> progress.Reporter:
    """The command's progress display: runs already recorded count as done; the iterations to train are
    those of every other distinct run (a resumed run's earlier ones are taken off when it starts)."""
    recorded = {t: index.recorded(opts.results_dir, t, opts.runs_dir) for t in {r.table for r in runs}}
    expected, seen, done = {}, set(), 0
    for run in runs:
        if (run.row_id, run.config_hash, run.seed) in recorded[run.table]:
            done += 1
            continue
        expected[progress.run_key(run)] = 0 if run.config_hash in seen else int(run.train["iterations"])
        seen.add(run.config_hash)
    return progress.Reporter(expected, len(runs), done, quiet=opts.quiet, run_bars=run_bars)
