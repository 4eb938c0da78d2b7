"""What a command will run, and where, checked before anything trains.

The runs its selectors name, resolved and validated (``plan``); the groups of them that share one training step
(``plan_groups``: ``stack=N``, or ``stack=auto``'s measurement, decided in the worker that trains them:
``decide_in_worker``), a run of a shared step naming its step in its hash (``stepped``, tables.RunSpec.step); the
devices (``pick_device``, ``devices_for``); and everything that can fail before the first run trains
(``preflight``: devices, memory, output folders, datasets). runs/runner.py executes the plan.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from simpnet_cli.runs import results
from simpnet_cli.config import schemas, tables
from simpnet_cli.nets import specs as network
from simpnet_cli.train import data as D
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


def devices_for(opts: Options) -> list[str]:
    if opts.device != "auto":
        return [opts.device]
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]


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
