"""How a long command is laid out on the machine: which jobs start first, how many share a GPU, which jobs a
cluster shard takes.

* Longest first: a job's cost is its runs' iterations x batch x multiply-adds per image (from the network's layer
  table: each layer's parameters x its output's height x width), so on many GPUs the long tail (the 5M and 8.9M
  rows: 14-17 h each for the authors) starts at once instead of after the small rows, and the last device to
  finish finishes soon after the others.
* ``jobs_per_device=auto``: jobs per GPU by a measured rule (``jobs_for``), from a short probe of the plan's
  heaviest network on the first GPU (in a process of its own, so the parent holds no CUDA memory afterwards);
  1 on the CPU.
* ``shard=I shards=N``: the I-th of N interleaved slices of the longest-first job list, so ``simpnet run -m
  ... shards=N 'shard=range(0,N)' hydra/launcher=submitit_slurm`` is one cluster job per slice (per job when N is
  the number of jobs), every job writing into the same runs_dir and results_dir as one box would.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

from simpnet_cli.config import tables
from simpnet_cli.errors import UserError
from simpnet_cli.nets import specs as network

AUTO_PACK_MOST = 4  # jobs_per_device=auto packs at most this many processes on one GPU
MEMORY_SHARE = 0.9  # of the GPU's free memory the packed runs may plan to take together


def macs_per_image(run: tables.RunSpec) -> int:
    """Multiply-adds of one image's forward pass, near enough to order jobs: each layer's parameters times the
    height x width of its output (a convolution's weights are applied at every output position)."""
    return sum(params * shape.h * shape.w for _, shape, params in network.layer_table(run.spec, run.in_shape))


def job_cost(group: list[tables.RunSpec]) -> float:
    """The work of one job (a run, or a stacked group of runs): iterations x batch x multiply-adds per image."""
    return sum(float(r.train["iterations"]) * int(r.train.get("batch_size", 100)) * macs_per_image(r) for r in group)


def longest_first(jobs: list[tuple[list[tables.RunSpec], str]]) -> list[tuple[list[tables.RunSpec], str]]:
    """The jobs in order of decreasing cost (ties keep their plan order): the longest start first on every
    device, so the command ends when its longest job does, not a long job after the small ones."""
    costs = {id(group): job_cost(group) for group, _ in jobs}
    return sorted(jobs, key=lambda job: -costs[id(job[0])])


def shard_of(jobs: list, shard: int | None, shards: int | None) -> list:
    """The ``shard``-th of ``shards`` interleaved slices of ``jobs`` (already longest first: each slice gets its
    share of long and short jobs); all of them when no shard is asked for."""
    if shard is None and shards is None:
        return jobs
    if shard is None or shards is None:
        raise UserError("shard= and shards= go together: shards=N 'shard=range(0,N)' (one job per slice)")
    if not 0 <= shard < shards:
        raise UserError(f"shard={shard}: give a shard from 0 to shards-1 ({shards - 1})")
    return jobs[shard::shards]


@dataclass(frozen=True)
class PackProbe:
    """What ``jobs_for`` decides from, measured on one GPU: its free memory, the memory one run takes (peak
    allocated by a few training steps of the network, plus the CUDA context of a process), and the time of one
    step at the run's batch and at 4 x that batch."""
    device: str
    free_bytes: int
    run_bytes: int
    step_s: float
    step_4x_s: float


def jobs_for(probe: PackProbe, most: int = AUTO_PACK_MOST) -> tuple[int, str]:
    """Processes to pack on one GPU, and why. Packed processes use the GPU at most as well as one process with
    their batches together does (with NVIDIA MPS; time-sliced without it, less): so as many as one step at 4x the
    batch holds steps at 1x in the time of 4 (``4 * step_s / step_4x_s``: 4 when the network leaves the GPU idle,
    1 when it already fills it), no more than fit in memory, and at most ``most``."""
    by_compute = int(4 * probe.step_s / probe.step_4x_s) if probe.step_4x_s > 0 else most
    by_memory = int(MEMORY_SHARE * probe.free_bytes // max(probe.run_bytes, 1))
    jobs = max(1, min(most, by_compute, by_memory))
    why = (f"{jobs} per GPU: a step at 4x the batch takes {probe.step_4x_s / probe.step_s:.2f}x one step "
           f"(compute fits {by_compute}), one run takes {probe.run_bytes / 2**20:,.0f} MiB of "
           f"{probe.free_bytes / 2**20:,.0f} MiB free (memory fits {by_memory}), at most {most}")
    return jobs, why


CONTEXT_BYTES = 600 * 2**20  # a CUDA context and its kernels' code, per process (not counted by the allocator)


def probe(run: tables.RunSpec, device: str, steps: int = 10) -> PackProbe:
    """PackProbe of ``run``'s network on ``device`` (a GPU): a few eager steps at its batch and at 4x it."""
    import dataclasses

    import torch

    from simpnet_cli.train import loop as train

    dev = torch.device(device)
    torch.cuda.set_device(dev)
    torch.backends.cudnn.benchmark = True
    batch = int(run.train["batch_size"])

    def step_time(b: int) -> float:
        r = dataclasses.replace(run, train={**run.train, "batch_size": b, "graphs": False},
                                dataset={**run.dataset, "source": "synthetic", "train_size": b * (steps + 4),
                                         "test_size": b})
        state = train.build(r, Path("."), dev, Path("."), False, lambda msg: None, None)
        lr = train.lr_at(r.solver, 0)
        for i in range(3):
            state.step(i, lr)
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for i in range(3, 3 + steps):
            state.step(i, lr)
        torch.cuda.synchronize(dev)
        return (time.perf_counter() - t0) / steps

    torch.cuda.reset_peak_memory_stats(dev)
    one = step_time(batch)
    run_bytes = torch.cuda.max_memory_reserved(dev) + CONTEXT_BYTES
    four = step_time(4 * batch)
    free, _ = torch.cuda.mem_get_info(dev)
    return PackProbe(device, int(free), int(run_bytes), one, four)


def heaviest(runs: list[tables.RunSpec]) -> tables.RunSpec:
    """The run whose step needs the most memory and compute: batch x multiply-adds per image."""
    return max(runs, key=lambda r: int(r.train.get("batch_size", 100)) * macs_per_image(r))


def auto_jobs(runs: list[tables.RunSpec], device: str, say, measure=None) -> int:
    """``jobs_per_device=auto``: 1 on the CPU; on a GPU ``jobs_for`` a probe of the heaviest network, run in a
    process of its own (``measure`` stands in for it in tests)."""
    if not runs or not device.startswith("cuda"):
        return 1
    run = heaviest(runs)
    if measure is None:
        with mp.get_context("spawn").Pool(1) as pool:
            found = pool.apply(probe, (run, device))
    else:
        found = measure(run, device)
    jobs, why = jobs_for(found)
    say(f"jobs_per_device=auto: {why} (measured on table {run.table}, row {run.row_id}, the heaviest network)")
    return jobs


def mps_note(jobs: int, device: str, status=None) -> str | None:
    """The one line said when more than one process shares a GPU without NVIDIA MPS (they then take turns on the
    GPU instead of sharing its SMs: packing gains less than the bench's MPS figures)."""
    if jobs <= 1 or not device.startswith("cuda"):
        return None
    if status is None:
        status = mps_status()
    if status != "off":
        return None
    return (f"{jobs} processes per GPU without NVIDIA MPS: they time-slice each GPU; `nvidia-cuda-mps-control -d` "
            f"before the command lets them share it (README: packing runs on one GPU)")


def mps_status(proc: Path = Path("/proc"), pipe_dir: str | None = None) -> str:
    """Whether NVIDIA's Multi-Process Service is on (packed processes then share the GPU's SMs instead of
    time-slicing it): its daemon runs here, or its control pipe exists."""
    for comm in proc.glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name.startswith("nvidia-cuda-mps"):  # nvidia-cuda-mps-control / -server, cut to 15 characters
            return f"on ({name} runs)"
    pipe = Path(pipe_dir or os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps") / "control"
    if pipe.exists():
        return f"on (control pipe {pipe})"
    return "off"
