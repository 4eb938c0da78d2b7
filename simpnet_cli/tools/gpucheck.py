"""`make gpu-check`: everything about the GPU path that only a GPU can show, in one command of at most 5 minutes.

1. the CPU proofs (tests/test_gpu_path.py) and the GPU test of tests/test_speed_paths.py;
2. a run killed with SIGKILL on the GPU resumes from its checkpoint and finishes (CUDA RNG states, optimizer
   state) in the captured mode;
3. graphed against eager for 30 iterations with an lr change, evaluations and epoch wraps, in fp32 and bf16, on
   2/8L (AdaDelta), 4/WE13 (Nesterov) and 12/5M-C10 (dropout): the first steps tightly, the rest within what
   swapping the convolution backend alone does to the same recipe (measured in the same check);
4. memory reserved stays flat across ten lr changes (a run is captured once);
5. `simpnet bench` for 2/8L and 12/5M-C10, alone and packed 4-way, in the default precision and in bf16; k=1
   and k=3 runs in one step (what stack=auto decides between); the grouped-conv probe on the same two rows.
   Only what decides: the full bench (stack [1,2,3,4], Table S1) is `make bench`.

A check cannot pass by accident: each asserts that the runs it calls graphed really ran as a CUDA graph (a
capture that fell back to eager would compare eager with eager), and the comparisons run on deterministic
kernels. Every function takes the device and the graph backend, so the CPU tests run them with stand-ins
(tests/test_gpu_path.py), including graphs that are broken on purpose.

Figures go to results/bench/gpu-check.md (git-ignored; copy what is worth keeping into results/benchmarks.md) with
the device, torch version and date; each step prints its time as it ends, and the total against the 5-minute
budget. On a machine without CUDA the GPU steps are skipped with their reason, and the CPU proofs still run.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# cuBLAS's deterministic mode needs a fixed workspace, chosen before its first handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from simpnet_cli.train import captured_step  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIMPNET = [sys.executable, "-m", "simpnet_cli.cli"]
OUT = Path("results/bench/gpu-check.md")  # under the repository; git-ignored
BUDGET_S = 300
# The bench of the check: only what decides (the rows stack=auto and packing are about, k=1 against k=3, the
# grouped-conv probe on the smallest and the largest network); 100 timed steps are enough for a rate on a GPU.
BENCH_ARGS = ["bench.rows=[2/8L,12/5M-C10]", "bench.pack=[4]", "bench.s1=false", "bench.stack=[1,3]",
              "bench.grouped.rows=[2/8L,12/5M-C10]", "bench.iters=100", "bench.warmup=20",
              "bench.grouped.iters=20", "bench.grouped.warmup=5"]


def say(line: str) -> None:
    print(line, flush=True)


def cpu_proofs() -> bool:
    tests = ["tests/test_gpu_path.py", "tests/test_speed_paths.py::test_graphed_step_matches_eager_step_on_gpu"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *tests], cwd=REPO)
    return proc.returncode == 0


def sigkill_and_resume(work: Path) -> str:
    """Kill a CUDA run right after its first checkpoint, run the same command again, check it finished."""
    args = [*SIMPNET, "run", "table=2", "row=8L", "profile=smoke", "device=cuda", "profile.train.iterations=300",
            "profile.train.checkpoint_every=100", "profile.train.eval_every=100", "profile.train.batch_size=100",
            "profile.data.train_size=1000", "profile.data.test_size=500", f"results_dir={work}/results",
            f"runs_dir={work}/runs", "quiet=true"]
    proc = subprocess.Popen(args, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((work / "runs").glob("*/checkpoint.pt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("no checkpoint appeared before the run ended; nothing to resume")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    with open(work / "results" / "table2.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "ok" and int(row["iterations"]) == 300, row
    assert row["step_mode"] == "cuda-graph", f"the resumed run ran as {row['step_mode']!r}, not as a CUDA graph"
    return f"resumed and finished: {row['step_mode']}, {row['precision']}, final {row['final_acc']}%"


# The first steps of a graphed run replay the eager step's kernels, chosen alike by deterministic cuDNN, and the
# solvers scale by the lr in the same kernel whether it is a tensor or a number: they agree to float rounding.
TIGHT_STEPS, TIGHT = 3, 1e-5
# Beyond them, a graphed run may drift from eager as far as the same recipe drifts when only its convolution
# backend changes (same math, other kernels: the noise every reproduction of the paper lives with), times a
# margin for how unevenly two trajectories of one chaotic process spread. That noise is not small: one step's
# gradient moves by 0.46% (2/8L), 1.0% (4/WE13) and 2.3% (12/5M-C10) between oneDNN's and torch's own CPU
# convolutions (backend_noise, fp32, batch 100), so a fixed tolerance would be either blind or flaky. A broken
# graph (an update skipped or applied twice) lands orders of magnitude beyond (tests/test_gpu_path.py).
NOISE_MARGIN = 3.0


@contextlib.contextmanager
def deterministic():
    """cuDNN's deterministic kernels without autotuning, and torch's deterministic algorithms: two runs of one
    recipe then pick the same kernels. warn_only: an op with no deterministic version warns instead of
    stopping the check, and the tight comparison shows whether it mattered."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def other_conv_backend(device: torch.device):
    """The same convolutions in other kernels: cuDNN off on a GPU (torch's native ones), oneDNN off on a CPU."""
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=False)
    return torch.backends.mkldnn.flags(enabled=False)


@dataclass
class Trace:
    """One short training of a recipe: the loss of every step, the weights after TIGHT_STEPS steps and at the end."""
    losses: list[float]
    early: dict
    final: dict
    step_mode: str


def trace(run, device: torch.device, graphs: bool, steps: int, eval_every: int,
          backend: captured_step.GraphBackend | None = None) -> Trace:
    """``steps`` steps of ``run`` as train_run builds it, with its schedule, evaluations between the steps and
    the data's own epoch wraps; the loss read after every step."""
    from simpnet_cli.train import solvers, state as run_state

    run = dataclasses.replace(run, train={**run.train, "graphs": graphs})
    state = run_state.build(run, Path("."), device, Path("."), False, lambda msg: None, backend)
    losses, early = [], {}
    for it in range(steps):
        state.step.reset_loss()
        state.step(it, solvers.lr_at(run.solver, it))
        losses.append(state.step.loss_sum.item())
        if it + 1 == TIGHT_STEPS:
            early = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        if (it + 1) % eval_every == 0:
            run_state.evaluate(state.model, state.data, state.autocast)
    final = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    return Trace(losses, early, final, state.step.step_mode)


def _weights_apart(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all floating-point entries of two state dicts as one vector. Not per tensor: a
    conv bias before BatchNorm gets a gradient of rounding noise only, so its own relative distance is noise."""
    keys = [k for k in b if b[k].is_floating_point()]
    va, vb = (torch.cat([d[k].double().flatten().cpu() for k in keys]) for d in (a, b))
    return ((va - vb).norm() / vb.norm().clamp_min(1e-12)).item()


def _losses_apart(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b)), default=0.0)


def judge(graphed: Trace, eager: Trace, noise: Trace) -> str:
    """Pass or raise AssertionError: the graphed run really ran as a graph; its first steps equal eager's to
    TIGHT; over the whole horizon it is no further from eager than the other-backend run is, times NOISE_MARGIN."""
    assert graphed.step_mode == "cuda-graph", (
        f"the graphed run ran as {graphed.step_mode!r}: comparing it with eager would compare eager with eager")
    assert eager.step_mode == "eager" and noise.step_mode == "eager", (eager.step_mode, noise.step_mode)
    n = TIGHT_STEPS
    tight = max(_losses_apart(graphed.losses[:n], eager.losses[:n]), _weights_apart(graphed.early, eager.early))
    assert tight <= TIGHT, f"the first {n} steps differ from eager by {tight:.2e} (limit {TIGHT:.0e})"
    assert all(math.isfinite(x) for x in graphed.losses), graphed.losses
    far = max(_losses_apart(graphed.losses, eager.losses), _weights_apart(graphed.final, eager.final))
    backend = max(_losses_apart(noise.losses, eager.losses), _weights_apart(noise.final, eager.final))
    limit = max(NOISE_MARGIN * backend, TIGHT)
    assert far <= limit, (f"after {len(eager.losses)} steps the graphed run is {far:.2e} from eager, beyond "
                          f"{NOISE_MARGIN:g} x the {backend:.2e} that another convolution backend gives")
    return (f"first {n} steps within {tight:.1e}; {len(eager.losses)} steps within {far:.1e} "
            f"(another conv backend: {backend:.1e}, limit {limit:.1e})")


def graphed_vs_eager(run, device: torch.device, backend: captured_step.GraphBackend | None = None,
                     steps: int = 30, eval_every: int = 10) -> str:
    """Graphed, eager, and eager on the other convolution backend, all on deterministic kernels; judged."""
    with deterministic():
        graphed = trace(run, device, True, steps, eval_every, backend)
        eager = trace(run, device, False, steps, eval_every)
        with other_conv_backend(device):
            noise = trace(run, device, False, steps, eval_every)
    return judge(graphed, eager, noise)


def check_run(ref: str, precision: str, batch: int = 100, train_size: int = 1000, lr_drop: int = 15):
    """A table row with the lr dropping tenfold at ``lr_drop`` on synthetic data (1,000 images: an epoch every
    10 steps at batch 100)."""
    from simpnet_cli.config import compose as composition, tables

    table, _, row = ref.partition("/")
    t = tables.load_table(table)
    over = composition.overrides_of(["solver.schedule.kind=multistep", "solver.schedule.gamma=0.1",
                                                     f"solver.schedule.steps=[{lr_drop}]"])
    profile = {"train": {"batch_size": batch, "precision": precision},
               "data": {"source": "synthetic", "train_size": train_size, "test_size": batch}}
    return tables.resolve(t, t.row(row), 0, profile, overrides=over)


def backend_noise(run, device: torch.device) -> float:
    """How far the gradients of one step (same weights, same batch) move when only the convolution backend
    changes: the relative distance of the whole gradient vector. The scale of what a faithful GPU path may
    differ by from eager."""
    from simpnet_cli.train import state as run_state

    grads = []
    for other in (False, True):
        with other_conv_backend(device) if other else contextlib.nullcontext():
            state = run_state.build(dataclasses.replace(run, train={**run.train, "graphs": False}), Path("."), device,
                                Path("."), False, lambda msg: None, None)
            x, y = state.data.batch(0)
            with state.autocast():
                loss = torch.nn.functional.cross_entropy(state.model(x).float(), y)
            loss.backward()
            grads.append(torch.cat([p.grad.double().flatten() for p in state.model.parameters()]))
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def memory_across_lr_changes(run, device: torch.device, backend: captured_step.GraphBackend | None = None,
                             reserved=None) -> str:
    """Eleven steps at a new lr each: one capture, replays after it, and memory reserved flat."""
    from simpnet_cli.train import state as run_state

    reserved = reserved or torch.cuda.memory_reserved
    captures = []
    api = backend or captured_step.CUDA
    counting = dataclasses.replace(api, capture=lambda *a: (captures.append(1), api.capture(*a)))
    state = run_state.build(dataclasses.replace(run, train={**run.train, "graphs": True}), Path("."), device,
                        Path("."), False, lambda msg: None, counting)
    seen = []
    for i in range(11):
        state.step(i, 0.1 / (i + 1))  # a new lr every iteration
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seen.append(reserved(device))
    assert state.step.step_mode == "cuda-graph", f"the run ran as {state.step.step_mode!r}, not as a CUDA graph"
    assert len(captures) == 1, f"{len(captures)} captures for 11 steps at 11 rates (one expected)"
    growth = seen[-1] - seen[1]
    assert growth <= 64 * 2**20, [r // 2**20 for r in seen]
    return (f"one capture for 11 rates; reserved {seen[1] / 2**20:.0f} MiB after the capture, "
            f"{seen[-1] / 2**20:.0f} MiB after ten lr changes")


def timed(name: str, check) -> tuple[bool, str]:
    """Run one check; its line says how long it took, and a failure is reported, not raised."""
    t0 = time.monotonic()
    try:
        ok, result = True, check()
    except Exception as err:  # noqa: BLE001 - report every check, then fail
        ok, result = False, f"FAILED: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
    line = f"| {name} | {result} | {time.monotonic() - t0:.0f} s |"
    say(line)
    return ok, line


def main() -> int:
    from simpnet_cli.train import state as run_state

    say(f"# gpu-check: torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    t_start = t0 = time.monotonic()
    ok = cpu_proofs()
    say(f"CPU proofs (stand-in graphs, host-sync check): {'passed' if ok else 'FAILED'} "
        f"({time.monotonic() - t0:.0f} s)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    noise_ok, noise = timed(f"backend noise on {run_state.device_name(device)}: gradient of one step of 2/8L, "
                            f"other conv backend", lambda: f"{backend_noise(check_run('2/8L', 'fp32'), device):.2%}")
    ok = ok and noise_ok
    if not cuda:
        say("skipped: SIGKILL-and-resume on CUDA, graphed-vs-eager, memory across lr changes, bench "
            "(no CUDA device on this machine)")
        return 0 if ok else 1
    lines = ["", f"## gpu-check on {run_state.device_name(device)}, torch {torch.__version__}, "
                 f"{datetime.now(timezone.utc):%Y-%m-%d}", "", "| check | result | time |", "|---|---|---|", noise]
    checks = [("SIGKILL and resume on CUDA", sigkill_and_resume)]
    for ref in ("2/8L", "4/WE13", "12/5M-C10"):
        for precision in ("fp32", "bf16"):
            checks.append((f"graphed vs eager, {ref}, {precision}",
                           lambda w, r=ref, p=precision: graphed_vs_eager(check_run(r, p), device)))
    checks.append(("memory across ten lr changes",
                   lambda w: memory_across_lr_changes(check_run("2/8L", "fp32"), device)))
    for name, check in checks:
        with tempfile.TemporaryDirectory() as work:
            passed, line = timed(name, lambda: check(Path(work)))
        ok = ok and passed
        lines.append(line)
    t0 = time.monotonic()
    bench = subprocess.run([*SIMPNET, "bench", *BENCH_ARGS, f"bench.out={OUT}"], cwd=REPO)
    say(f"bench: exit {bench.returncode} ({time.monotonic() - t0:.0f} s)")
    ok = ok and bench.returncode == 0
    (REPO / OUT).parent.mkdir(parents=True, exist_ok=True)
    with open(REPO / OUT, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    total = time.monotonic() - t_start
    say(f"wrote {OUT}; gpu-check took {total:.0f} s ({'within' if total <= BUDGET_S else 'OVER'} its "
        f"{BUDGET_S // 60}-minute budget)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
