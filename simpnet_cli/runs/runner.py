"""Plan the runs a command asks for and execute them: skip finished ones, resume interrupted ones, record each.

A run's identity is the hash of its resolved config and seed (tables.RunSpec.config_hash) and its folder,
``runs_dir/<hash>``, is its record: ``results/table<N>.csv`` is an index rebuilt from the folders after each
run and at the end of each command (runs/index.py). Rows that are the same network trained the same way in two
tables (Table 2's 8-layer net is Table 7's 3x3 300K and Table 9's first row) share one run folder, with a
record for each table row, and get one line in each table's CSV.
"""
from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing.managers import SyncManager
from dataclasses import dataclass
from pathlib import Path

import torch

from simpnet_cli.runs import index, results
from simpnet_cli.runs import progress
from simpnet_cli.config import schemas, tables
from simpnet_cli.train import loop as train
from simpnet_cli.errors import UserError
from simpnet_cli.config.variants import RowOverrides


@dataclass(frozen=True)
class Options:
    """Where and how runs execute; none of it changes what a run computes."""
    data_dir: Path
    download: bool
    results_dir: Path
    runs_dir: Path
    device: str
    jobs_per_device: int
    profile: str
    quiet: bool = False
    logger: str | tuple[str, ...] = "csv"  # train.callbacks.logger_names: csv, tensorboard, mlflow or several


def plan(chosen: list[tables.Table], row_sel, seeds, profile: dict, run_opts: dict | None = None,
         data_opts: dict | None = None, overrides: RowOverrides | None = None,
         base_profile: dict | None = None) -> list[tables.RunSpec]:
    """Every (table, row, seed) the selectors name, resolved and validated, before anything trains: a bad key in
    the last row of ``table=all`` stops the command before the first run starts."""
    if row_sel is not None and len(chosen) > 1:
        raise UserError("row= needs a single table (table=N)")
    seeds = schemas.seeds_of(seeds)
    runs = []
    for table in chosen:
        for row in table.select(row_sel):
            # Resolved (configs read, schema and network checked) once per row: the seed changes nothing of
            # that, and re-reading every config per seed made seeds=30000 take minutes before the first run.
            first = tables.resolve(table, row, seeds[0], profile, run_opts, data_opts, overrides, base_profile)
            runs.append(first)
            runs += [first.with_seed(seed) for seed in seeds[1:]]
    return runs


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: no CUDA device is visible here; use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r}: use auto, cpu, cuda or cuda:N")
    return dev


class RunLock:
    """An exclusive, non-blocking lock on a run folder, so two processes never train the same run."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a")
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


def check_writable(path: Path, what: str) -> None:
    """Fail before anything trains if ``path`` cannot hold files: no compute is spent on a run whose
    result could not be recorded."""
    path = Path(path)
    probe = path / f".simpnet-write-test.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{what} {path} is not writable: {err.strerror or err}") from None


def device_memory(dev: torch.device) -> int:
    """The memory a run on ``dev`` can at most use (bytes): the GPU's, or the machine's for the CPU."""
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def preflight(runs: list[tables.RunSpec], opts: Options, full: bool = True) -> None:
    """Everything about a command's runs that can fail, checked once before the first iteration of any: each
    device exists, each network fits in its memory, and (``full``) each results file can be written, each
    output folder is writable and each dataset is there. A command (or any job of a sweep) that would fail
    part-way fails here instead, with nothing trained."""
    from simpnet_cli.train import data as D

    devices = [pick_device(d) for d in devices_for(opts)]
    available = min(device_memory(d) for d in devices)
    where = "the GPU" if devices[0].type == "cuda" else "this machine"
    seen = set()
    for run in runs:
        key = (repr(run.spec), run.train.get("batch_size"), json_key(run.dataset))
        if key in seen:
            continue
        seen.add(key)
        try:
            schemas.check_fits(run.spec, run.in_shape, run.train, run.dataset, available, where)
        except UserError as err:
            raise UserError(f"table {run.table}, row {run.row_id}" + (f" with {run.variant}" if run.variant else "")
                            + f": {err}") from None
    if not full:
        return
    for name in sorted({r.table for r in runs}):
        path = results.csv_path(opts.results_dir, name)
        if path.exists() and not path.is_file():
            raise UserError(f"{path} is not a file (a folder?): move it away so table {name} can be recorded")
    check_writable(opts.results_dir, "results_dir")
    check_writable(opts.runs_dir, "runs_dir")
    checked = set()
    for run in runs:
        if json_key(run.dataset) not in checked:
            checked.add(json_key(run.dataset))
            D.check_available(run.dataset, opts.data_dir, opts.download)


def json_key(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Half-written ``.<name>.tmp<pid>`` files of a process that was killed mid-write (the files they were
    to replace are intact: writes go through a temporary and a rename). Called under the run lock."""
    for tmp in run_dir.glob(".*.tmp*"):
        try:
            tmp.unlink()
        except OSError:
            pass


def execute_one(run: tables.RunSpec, opts: Options, device: str,
                shown: progress.Reporter | progress.Forwarder | None = None) -> tuple[str, str]:
    """Train (or resume, or just record) one run, showing its progress on ``shown`` (plain lines on stderr
    if none); returns (outcome, message) for the caller to show."""
    if shown is None:
        shown = progress.Reporter({}, 0, quiet=opts.quiet, tty=False)
    run_dir = opts.runs_dir / run.config_hash
    name, key = progress.run_name(run), progress.run_key(run)
    if index.is_recorded(opts.results_dir, opts.runs_dir, run):
        return "skipped", f"{name}: already recorded"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run folder {run_dir}: {err.strerror or err}") from None
    # The run's membership in this table goes in before it trains, so whichever process finishes the run
    # (this one, or another that holds it now) indexes it in this table too.
    index.write_record(run_dir, opts.results_dir, index.record_of(run, run_dir, opts.profile))
    with RunLock(run_dir) as locked:
        if not locked:
            return "busy", f"{name}: being trained by another process ({run_dir})"
        remove_stale_temporaries(run_dir)
        dev = pick_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # streams, graphs and synchronize default to the current device
        if dev.type == "cpu" and opts.jobs_per_device > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.jobs_per_device))
        shown.run_started(key, name, str(run_dir))
        train.train_run(run, run_dir, dev, opts.data_dir, opts.download,
                        lambda msg: shown.note(key, msg), progress=lambda ev: shown.event(key, ev),
                        loggers=opts.logger)
        # Checked against the folder's name and config.yaml (a finished result found here may be another
        # run's), and tied to its run in result.json.
        result = index.seal(run_dir)
    # After the lock: a process that found this run busy has written its record before trying the lock.
    index.rebuild_tables(opts.results_dir, opts.runs_dir,
                         index.tables_recorded(opts.runs_dir, opts.results_dir, run_dir), warn, lasting=False)
    metric = f"final {result['final_acc']:.2f}%, best {result['best_acc']:.2f}% @ {result['best_iter']}"
    return result["status"], f"{name}: {result['status']} ({metric}, {result['img_per_s']:.0f} img/s)"


def _worker(run, opts, device_slots, shown=None):
    """One packed run in a pool process: it borrows a device slot for as long as it trains, so a device
    never holds more than ``jobs_per_device`` runs whatever order the runs finish in. Its progress goes to
    ``shown`` (in a pool process, a Forwarder to the parent's Reporter)."""
    device = device_slots.get()
    try:
        return execute_one(run, opts, device, shown)
    except Exception as err:  # one run's failure (bad input, CUDA out of memory) must not stop the others
        return "error", f"{progress.run_name(run)}: {type(err).__name__}: {err}"
    finally:
        device_slots.put(device)


def devices_for(opts: Options) -> list[str]:
    if opts.device != "auto":
        return [opts.device]
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]


def warn(msg: str) -> None:
    print(f"simpnet: warning: {msg}", file=sys.stderr, flush=True)


def execute(runs: list[tables.RunSpec], opts: Options) -> dict[str, int]:
    """Run everything in ``runs``: one after another, or ``jobs_per_device`` at once on every visible device."""
    preflight(runs, opts)
    counts: dict[str, int] = {}

    def tally(run: tables.RunSpec, outcome: str, msg: str) -> None:
        counts[outcome] = counts.get(outcome, 0) + 1
        shown.run_finished(progress.run_key(run), outcome, msg)

    # Train each distinct run once; its twins in other tables are recorded from its result afterwards.
    first, twins, seen = [], [], set()
    for run in runs:
        (twins if run.config_hash in seen else first).append(run)
        seen.add(run.config_hash)
    slots = devices_for(opts)
    workers = min(len(slots) * max(1, opts.jobs_per_device), len(first))
    with progress_for(runs, opts, run_bars=workers <= 1) as shown:
        if workers <= 1:  # in this process; the first bad input stops everything, with its own message
            for run in first + twins:
                tally(run, *execute_one(run, opts, slots[0], shown))
        else:
            execute_packed(first, twins, opts, slots, workers, shown, tally)
    # Every table of the command, whatever its runs did: a damaged or stale file is rebuilt, runs killed
    # before their rebuild are indexed, and what was refused or dropped is said once.
    index.rebuild_tables(opts.results_dir, opts.runs_dir, {r.table for r in runs}, warn)
    if counts.get("error"):
        raise UserError(f"{counts['error']} run(s) failed; see the messages above")
    return counts


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


def watch_parent(parent: int, every: float = 0.5) -> None:
    """In a worker process: exit as soon as ``parent`` is gone (the worker is then adopted by another process).
    Its run resumes from its last checkpoint next time; every file it writes is replaced atomically."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def execute_packed(first, twins, opts: Options, slots: list[str], workers: int, shown: progress.Reporter,
                   tally) -> None:
    # Processes, not threads: each packed run has its own CUDA context and Python interpreter, so one
    # run's host overhead never stalls another's kernel launches.
    # Their progress comes back through a queue: the parent shows one line per evaluation and the command's bar.
    ctx = mp.get_context("spawn")
    # The workers and the manager watch this process: killed (SIGKILL, a lost SLURM job), it cannot stop them,
    # so they stop themselves instead of training for minutes with no one to record them.
    manager = SyncManager(ctx=ctx)
    manager.start(watch_parent, (os.getpid(),))
    with manager, ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=watch_parent,
                                      initargs=(os.getpid(),)) as pool:
        device_slots, events = manager.Queue(), manager.Queue()
        for device in slots * max(1, opts.jobs_per_device):
            device_slots.put(device)
        pending = {pool.submit(_worker, run, opts, device_slots, progress.Forwarder(events)): run for run in first}
        while pending:
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            progress.drain(events, shown)  # a run's last events are queued before its future completes
            for fut in finished:
                tally(pending.pop(fut), *fut.result())
        for run in twins:  # recorded from their first run's result.json (or trained if that one failed)
            tally(run, *_worker(run, opts, device_slots, shown))
