"""Plan the runs a command asks for and execute them: skip finished ones, resume interrupted ones, record each.

A run's identity is the hash of its resolved config and seed (tables.RunSpec.config_hash) and its folder,
``runs_dir/<hash>``, is its record: ``results/table<N>.csv`` is an index rebuilt from the folders after each
run and at the end of each command (runs/index.py). Rows that are the same network trained the same way in two
tables (Table 2's 8-layer net is Table 7's 3x3 300K and Table 9's first row) share one run folder, with a
record for each table row, and get one line in each table's CSV.

Runs that can share a training step (the same network, data, solver and length, whatever their seeds, rates
and schedules: a row's seeds and its lr variants) are trained together, ``stack`` at a time or as ``stack=auto``
measures (train/together.py); each still gets its own folder, record and CSV line, and resumes alone or with
its group.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection  # noqa: F401 - mp.connection.wait
import os
import signal
import statistics
import sys
from dataclasses import dataclass, replace
from multiprocessing.managers import SyncManager
from pathlib import Path

import torch

from simpnet_cli.runs import authors, index, results
from simpnet_cli.runs import progress
from simpnet_cli.runs import schedule
from simpnet_cli.runs.watch import watch_parent  # (its own module: the manager process imports only it)
from simpnet_cli.config import schemas, tables
from simpnet_cli.nets import specs as network
from simpnet_cli.train import callbacks
from simpnet_cli.train import checkpoint
from simpnet_cli.train import data as D
from simpnet_cli.train import loop as train
from simpnet_cli.train import state as run_state
from simpnet_cli.train import together
from simpnet_cli.errors import UserError
from simpnet_cli.files import read_json, write_json
from simpnet_cli.config.variants import RowOverrides


@dataclass(frozen=True)
class Options:
    """Where and how runs execute; none of it changes what a run computes."""
    data_dir: Path
    download: bool
    results_dir: Path
    runs_dir: Path
    device: str
    jobs_per_device: int | str  # N, or "auto": by schedule.jobs_for, measured
    profile: str
    quiet: bool = False
    logger: str | tuple[str, ...] = "csv"  # train.callbacks.logger_names: csv, tensorboard, mlflow or several
    stack: str | int = "off"  # auto | off | N: runs sharing one training step (stack_size)
    stack_mode: str = "grouped"  # how stacked runs share it: grouped | branched (train/together.py)
    shard: int | None = None  # with shards: train only the shard-th of `shards` slices of the jobs (a cluster job)
    shards: int | None = None


MAX_RUNS = 100_000  # runs one command may plan (each is a folder and a results line)


def plan(chosen: list[tables.Table], row_sel, seeds, profile: dict, run_opts: dict | None = None,
         data_opts: dict | None = None, overrides: RowOverrides | None = None,
         base_profile: dict | None = None) -> list[tables.RunSpec]:
    """Every (table, row, seed) the selectors name, resolved and validated, before anything trains: a bad key in
    the last row of ``table=all`` stops the command before the first run starts."""
    if row_sel is not None and len(chosen) > 1:
        raise UserError("row= needs a single table (table=N)")
    seeds = schemas.seeds_of(seeds)
    rows = [(table, row) for table in chosen for row in table.select(row_sel)]
    if len(rows) * len(seeds) > MAX_RUNS:  # said at once, where planning them would take minutes and gigabytes
        raise UserError(f"seeds={len(seeds):,} on {len(rows)} row(s) is {len(rows) * len(seeds):,} runs; a command "
                        f"plans at most {MAX_RUNS:,}: ask for fewer seeds or rows")
    runs = []
    for table, row in rows:
        # Resolved (configs read, schema and network checked) once per row: the seed changes nothing of
        # that, and re-reading every config per seed made seeds=30000 take minutes before the first run.
        first = tables.resolve(table, row, seeds[0], profile, run_opts, data_opts, overrides, base_profile)
        runs.append(first)
        runs += [first.with_seed(seed) for seed in seeds[1:]]
    return runs


def stack_size(stack, device: torch.device) -> int:
    """How many runs share one training step by ``stack=``: ``off`` 1, ``N`` N, ``auto`` 1 (on a GPU,
    ``plan_groups`` measures instead; on the CPU a shared step is no faster than k separate ones: simpnet bench)."""
    if isinstance(stack, str) and stack in ("auto", "off"):
        return 1
    try:
        size = int(stack)
    except (TypeError, ValueError):
        size = 0
    if isinstance(stack, bool) or size < 1 or str(stack).strip() != str(size):
        raise UserError(f"stack={stack!r}: use auto, off, or the number of runs trained in one step (stack=3)")
    return size


def stack_mode(mode: str) -> str:
    if mode not in together.HOWS:
        raise UserError(f"stack_mode={mode!r}: use {' or '.join(together.HOWS)}")
    return mode


def share_key(run: tables.RunSpec) -> str:
    """Runs with equal keys can be trained in one step: all of the run's identity but its seed and its
    learning rate and schedule (each run of a shared step keeps its own rate)."""
    identity = {k: v for k, v in run.identity().items() if k != "seed"}
    identity["solver"] = {k: v for k, v in identity["solver"].items() if k not in ("lr", "schedule")}
    return json.dumps(identity, sort_keys=True, default=str)


def stack_groups(runs: list[tables.RunSpec], size: int | dict[str, int]) -> list[list[tables.RunSpec]]:
    """``runs`` cut into groups of at most ``size`` (or ``size[share_key(run)]``) that can share a step, in the
    order of their first runs."""
    by_key: dict[str, list[list[tables.RunSpec]]] = {}
    groups = []
    for run in runs:
        key = share_key(run)
        chunks = by_key.setdefault(key, [])
        if not chunks or len(chunks[-1]) >= (size if isinstance(size, int) else size[key]):
            chunks.append([])
            groups.append(chunks[-1])
        chunks[-1].append(run)
    return groups


AUTO_MOST = 4            # stack=auto puts at most this many runs in one step
AUTO_TIMING = (20, 10)   # (timed steps, warm-up steps) of each window of each way stack=auto compares
AUTO_WINDOWS = 5         # windows per way; the median decides (one window can be hit by a clock boost or a rival)
STACK_CHOICES = "stack_choices.json"  # in runs_dir: what stack=auto measured, per device and network


def choice_key(runs: list[tables.RunSpec], device_label: str) -> str:
    k = min(AUTO_MOST, len(runs))
    return f"{device_label} | {hashlib.sha256(share_key(runs[0]).encode()).hexdigest()[:16]} | k={k}"


def measure_ways(run: tables.RunSpec, device: torch.device, k: int, timer=together.time_steps,
                 windows: int = AUTO_WINDOWS) -> dict:
    """stack=auto's measurement: separate, grouped and branched at ``k``, ``windows`` times each, the way that
    runs first rotated from one window to the next (the first of a round meets a cooler or busier GPU), each
    window inside one epoch of its data (together.time_steps), the median of each way's windows kept. A way whose
    step did not run as a CUDA graph (its capture failed: it ran eagerly) is not chosen: the graphed ways are
    compared with each other, never with an eager fallback."""
    rates: dict[str, list[float]] = {how: [] for how in together.TIMED}
    modes: dict[str, str] = {}
    for window in range(windows):
        turn = window % len(together.TIMED)
        for how in together.TIMED[turn:] + together.TIMED[:turn]:
            seen: list[str] = []
            rates[how].append(timer(run, device, how, k, *AUTO_TIMING, seen))
            if seen:
                modes[how] = seen[-1]
    median = {how: statistics.median(r) for how, r in rates.items()}
    fell_back = sorted(how for how, mode in modes.items() if device.type == "cuda" and not mode.startswith("cuda-graph"))
    eligible = {how: r for how, r in median.items() if how not in fell_back or how == "separate"}
    fastest = max(eligible, key=eligible.get)
    return {"fastest": fastest, "img_per_s": {h: round(r, 1) for h, r in median.items()}, "windows": windows,
            "step_mode": modes, "fell_back": fell_back}


def auto_choice(runs: list[tables.RunSpec], device: torch.device, device_label: str, cache: dict,
                timer=together.time_steps) -> tuple[int, str]:
    """(runs per step, how) for ``runs`` (one share_key) by ``stack=auto`` on ``device``: the fastest of
    separate, grouped and branched at k = min(AUTO_MOST, len(runs)) by ``measure_ways`` (total img/s), measured
    once per device and network and kept in ``cache``; separate on the CPU, where no shared step pays."""
    k = min(AUTO_MOST, len(runs))
    if k < 2 or device.type != "cuda":
        return 1, "separate"
    entry = choice_key(runs, device_label)
    if entry not in cache:
        cache[entry] = measure_ways(runs[0], device, k, timer)
    fastest = cache[entry]["fastest"]
    return (1, "separate") if fastest == "separate" else (k, fastest)


def decide_in_worker(group: list[tables.RunSpec], opts: Options, dev: torch.device,
                     timer=together.time_steps) -> list[tuple[list[tables.RunSpec], str]]:
    """A ``stack=auto`` job (plan_groups with ``defer``) decided where it trains: measured on this worker's own
    device while the other workers measure or train on theirs (never all of them one after another on cuda:0
    while the other GPUs wait), the result merged into runs_dir/stack_choices.json under a lock."""
    path = opts.runs_dir / STACK_CHOICES
    label = run_state.device_name(dev)
    cache = read_json(path) or {}
    entry = choice_key(group, label)
    if entry not in cache:
        found: dict = {}
        auto_choice(group, dev, label, found, timer)  # measured outside the lock: other devices go on
        with open(opts.runs_dir / f".{STACK_CHOICES}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cache = {**(read_json(path) or {}), **found}
            write_json(path, cache)
    k, how = auto_choice(group, dev, label, cache, timer)
    return [stepped(group[i:i + k], how) for i in range(0, len(group), k)]


def plan_groups(runs: list[tables.RunSpec], opts: Options, device: torch.device,
                timer=together.time_steps, defer: bool = False) -> list[tuple[list[tables.RunSpec], str]]:
    """The runs cut into groups that share one training step, each with how it shares it ("separate" for a
    group of one): as ``stack`` and ``stack_mode`` say, or, for ``stack=auto`` on a GPU, as measured. The runs of
    a shared step come back as such (``RunSpec.in_step``): their hash says how they were computed. With
    ``defer``, a stack=auto group of several runs is left "auto", as runs trained alone, for the worker that
    trains it to decide on its own device (decide_in_worker)."""
    how = stack_mode(opts.stack_mode)
    if opts.stack != "auto" or device.type != "cuda":
        size = stack_size(opts.stack, device)
        return [stepped(g, how) for g in stack_groups(runs, size)]
    if defer:
        return [(g, "auto" if len(g) > 1 else "separate") for g in stack_groups(runs, AUTO_MOST)]
    cache_path = opts.runs_dir / STACK_CHOICES
    cache = read_json(cache_path) or {}
    chosen: dict[str, tuple[int, str]] = {}
    for run in runs:
        key = share_key(run)
        if key not in chosen:
            chosen[key] = auto_choice([r for r in runs if share_key(r) == key], device, run_state.device_name(device),
                                      cache, timer)
    check_writable(opts.runs_dir, "runs_dir")
    write_json(cache_path, cache)
    return [stepped(g, chosen[share_key(g[0])][1])
            for g in stack_groups(runs, {key: k for key, (k, _) in chosen.items()})]


def stepped(group: list[tables.RunSpec], how: str) -> tuple[list[tables.RunSpec], str]:
    """A planned group and how it shares its step; a group of several runs as runs of that step (their hash
    names how and how many: the arithmetic of a shared step depends on both)."""
    if len(group) < 2 or how == "separate":
        return group, "separate"
    return [run.in_step(f"{how} {len(group)}") for run in group], how


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
            # what would fail at the run's first step: a batch the data cannot fill, or BatchNorm on one value
            batch = int(run.train.get("batch_size", schemas.Train.batch_size))
            D.check_batch(run.dataset, batch)
            network.check_batchnorm_batch(run.spec, run.in_shape, batch)
        except UserError as err:
            raise UserError(f"table {run.table}, row {run.row_id}" + (f" with {run.variant}" if run.variant else "")
                            + f": {err}") from None
    if not full:
        return
    check_results_files(opts.results_dir, {r.table for r in runs})
    check_writable(opts.results_dir, "results_dir")
    check_writable(opts.runs_dir, "runs_dir")
    datasets = {json_key(run.dataset): run.dataset for run in runs}  # each distinct one once
    D.check_available(list(datasets.values()), opts.data_dir, opts.download)


def check_results_files(results_dir: Path, names) -> None:
    """Each table's results file is a file, or not there yet (run, repair)."""
    for name in sorted(names):
        path = results.csv_path(results_dir, name)
        if path.exists() and not path.is_file():
            raise UserError(f"{path} is not a file (a folder?): move it away so table {name} can be recorded")


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
                            loggers=opts.logger, callbacks=yardsticks())
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


def _slot_worker(opts, device, shown, conn) -> None:
    """A packed worker holding one device slot: trains the jobs the parent sends through ``conn``, one at a time,
    and sends back each one's [(the run's place in the group, outcome, message, its step as trained)], until it
    gets None. A job is one plan_groups group and how it shares its step (usually a single run, "separate"; "auto":
    decided here): a stacked group trains together in this one process, on this one slot. Its progress goes to
    ``shown`` (a Forwarder to the parent's Reporter)."""
    watch_parent(os.getppid())  # the parent killed hard cannot stop this worker: it stops itself
    while (job := conn.recv()) is not None:
        group, how = job
        try:
            outcomes = execute_group(group, opts, device, shown, auto=how == "auto")
        except Exception as err:  # one group's failure (bad input, CUDA out of memory) must not stop the others
            outcomes = [(run, "error", f"{progress.run_name(run)}: {type(err).__name__}: {err}") for run in group]
        conn.send([(n, outcome, message, run.step) for n, (run, outcome, message) in enumerate(outcomes)])


def death_cause(exitcode: int | None) -> str:
    """Why a run's process ended without a result, from its exit code (minus a signal's number)."""
    if exitcode is None or exitcode >= 0:
        return f"its process exited with status {exitcode} before it reported"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    why = {"SIGKILL": "the kernel's out-of-memory killer, or a kill -9",
           "SIGSEGV": "a crash in native code", "SIGABRT": "an abort, e.g. in the CUDA driver or a library",
           "SIGBUS": "a crash in native code"}.get(name)
    return f"its process was killed by {name}" + (f" ({why})" if why else "")


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
            execute_packed(groups, twins, fetch_datasets(first, opts), slots, workers, shown, tally, as_trained)
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


class _Slot:
    """A worker process on one device slot, and the job (a group of runs, and how they share a step) it
    trains (None: idle)."""

    def __init__(self, ctx, opts: Options, device: str, shown):
        self.device, self.job = device, None
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_slot_worker, args=(opts, device, shown, theirs))
        self.proc.start()
        theirs.close()  # only the worker holds its end, so its death reads as end-of-file here

    def outcome(self):
        """[(the run's place in the group, outcome, message)] once the job has reported, "died" if the worker is
        dead, None while it trains."""
        if not self.conn.poll():
            return None
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            self.proc.join()
            return "died"


def execute_packed(groups, twins, opts: Options, slots: list[str], workers: int, shown: progress.Reporter,
                   tally, as_trained=lambda twin: twin) -> None:
    """``workers`` processes, each holding one device slot and training one job at a time: a plan_groups group,
    one run or a stack of runs trained together in one step in that one process, so a device never holds more
    than ``jobs_per_device`` jobs. Processes, not threads: each packed job has its own CUDA context and
    interpreter, so one job's host overhead never stalls another's kernel launches. Not a ProcessPoolExecutor:
    one worker dying hard (the out-of-memory killer, a CUDA abort, a segfault) breaks such a pool and every run
    in it. Here the parent knows which job each worker holds: a dead worker's runs are reported failed with its
    cause (they resume from their last checkpoints on the next invocation), a fresh worker takes the slot, and
    the other jobs go on."""
    ctx = mp.get_context("spawn")
    jobs, died = list(groups), set()
    devices = (slots * max(1, opts.jobs_per_device))[:workers]
    pool: list[_Slot | None] = [None] * len(devices)  # a worker is started when a job needs it

    def next_job():
        """The next group with runs still to train, as (runs, how); recorded runs are skipped here, without a
        worker, and a group left with one run trains it alone."""
        while jobs:
            group, how = jobs.pop(0)
            left = []
            for run in group:
                if index.is_recorded(opts.results_dir, opts.runs_dir, run):
                    tally(run, "skipped", f"{progress.run_name(run)}: already recorded")  # no worker needed
                else:
                    left.append(run)
            if left:
                return left, how  # (a stacked run left alone still trains in its step, with passengers)
        return None

    # The workers (above) and the manager watch this process: killed (SIGKILL, a lost SLURM job), it cannot stop
    # them, so they stop themselves instead of training for minutes with no one to record them.
    manager = SyncManager(ctx=ctx)
    manager.start(watch_parent, (os.getpid(),))
    with manager:
        events = manager.Queue()  # progress: the parent shows one line per evaluation and the command's bar
        try:
            while True:
                for i, w in enumerate(pool):
                    if w is not None and w.job is not None:
                        continue
                    job = next_job()
                    if job is None:
                        break
                    if w is None or not w.proc.is_alive():
                        pool[i] = w = _Slot(ctx, opts, devices[i], progress.Forwarder(events))
                    w.conn.send(job)
                    w.job = job
                busy = [w for w in pool if w is not None and w.job is not None]
                if not busy:
                    break
                mp.connection.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.5)
                progress.drain(events, shown)  # a run's last events are queued before its job reports
                for i, w in enumerate(pool):
                    reported = w.outcome() if w is not None and w.job is not None else None
                    if reported is None:
                        continue
                    (group, _), w.job = w.job, None
                    if reported == "died":  # the slot gets a fresh worker when a job needs it
                        died.update(run.alone_hash for run in group)
                        pool[i] = None
                        cause = death_cause(w.proc.exitcode)
                        shared = f" (it trained {len(group)} runs together)" if len(group) > 1 else ""
                        for run in group:
                            tally(run, "error", f"{progress.run_name(run)}: {cause}{shared}; the other runs went "
                                                f"on, and this one resumes from its last checkpoint on the next "
                                                f"invocation")
                        continue
                    for place, outcome, message, step in reported:
                        tally(group[place], outcome, message, step)
        finally:
            live = [w for w in pool if w is not None]
            for w in live:
                if w.job is None and w.proc.is_alive():
                    try:
                        w.conn.send(None)  # done: the worker returns
                    except OSError:
                        pass
                else:  # interrupted (Ctrl-C) mid-job: its runs resume from their checkpoints next time
                    w.proc.terminate()
            for w in live:
                w.proc.join(timeout=30)
                if w.proc.is_alive():
                    w.proc.kill()
    for run in twins:  # recorded from their first run's result.json (or trained here if that one failed)
        if run.alone_hash in died:  # not in this process: what killed that one would end the command
            tally(run, "error", f"{progress.run_name(run)}: not trained, its run's process died (above)")
            continue
        try:
            tally(*execute_group([as_trained(run)], opts, slots[0], shown)[0])
        except Exception as err:  # noqa: BLE001 - as in a packed run: the others are recorded
            tally(run, "error", f"{progress.run_name(run)}: {type(err).__name__}: {err}")
