"""Speed: images per second of the plain eager loop and of the runner's step, alone and packed, and the
time estimate of ``simpnet run ... --dry-run``.

Measurements train real steps of the row's network and solver at the row's batch size on synthetic data
of the dataset's shape (speed does not depend on pixel values). ``simpnet bench`` writes
results/bench/benchmarks.md (git-ignored: a bench never rewrites a tracked file; bench.out= says elsewhere) with
the device name; figures from a CPU are labelled as such. Every row says the step mode it really ran in (a
runner step whose capture failed ran eagerly, and is labelled so) and, beside it, the authors' images/s and
hours for that row (runs/authors.py) and our ratio to them.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from simpnet_cli.train import data as D
from simpnet_cli.train import captured_step
from simpnet_cli.nets import modules as M
from simpnet_cli.nets import specs as network
from simpnet_cli.config import tables
from simpnet_cli.train import loop as train
from simpnet_cli.train import state as run_state
from simpnet_cli.train import solvers
from simpnet_cli.train import together
from simpnet_cli.errors import UserError
from simpnet_cli.runs import authors
from simpnet_cli.runs.schedule import mps_status  # noqa: F401 - bench.mps_status, as before

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
    model = M.build_model(run.spec, run.in_shape, run.net).to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    graphs = graphs and device.type == "cuda"
    optimizer = solvers.make_optimizer(run.solver, solvers.param_groups(model, run.param_mults))
    autocast = solvers.autocast_for(precision, device)
    return captured_step.Step(model, optimizer, data, autocast, graphs, channels_last), model, data, batch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(run: tables.RunSpec, device: torch.device, mode: str, iters: int, warmup: int,
                barrier=None) -> tuple[int, float, float, str]:
    """(images, start, end, step mode) of ``iters`` training steps of ``mode`` on ``run``'s network after ``warmup``
    ones. The times are time.monotonic(): one clock for every process of the machine, so packed processes'
    spans can be put side by side."""
    graphs, precision, channels_last = MODES[mode]
    if device.type == "cuda":
        torch.cuda.set_device(device)  # streams, graphs and synchronize follow the current device
        torch.backends.cudnn.benchmark = True  # as train_run: fixed shapes
    step, _, _, batch = _setup(run, device, graphs, precision, channels_last)
    lr = solvers.lr_at(run.solver, 0)
    for i in range(warmup):
        step(i, lr)
    _sync(device)
    if barrier is not None:
        barrier.wait()
    t0 = time.monotonic()
    for i in range(warmup, warmup + iters):
        step(i, lr)
    _sync(device)
    return iters * batch, t0, time.monotonic(), step.step_mode


def measure(run: tables.RunSpec, device: torch.device, mode: str, iters: int, warmup: int) -> float:
    """Training images per second of ``mode`` on ``run``'s network (after ``warmup`` steps)."""
    return measure_with_mode(run, device, mode, iters, warmup)[0]


def measure_with_mode(run: tables.RunSpec, device: torch.device, mode: str, iters: int,
                      warmup: int) -> tuple[float, str]:
    """(images per second, the step mode it really ran in) of ``mode`` on ``run``'s network."""
    images, t0, t1, step_mode = timed_steps(run, device, mode, iters, warmup)
    return images / (t1 - t0), step_mode


def mode_label(mode: str, step_mode: str) -> str:
    """A bench mode as it really ran: a runner (graphed) mode whose capture fell back to eager says so, so its
    figure is never read as a graphed one."""
    graphs = MODES.get(mode, (False,))[0]
    if graphs and not all(m.startswith("cuda-graph") for m in str(step_mode).split(" / ")):  # (packed: each)
        return f"{mode}, FELL BACK TO EAGER"
    return mode


def packed_rate(spans: list[tuple[int, float, float]]) -> float:
    """Images per second of processes that trained at once: all their images over the span from the first
    one's start to the last one's end. (The sum of each process's own rate overstates it: a process that
    starts late or ends early had the device to fewer rivals for part of its time.)"""
    return sum(span[0] for span in spans) / (max(span[2] for span in spans) - min(span[1] for span in spans))


def stack_lines(b, device: torch.device) -> list[str]:
    """img/s per run and in total of k seeds trained separately, grouped and branched, for each row and k."""
    lines = ["", f"## Several runs in one step (k seeds of a row; {'CUDA graphs' if device.type == 'cuda' else 'eager, CPU'})",
             "", "| row | k | mode | step_mode | img/s per run | img/s total | vs separate | authors' img/s | "
                 "authors' h | per run vs authors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ref in b.rows:
        run = _run_for(ref, b.batch_size)
        for k in (int(k) for k in b.stack):
            base = None
            for how in together.TIMED:
                progress(f"timing {ref}: {k} run(s), {how}")
                seen: list[str] = []
                total = together.time_steps(run, device, how, k, int(b.iters), int(b.warmup), seen)
                base = base or total
                lines.append(f"| {ref} | {k} | {how} | {seen[-1] if seen else '-'} | {total / k:,.0f} | "
                             f"{total:,.0f} | {total / base:.2f}x | {authors.beside(run.table, run.label, total / k)} |")
                print(lines[-1], flush=True)
    return lines


def flops_per_step(run: tables.RunSpec, device: torch.device) -> int:
    """Forward + backward FLOPs of one batch, from torch's FLOP counter."""
    step, model, data, _ = _setup(run, device, False, "fp32", False)
    x, y = data.batch(0)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


STARTED = time.monotonic()  # (reset by main) each progress line says the time since the bench began


def progress(line: str) -> None:
    """What the bench is doing now, before each measurement (a measurement can take a minute), and the time
    since the bench began: the gap between two lines is one step's time."""
    print(f"bench [{time.monotonic() - STARTED:.0f} s]: {line} ...", file=sys.stderr, flush=True)


def _packed_worker(run, device, mode, iters, warmup, barrier, out):
    out.put(timed_steps(run, torch.device(device), mode, iters, warmup, barrier))


def measure_packed(run: tables.RunSpec, device: str, n: int, iters: int, warmup: int,
                   mode: str = "runner fp32") -> float:
    """Total images per second of ``n`` processes training the same row at once on one device (packed_rate)."""
    return measure_packed_with_modes(run, device, n, iters, warmup, mode)[0]


def measure_packed_with_modes(run: tables.RunSpec, device: str, n: int, iters: int, warmup: int,
                              mode: str = "runner fp32") -> tuple[float, str]:
    """(measure_packed's total images per second, the step modes the processes ran in, joined)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n, timeout=600), ctx.Queue()
    procs = [ctx.Process(target=_packed_worker, args=(run, device, mode, iters, warmup, barrier, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        spans = [out.get(timeout=1800) for _ in procs]  # a worker that died (OOM, CUDA error) never answers
    except queue.Empty:
        raise UserError(f"a packed benchmark process of {n} did not report (exit codes "
                        f"{[p.exitcode for p in procs]}); run with fewer packed runs or check GPU memory") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return packed_rate(spans), " / ".join(sorted({str(span[3]) for span in spans}))


def _run_for(ref: str, batch_size: int | None) -> tables.RunSpec:
    table, _, row = str(ref).partition("/")
    if not row:
        raise UserError(f"bench.rows entry {ref!r}: write TABLE/ROW_ID, e.g. 2/8L")
    t = tables.load_table(table)
    train_cfg = {"batch_size": batch_size or 100}
    return tables.resolve(t, t.row(row), 0, {"train": train_cfg})


def speed_lines(b, device: torch.device) -> list[str]:
    """img/s and TFLOP/s of each mode on each row, and of packed runs."""
    lines = ["| row | network params | mode | step_mode | img/s | speed-up vs eager | TFLOP/s | authors' img/s | "
             "authors' h | vs authors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ref in b.rows:
        run = _run_for(ref, b.batch_size)
        progress(f"counting the FLOPs of {ref}")
        flops = flops_per_step(run, device)
        params = network.count_params(run.spec, run.in_shape)[0]
        base = None
        for mode in MODES:
            if mode != "eager fp32" and device.type != "cuda":
                continue  # the captured step exists only on a GPU
            progress(f"timing {ref}, {mode}: {b.iters} steps after {b.warmup}")
            rate, step_mode = measure_with_mode(run, device, mode, int(b.iters), int(b.warmup))
            base = base or rate
            tflops = flops * rate / run.train["batch_size"] / 1e12
            lines.append(f"| {ref} | {params:,} | {mode_label(mode, step_mode)} | {step_mode} | {rate:,.0f} | "
                         f"{rate / base:.2f}x | {tflops:.2f} | {authors.beside(run.table, run.label, rate)} |")
            print(lines[-1], flush=True)
        for n in (int(p) for p in b.pack if int(p) > 1 and device.type == "cuda"):
            for mode in ("runner fp32", "runner bf16"):
                progress(f"timing {ref}: {n} packed processes, {mode}")
                rate, step_modes = measure_packed_with_modes(run, str(device), n, int(b.iters), int(b.warmup), mode)
                lines.append(f"| {ref} | | {n} packed runs ({mode_label(mode, step_modes)}), total | {step_modes} | "
                             f"{rate:,.0f} | "
                             f"{rate / base:.2f}x | | {authors.beside(run.table, run.label, rate / n)} |")
                print(lines[-1], flush=True)
    return lines


def s1_lines(b, device: torch.device) -> list[str]:
    """Table S1: minutes for 30,000 iterations of the three 1.6M rows, beside the paper's."""
    lines = ["", "## Table S1: time for 30,000 iterations of the 1.6M rows (training steps only)", "",
             "| row | paper (GTX 1080, Caffe), min | here, min | img/s | mode | step_mode |", "|---|---|---|---|---|---|"]
    mode = "runner fp32" if device.type == "cuda" else "eager fp32"
    for row_id, paper_min in TABLE_S1.items():
        run = _run_for(f"7/{row_id}", b.batch_size)
        progress(f"timing 7/{row_id}, {mode}")
        rate, step_mode = measure_with_mode(run, device, mode, int(b.iters), int(b.warmup))
        lines.append(f"| 7/{row_id} | {paper_min} | {30000 * run.train['batch_size'] / rate / 60:.2f} | {rate:,.0f} | "
                     f"{mode_label(mode, step_mode)} | {step_mode} |")
        print(lines[-1], flush=True)
    return lines


def conv_layers(run: tables.RunSpec) -> list[tuple[int, int, int, int, int, int, int]]:
    """(in channels, out channels, kernel, stride, padding, height, width) of every convolution of ``run``'s
    network, in network order, read off one forward pass (grouped or depthwise convs are left out)."""
    model = M.build_model(run.spec, run.in_shape, run.net)
    found = []

    def hook(conv, inputs, _):
        h, w = inputs[0].shape[-2:]
        found.append((conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                      int(h), int(w)))

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    handles = [c.register_forward_hook(hook) for c in convs]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, run.in_shape.c, run.in_shape.h, run.in_shape.w))
    for h in handles:
        h.remove()
    return found


def conv_ms(cin: int, cout: int, k: int, stride: int, pad: int, h: int, w: int, groups: int, batch: int,
            device: torch.device, iters: int, warmup: int, dtype: torch.dtype) -> float:
    """Milliseconds of one forward + backward (input and weight gradients) of one convolution, channels-last."""
    conv = torch.nn.Conv2d(cin, cout, k, stride, pad, groups=groups).to(device, dtype,
                                                                         memory_format=torch.channels_last)
    x = torch.randn(batch, cin, h, w, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    grad = torch.ones_like(conv(x))
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        conv(x).backward(grad)
    _sync(device)
    return (time.perf_counter() - t0) / iters * 1000


def grouped_lines(g, device: torch.device) -> list[str]:
    """For the stacking work: each conv of the rows alone, as ``groups`` stacked copies in one grouped conv
    (``groups`` x the channels), and the same with each group's channels padded to a multiple of 8 (tensor
    cores want multiples of 8), in bf16. On the CPU it runs at batch 2 for one step in fp32 (most CPUs emulate
    bf16 convolutions, slowly): it checks the probe, not the GPU."""
    cpu = device.type != "cuda"
    batch, iters, warmup = (2, 1, 1) if cpu else (int(g.batch_size), int(g.iters), int(g.warmup))
    dtype = torch.float32 if cpu else torch.bfloat16
    n = int(g.groups)
    pad8 = lambda c: -(-c // 8) * 8  # noqa: E731
    lines = ["", f"## Grouped convolutions: one conv vs {n} stacked in one grouped conv ({'fp32' if cpu else 'bf16'}, "
                 f"channels-last, forward + backward, batch {batch}) on {run_state.device_name(device)}", ""]
    if cpu:
        lines += ["> CPU figures, at batch 2 for one step in fp32: they check the probe, not the GPU's speed.", ""]
    lines += [f"| row | conv | in -> out, kernel, input | one conv, ms | groups={n}, ms (x one) | "
              f"groups={n} padded to 8, ms (x one) |", "|---|---|---|---|---|---|"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for ref in g.rows:
        run = _run_for(ref, batch)
        for i, (cin, cout, k, stride, pad, h, w) in enumerate(conv_layers(run), 1):
            shape = (k, stride, pad, h, w)
            one = conv_ms(cin, cout, *shape, 1, batch, device, iters, warmup, dtype)
            grouped = conv_ms(n * cin, n * cout, *shape, n, batch, device, iters, warmup, dtype)
            padded = conv_ms(n * pad8(cin), n * pad8(cout), *shape, n, batch, device, iters, warmup, dtype)
            lines.append(f"| {ref} | {i} | {cin} -> {cout}, {k}x{k}/{stride}, {h}x{w} | {one:.3f} | "
                         f"{grouped:.3f} ({grouped / one:.2f}) | {padded:.3f} ({padded / one:.2f}) |")
            print(lines[-1], flush=True)
    return lines


def precision_lines(p, device: torch.device, data_dir: Path) -> list[str]:
    """Final test accuracy of fp32 and bf16 training of one-channel 28x28 rows on real Fashion-MNIST, over
    seeds: does mixed precision move a row by more than its seed spread?"""
    import statistics
    import tempfile

    lines = ["", f"## Mixed precision on real data (Fashion-MNIST, {p.train_size} train / {p.test_size} test images, "
             f"{p.iterations} iterations of batch {p.batch_size})", "",
             "| row | precision | final acc % (mean ± std) | n | best acc % (mean) | per seed (final) |",
             "|---|---|---|---|---|---|"]
    profile = {"train": {"iterations": int(p.iterations), "batch_size": int(p.batch_size),
                         "eval_every": int(p.iterations), "checkpoint_every": 10 ** 9},
               "data": {"train_size": int(p.train_size), "test_size": int(p.test_size)}}
    for ref in p.rows:
        table, _, row_id = str(ref).partition("/")
        t = tables.load_table(table)
        row = {**t.row(row_id), "dataset": "fashion_mnist"}
        for precision in p.precisions:
            finals, bests = [], []
            for seed in range(int(p.seeds)):
                run = tables.resolve(t, row, seed, profile, {"precision": precision})
                with tempfile.TemporaryDirectory() as tmp:
                    res = train.train_run(run, Path(tmp), device, data_dir, False)
                finals.append(res["final_acc"])
                bests.append(res["best_acc"])
            spread = statistics.stdev(finals) if len(finals) > 1 else float("nan")
            lines.append(f"| {ref} | {precision} | {statistics.mean(finals):.2f} ± {spread:.2f} | {len(finals)} | "
                         f"{statistics.mean(bests):.2f} | {', '.join(f'{f:.2f}' for f in finals)} |")
            print(lines[-1], flush=True)
    return lines


def ops_records(b, device: torch.device, say) -> list[dict]:
    """ATen ops per training step (tools/ops.py) of each row: one run in fp32 and in bf16, and k runs grouped
    and branched in one step for each k > 1 of ``bench.stack``; ``say`` gets each figure as it is counted."""
    from simpnet_cli.tools import ops

    ks = sorted({int(k) for k in (b.get("stack") or []) if int(k) > 1})
    records = []
    for ref in b.rows:
        run = _run_for(ref, b.batch_size)
        for mode, k in [("single", 1), ("bf16", 1)] + [(how, k) for k in ks for how in ("grouped", "branched")]:
            records.append({"row": str(ref), "mode": mode, "k": k, "ops_per_step": ops.ops_per_step(run, mode, k, device)})
            say(records[-1])
    return records


def ops_line(record: dict) -> str:
    n, k = record["ops_per_step"], record["k"]
    return f"| {record['row']} | {record['mode']} | {k} | {n} | {n / k:.0f} |"


def ops_main(cfg, flags, device: torch.device) -> int:
    """``bench.ops=true``: the ops per step of each row and mode, on stdout (a list of {row, mode, k,
    ops_per_step} with --json) and in ``bench.ops_out`` (markdown, a git-ignored file), instead of timing."""
    import json

    b = cfg.bench
    as_json = "--json" in flags
    head = ["# ATen ops per training step", "",
            f"Counted {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on **{run_state.device_name(device)}**, torch "
            f"{torch.__version__}, by `simpnet bench bench.ops=true`: the ops one captured step body dispatches "
            f"(forward, backward, optimizer update, loss bookkeeping; views left out), a proxy for the kernels of "
            f"its CUDA graph.", "", "| row | mode | k | ops per step | per run |", "|---|---|---|---|---|"]
    if not as_json:
        print("\n".join(head[-2:]), flush=True)
    records = ops_records(b, device, (lambda r: print(f"ops: {ops_line(r)}", file=sys.stderr, flush=True)) if as_json
                          else (lambda r: print(ops_line(r), flush=True)))
    if as_json:
        print(json.dumps(records, indent=1))
    out = Path(str(b.ops_out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(head + [ops_line(r) for r in records]) + "\n")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"wrote {out}", file=sys.stderr if as_json else sys.stdout)
    return 0


def main(cfg, flags) -> int:
    from simpnet_cli.runs.planning import pick_device

    global STARTED
    STARTED = time.monotonic()
    b = cfg.bench
    device = pick_device(str(cfg.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if b.get("ops"):
        return ops_main(cfg, flags, device)
    lines = ["# Benchmarks", "", f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on "
             f"**{run_state.device_name(device)}**, torch {torch.__version__}, by `simpnet bench` (batch {b.batch_size}, "
             f"{b.iters} timed iterations after {b.warmup} warm-up ones, synthetic data of the dataset's shape).", ""]
    if device.type != "cuda":
        lines += ["> CPU figures: they check that the benchmark runs, not the GPU targets of the speed issue.", ""]
    else:
        lines += [f"'fp32' modes compute as **{solvers.effective_precision('fp32', device)}** (PyTorch's defaults).", ""]
    if b.rows:
        lines += speed_lines(b, device)
        if device.type == "cuda" and any(int(p) > 1 for p in b.pack):
            lines += ["", f"Packed runs: all their images over the span from the first process's start to the last "
                          f"one's end. NVIDIA MPS: **{mps_status()}** (README: packing runs on one GPU)."]
    if b.get("stack"):
        lines += stack_lines(b, device)
    if b.s1:
        lines += s1_lines(b, device)
    if b.grouped.rows:
        lines += grouped_lines(b.grouped, device)
    if b.precision.rows:
        lines += precision_lines(b.precision, device, Path(cfg.data_dir))
    out = Path(b.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"wrote {out} ({time.monotonic() - STARTED:.0f} s)")
    return 0


