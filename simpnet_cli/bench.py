"""Speed: images per second of the plain eager loop and of the runner's step, alone and packed, and the
time estimate of ``simpnet run ... --dry-run``.

Measurements train real steps of the row's network and solver at the row's batch size on synthetic data
of the dataset's shape (speed does not depend on pixel values). ``simpnet bench`` writes
results/benchmarks.md with the device name; figures from a CPU are labelled as such.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from simpnet_cli import data as D
from simpnet_cli import fast
from simpnet_cli import model as M
from simpnet_cli import network
from simpnet_cli import tables, train
from simpnet_cli.errors import UserError

# Table S1 of the supplement: minutes for 30,000 iterations of the 1.6M rows on a GTX 1080 (Caffe).
TABLE_S1 = {"3x3-1.6M": 41.32, "5x5-1.6M": 45.29, "7x7-1.6M": 64.52}

MODES = {  # name: (CUDA graphs, precision, channels-last)
    "eager fp32": (False, "fp32", False),
    "runner fp32": (True, "fp32", True),
    "runner bf16": (True, "bf16", True),
}


def _setup(run: tables.RunSpec, device: torch.device, graphs: bool, precision: str, channels_last: bool):
    torch.manual_seed(0)
    batch = int(run.train["batch_size"])
    ds = {**run.dataset, "source": "synthetic", "train_size": max(20 * batch, 2000), "test_size": batch}
    data = D.load(ds, Path("."), False, device, batch, 0)
    model = M.build_model(run.spec, run.in_shape).to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    graphs = graphs and device.type == "cuda"
    optimizer = train.make_optimizer(run.solver, model.parameters(), capturable=graphs)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    return fast.Step(model, optimizer, data, autocast, graphs, channels_last), model, data, batch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: tables.RunSpec, device: torch.device, mode: str, iters: int, warmup: int,
            barrier=None) -> float:
    """Training images per second of ``mode`` on ``run``'s network (after ``warmup`` steps)."""
    graphs, precision, channels_last = MODES[mode]
    step, _, _, batch = _setup(run, device, graphs, precision, channels_last)
    lr = train.lr_at(run.solver, 0)
    for i in range(warmup):
        step(i, lr)
    _sync(device)
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + iters):
        step(i, lr)
    _sync(device)
    return iters * batch / (time.perf_counter() - t0)


def flops_per_step(run: tables.RunSpec, device: torch.device) -> int:
    """Forward + backward FLOPs of one batch, from torch's FLOP counter."""
    step, model, data, _ = _setup(run, device, False, "fp32", False)
    x, y = data.batch(0)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def _packed_worker(run, device, iters, warmup, barrier, out):
    out.put(measure(run, torch.device(device), "runner fp32", iters, warmup, barrier))


def measure_packed(run: tables.RunSpec, device: str, n: int, iters: int, warmup: int) -> float:
    """Total images per second of ``n`` processes training the same row at once on one device."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_packed_worker, args=(run, device, iters, warmup, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def _run_for(ref: str, batch_size: int | None) -> tables.RunSpec:
    table, _, row = str(ref).partition("/")
    if not row:
        raise UserError(f"bench.rows entry {ref!r}: write TABLE/ROW_ID, e.g. 2/8L")
    t = tables.load_table(table)
    train_cfg = {"batch_size": batch_size or 100}
    return tables.resolve(t, t.row(row), 0, {"train": train_cfg})


def main(cfg, flags) -> int:
    from simpnet_cli.runner import pick_device

    b = cfg.bench
    device = pick_device(str(cfg.device))
    name = train.device_name(device)
    lines = [f"# Benchmarks", "", f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on **{name}**, "
             f"torch {torch.__version__}, by `simpnet bench` (batch {b.batch_size}, {b.iters} timed iterations "
             f"after {b.warmup} warm-up ones, synthetic data of the dataset's shape).", ""]
    if device.type != "cuda":
        lines += ["> CPU figures: they check that the benchmark runs, not the GPU targets of the speed issue.", ""]
    header = "| row | network params | mode | img/s | speed-up vs eager | TFLOP/s |"
    lines += [header, "|---|---|---|---|---|---|"]
    for ref in b.rows:
        run = _run_for(ref, b.batch_size)
        flops = flops_per_step(run, device)
        base = None
        for mode in MODES:
            if mode != "eager fp32" and device.type != "cuda":
                continue  # the captured step exists only on a GPU
            rate = measure(run, device, mode, int(b.iters), int(b.warmup))
            base = base or rate
            tflops = flops * rate / run.train["batch_size"] / 1e12
            lines.append(f"| {ref} | {network.count_params(run.spec, run.in_shape)[0]:,} | "
                         f"{mode} | {rate:,.0f} | {rate / base:.2f}x | {tflops:.2f} |")
            print(lines[-1], flush=True)
        for n in (p for p in b.pack if int(p) > 1):
            if device.type != "cuda":
                break
            rate = measure_packed(run, str(device), int(n), int(b.iters), int(b.warmup))
            lines.append(f"| {ref} | | {n} packed runs (runner fp32), total | {rate:,.0f} | {rate / base:.2f}x | |")
            print(lines[-1], flush=True)
    if b.s1:
        lines += ["", "## Table S1: time for 30,000 iterations of the 1.6M rows (training steps only)", "",
                  "| row | paper (GTX 1080, Caffe), min | here, min | img/s |", "|---|---|---|---|"]
        mode = "runner fp32" if device.type == "cuda" else "eager fp32"
        for row_id, paper_min in TABLE_S1.items():
            run = _run_for(f"7/{row_id}", b.batch_size)
            rate = measure(run, device, mode, int(b.iters), int(b.warmup))
            minutes = 30000 * run.train["batch_size"] / rate / 60
            lines.append(f"| 7/{row_id} | {paper_min} | {minutes:.2f} | {rate:,.0f} |")
            print(lines[-1], flush=True)
    out = Path(b.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"wrote {out}")
    return 0


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def dry_run_summary(runs: list[tables.RunSpec], opts) -> str:
    """Runs, iterations and an estimated time on this device, from a short measured warm-up per network."""
    from simpnet_cli import results
    from simpnet_cli.runner import devices_for, pick_device

    device = pick_device(devices_for(opts)[0])
    todo, seen = [], set()
    for run in runs:
        if run.config_hash in seen or (run.row_id, run.config_hash, run.seed) in results.recorded(
                opts.results_dir, run.table):
            continue
        seen.add(run.config_hash)
        todo.append(run)
    iters, warmup = (20, 10) if device.type == "cuda" else (2, 1)
    speed: dict[tuple, float] = {}
    per_table: dict[str, list[float]] = {}
    for run in todo:
        key = (repr(run.spec), run.train["batch_size"], run.train.get("precision", "fp32"), run.in_shape)
        if key not in speed:
            mode = "runner bf16" if key[2] == "bf16" and device.type == "cuda" else \
                "runner fp32" if device.type == "cuda" else "eager fp32"
            speed[key] = measure(run, device, mode, iters, warmup) / run.train["batch_size"]  # steps/s
        per_table.setdefault(run.table, [0, 0, 0.0])
        entry = per_table[run.table]
        entry[0] += 1
        entry[1] += run.train["iterations"]
        entry[2] += run.train["iterations"] / speed[key]
    slots = len(devices_for(opts))
    lines = [f"{len(runs)} run(s) asked for, {len(todo)} still to train ({len(runs) - len(todo)} recorded or "
             f"shared with another table); estimate on {train.device_name(device)} from {iters} timed steps "
             f"per network, one run at a time per device, {slots} device(s), evaluation excluded:",
             "| table | runs | iterations | estimated time |", "|---|---|---|---|"]
    total = [0, 0, 0.0]
    for name, (n, it, secs) in per_table.items():
        lines.append(f"| {name} | {n} | {it:,} | {_duration(secs / slots)} |")
        total = [total[0] + n, total[1] + it, total[2] + secs]
    lines.append(f"| all | {total[0]} | {total[1]:,} | {_duration(total[2] / slots)} |")
    return "\n".join(lines)
