"""The route to the first GPU figures (issue 26): set-up on a machine as it comes, the reproduction's plan, the
authors' speed beside ours. Everything here is planning or set-up, proven on the CPU."""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from simpnet_cli.tools import gpusetup

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- item 1: set-up on a box as it comes

def stand_in_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of ``name`` made by hand (no network, no build tools): a module that imports."""
    files = {f"{name}.py": "STAND_IN = True\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record + [f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture
def venv_python_without_tabulate(tmp_path) -> Path:
    """A GPU box's ``python3`` as it often comes: itself a venv, importing torch (this test's own site-packages,
    seen through a .pth file) and lacking one dependency of the project (tabulate)."""
    import torch

    seen = tmp_path / "machine-site"
    seen.mkdir()
    torch_site = Path(torch.__file__).parents[1]  # the folder of this test's torch and, beside it, the rest
    for entry in torch_site.iterdir():
        if not entry.name.lower().startswith(("tabulate", "simpnet", "__editable__", "_main_env",
                                              gpusetup.PARENT_PTH)):
            (seen / entry.name).symlink_to(entry)
    machine = tmp_path / "machine-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(machine)], check=True)
    purelib = subprocess.run([str(machine / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "machine.pth").write_text(f"import site; site.addsitedir({str(seen)!r})\n")
    python = machine / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch, hydra\ntry:\n import tabulate\nexcept ImportError:\n"
                            " print('no tabulate')"], capture_output=True, text=True)
    assert probe.stdout.strip() == "no tabulate", probe.stderr[-500:]
    return python


def setup(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL")}
    return subprocess.run([str(python), "-m", "simpnet_cli.tools.gpusetup", *args], cwd=REPO, capture_output=True,
                          text=True, env={**env, "PIP_CONFIG_FILE": os.devnull}, timeout=300)


@pytest.mark.slow
def test_gpu_check_set_up_with_a_venv_python_sees_its_torch_and_installs_only_what_is_missing(
        tmp_path, venv_python_without_tabulate):
    """Before issue 26 the set-up made `.venv-gpu --system-site-packages`, which sees the base interpreter's
    packages, not the venv's: `import torch` failed there. Offline (WHEELS=DIR), only tabulate is installed."""
    wheels = tmp_path / "wheels"
    stand_in_wheel(wheels, "tabulate", "0.9.0")
    venv = tmp_path / "venv-gpu"
    proc = setup(venv_python_without_tabulate, "--wheels", str(wheels), "--venv", str(venv), "--setup-only")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "(venv) lacks tabulate>=0.9" in proc.stdout and "torch" not in proc.stdout.split("lacks")[1].split("\n")[0]
    got = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import torch, hydra, omegaconf, tabulate; print(tabulate.STAND_IN, tabulate.__file__, "
                          "torch.__file__)"], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-1000:]
    stand_in, tabulate_at, torch_at = got.stdout.split()
    assert stand_in == "True" and tabulate_at.startswith(str(venv))  # installed into the venv, from WHEELS
    assert not torch_at.startswith(str(venv))  # the machine's torch, not a second copy


@pytest.mark.slow
def test_make_install_uses_the_present_torch_offline(tmp_path, venv_python_without_tabulate):
    """`make install`'s step: a .venv that sees the machine's torch, the project editable in it, offline."""
    wheels = tmp_path / "wheels"
    stand_in_wheel(wheels, "tabulate", "0.9.0")
    venv = tmp_path / "venv"
    proc = setup(venv_python_without_tabulate, "--wheels", str(wheels), "--venv", str(venv), "--project", "")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "running the check" not in proc.stdout
    got = subprocess.run([str(venv / "bin" / "simpnet"), "list", "table=2"], capture_output=True, text=True)
    assert got.returncode == 0 and "8L" in got.stdout, got.stderr[-1000:]
    assert not list(venv.glob("lib/python*/site-packages/torch"))  # no torch downloaded into it


def test_a_bare_cpu_machine_gets_the_cpu_build_of_torch(tmp_path):
    cpu = gpusetup.plan(["torch>=2.4", "tabulate>=0.9"], None, None, tmp_path / "v", gpu=False)
    assert cpu.torch_args == ["--index-url", gpusetup.CPU_TORCH_INDEX] and "CPU build" in cpu.notes[0]
    gpu = gpusetup.plan(["torch>=2.4"], None, None, tmp_path / "v", gpu=True)
    assert gpu.torch_args == []  # a machine with a driver: pip's default (CUDA) build
    offline = gpusetup.plan(["torch>=2.4"], None, tmp_path / "w", tmp_path / "v", gpu=False)
    assert offline.torch_args == []  # WHEELS holds whichever torch it holds
    assert gpusetup.has_nvidia_driver(tmp_path / "absent", which=lambda name: None) is False
    assert gpusetup.has_nvidia_driver(tmp_path, which=lambda name: None) is True
    # make install always gets a venv (the project goes into it), seeing the machine's torch when there is one
    always = gpusetup.plan([], "2.14.1", None, tmp_path / "v", parent_sites=["/x/site-packages"], always_venv=True)
    assert always.make_venv and always.parent_sites == ["/x/site-packages"] and always.install == []


# --------------------------------------------------------------------------- item 4: the authors' speed as the baseline

def test_authors_speed_is_read_from_the_reference_and_chooses_the_reported_run():
    from simpnet_cli.runs import authors

    assert not authors.authors_runs().empty, "authors_runs.csv: the package's copy is missing"
    eight = authors.authors_speed("2", "Arch1, 8 layers")
    assert eight.img_per_s == pytest.approx(2341) and eight.hours == pytest.approx(0.375)
    five = authors.authors_speed("12", "SimpNet 5.48M, CIFAR-10")
    assert five.img_per_s == pytest.approx(522.3) and five.hours == pytest.approx(14.731)
    assert authors.authors_speed("2", "no such row") is None
    assert authors.beside("2", "Arch1, 8 layers", 4682) == "2,341 | 0.375 | 2.00x"
    assert authors.beside("2", "Arch1, 8 layers", None, 0.75) == "2,341 | 0.375 | 0.50x"  # by hours
    assert authors.beside("2", "no such row", 100) == "- | - | -"


def test_dry_run_puts_the_authors_speed_beside_each_row(tmp_path, capsys):
    from simpnet_cli.cli import main
    from simpnet_cli.runs import authors

    code = main(["run", "table=2", "row=8L", "profile=smoke", "--dry-run", "quiet=true", "dry_run.iters=1",
                 "dry_run.batch_size=2", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/e"])
    assert code == 0
    out = capsys.readouterr().out
    (line,) = [row for row in out.splitlines() if row.startswith("| 2 | 8L |")]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    ours = float(cells[5].replace(",", ""))
    # (the ratio is of the unrounded estimate; the cell shows it rounded to whole images/s)
    assert cells[6:8] == ["2,341", "0.375"] and float(cells[8].rstrip("x")) == pytest.approx(ours / 2341, abs=0.011)
    assert authors.beside("2", "Arch1, 8 layers", ours).endswith(cells[8])


def test_bench_writes_no_tracked_file_and_shows_progress_from_the_start(tmp_path, capsys):
    from simpnet_cli.commands import compose
    from simpnet_cli.tools import gpucheck

    cfg, _ = compose([])
    out = str(cfg.bench.out)
    assert out.startswith("results/")
    ignored = subprocess.run(["git", "check-ignore", "-q", out], cwd=REPO)
    assert ignored.returncode == 0, f"bench.out={out} is not git-ignored: a bench would rewrite a tracked file"
    assert subprocess.run(["git", "check-ignore", "-q", str(gpucheck.OUT)], cwd=REPO).returncode == 0
    from simpnet_cli.cli import main

    code = main(["bench", "bench.rows=[]", "bench.s1=false", "bench.stack=[]", "bench.grouped.rows=[]",
                 f"bench.out={tmp_path}/b.md", "device=cpu"])
    assert code == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("bench: starting; figures go to")


def test_gpu_check_benches_only_what_decides():
    """Issue 26: stack [1,3] (not [1,2,3,4]), the grouped-conv probe on 8L and 5M-C10 only, no Table S1."""
    from simpnet_cli.commands import compose
    from simpnet_cli.config import tables
    from simpnet_cli.tools import gpucheck

    cfg, _ = compose(gpucheck.BENCH_ARGS)
    b = tables.to_plain(cfg.bench)
    assert b["stack"] == [1, 3] and b["grouped"]["rows"] == ["2/8L", "12/5M-C10"] and b["s1"] is False
    assert b["rows"] == ["2/8L", "12/5M-C10"] and b["precision"]["rows"] == []
    assert gpucheck.BUDGET_S == 300


def test_a_runner_figure_that_fell_back_to_eager_is_labelled_so():
    from simpnet_cli.tools import bench

    assert bench.mode_label("runner fp32", "cuda-graph") == "runner fp32"
    assert "FELL BACK TO EAGER" in bench.mode_label("runner bf16", "eager (capture failed: RuntimeError: x)")
    assert bench.mode_label("eager fp32", "eager") == "eager fp32"
    assert "FELL BACK" in bench.mode_label("runner fp32", "cuda-graph / eager (capture failed: X)")  # one of 4 packed
    assert bench.packed_rate([(1000, 0.0, 10.0, "cuda-graph"), (1000, 5.0, 15.0, "eager")]) == pytest.approx(2000 / 15)


# --------------------------------------------------------------------------- item 2: the default reproduction

import json  # noqa: E402
import shlex  # noqa: E402

import torch  # noqa: E402

from simpnet_cli.runs import planning, runner, schedule  # noqa: E402


def make_line(target: str, *variables: str) -> list[str]:
    """The `simpnet run` line a make target runs (make -n: nothing is executed), as argv after `simpnet`."""
    out = subprocess.run(["make", "-n", "-s", target, *variables], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    (line,) = [ln for ln in out.splitlines() if "simpnet run" in ln or "/simpnet run" in ln]
    return shlex.split(line)[1:]


def test_reproduce_all_trains_three_seeds_packs_as_measured_and_starts_the_longest_jobs_first():
    from simpnet_cli.commands import compose, options, plan_runs

    args = make_line("reproduce-all")
    assert args[0] == "run" and "seeds=3" in args and "jobs_per_device=auto" in args and "table=all" in args
    assert not any(a.startswith("precision=") for a in args)  # TF32 (the profile's fp32) by default
    cfg, variant = compose([a for a in args[1:] if a != "download=true"])
    runs, opts = plan_runs(cfg, variant), options(cfg)
    assert opts.jobs_per_device == "auto" and opts.stack == "auto"
    by_row: dict = {}
    for run in runs:
        by_row.setdefault((run.table, run.row_id), set()).add(run.seed)
    assert set(map(frozenset, by_row.values())) == {frozenset({0, 1, 2})}
    # on a GPU a job is up to 4 runs of one network (a row's seeds; rows that differ only in rate), stack=auto
    # deciding in the worker; planned here with a device name only. Each distinct run once (execute's twins).
    first = list({run.config_hash: run for run in reversed(runs)}.values())[::-1]
    jobs = planning.plan_groups(first, opts, torch.device("cuda"), defer=True)
    assert sorted(r.config_hash for g, _ in jobs for r in g) == sorted(r.config_hash for r in first)
    assert all(how == ("auto" if len(g) > 1 else "separate") and len(g) <= planning.AUTO_MOST for g, how in jobs)
    ordered = schedule.longest_first(jobs)
    costs = [schedule.job_cost(g) for g, _ in ordered]
    assert costs == sorted(costs, reverse=True)
    first_rows = {(g[0].table, g[0].row_id) for g, _ in ordered[:2]}
    assert first_rows == {("12", "9M-C10"), ("12", "9M-C100")}  # the authors' longest runs (~17 h each)
    assert ordered[-1][0][0].table in ("5", "2", "3")  # small 300K-class nets last


def test_jobs_per_device_auto_follows_the_measured_rule():
    GiB = 2**30
    idle = schedule.PackProbe("cuda:0", free_bytes=80 * GiB, run_bytes=2 * GiB, step_s=0.004, step_4x_s=0.004)
    assert schedule.jobs_for(idle)[0] == 4  # a launch-bound net: 4x the batch costs no more time
    full = schedule.PackProbe("cuda:0", free_bytes=80 * GiB, run_bytes=2 * GiB, step_s=0.1, step_4x_s=0.4)
    assert schedule.jobs_for(full)[0] == 1  # a net that fills the GPU: packing gains nothing
    half = schedule.PackProbe("cuda:0", free_bytes=80 * GiB, run_bytes=2 * GiB, step_s=0.01, step_4x_s=0.02)
    assert schedule.jobs_for(half)[0] == 2
    tight = schedule.PackProbe("cuda:0", free_bytes=8 * GiB, run_bytes=3 * GiB, step_s=0.004, step_4x_s=0.004)
    jobs, why = schedule.jobs_for(tight)
    assert jobs == 2 and "memory fits 2" in why  # 0.9 x 8 GiB holds two runs of 3 GiB
    # measured on the heaviest network of the plan; the CPU packs nothing and measures nothing
    from simpnet_cli.commands import compose, plan_runs

    cfg, variant = compose(["table=[2,12]"])
    runs = plan_runs(cfg, variant)
    probed, said = [], []
    assert schedule.auto_jobs(runs, "cuda:0", said.append,
                              measure=lambda run, dev: probed.append(run.row_id) or half) == 2
    assert probed == ["9M-C10"] and "jobs_per_device=auto: 2 per GPU" in said[0]
    assert schedule.auto_jobs(runs, "cpu", said.append, measure=lambda *a: pytest.fail("measured on the CPU")) == 1


def test_packing_without_mps_is_said_once_and_only_then():
    assert "without NVIDIA MPS" in schedule.mps_note(4, "cuda:0", status="off")
    assert schedule.mps_note(4, "cuda:0", status="on (nvidia-cuda-mps runs)") is None
    assert schedule.mps_note(1, "cuda:0", status="off") is None and schedule.mps_note(2, "cpu", status="off") is None


def fake_windows(rates: dict, modes: dict, calls: list):
    """A stand-in for together.time_steps: rates[how] is a list, one img/s per window, in call order."""
    def timer(run, device, how, k, iters, warmup, seen=None):
        calls.append(how)
        if seen is not None:
            seen.append(modes.get(how, "cuda-graph"))
        return rates[how][sum(1 for c in calls if c == how) - 1]
    return timer


def test_stack_auto_takes_the_median_of_rotated_windows_and_never_an_eager_fallback():
    from tests.test_stacked import family_plan

    runs, gpu = family_plan("plain"), torch.device("cuda")
    n = planning.AUTO_WINDOWS
    # one window of grouped is hit by a clock boost: the median ignores it
    spiky = {"separate": [1000.0] * n, "grouped": [5000.0] + [900.0] * (n - 1), "branched": [1100.0] * n}
    calls: list = []
    found = planning.measure_ways(runs[0], gpu, 3, fake_windows(spiky, {}, calls))
    assert found["fastest"] == "branched" and found["windows"] == n
    firsts = [calls[3 * w] for w in range(n)]
    assert firsts[:3] == ["separate", "grouped", "branched"]  # the way that runs first rotates
    # the fastest way fell back to eager: not chosen
    fell = {"separate": [1000.0] * n, "grouped": [3000.0] * n, "branched": [2000.0] * n}
    found = planning.measure_ways(runs[0], gpu, 3, fake_windows(fell, {"grouped": "eager (capture failed: X)"}, []))
    assert found["fastest"] == "branched" and found["fell_back"] == ["grouped"]


def test_stack_auto_is_decided_in_the_worker_on_its_own_device(tmp_path, monkeypatch):
    """execute plans stack=auto jobs as "auto" (nothing measured in the parent); each worker measures on its own
    device, and the choices of several devices are merged into one stack_choices.json."""
    from simpnet_cli.train import state as run_state
    from tests.test_stacked import family_plan, options

    runs = family_plan("plain")
    opts = options(tmp_path, stack="auto")
    never = fake_windows({}, {}, [])
    jobs = planning.plan_groups(runs, opts, torch.device("cuda"), timer=never, defer=True)
    assert jobs == [(runs, "auto")] and not (tmp_path / "runs" / planning.STACK_CHOICES).exists()
    (tmp_path / "runs").mkdir()
    n = planning.AUTO_WINDOWS
    for name, rates, expected in (("GPU-A", {"separate": [1.0] * n, "grouped": [9.0] * n, "branched": [2.0] * n},
                                   [([r.in_step("grouped 3") for r in runs], "grouped")]),
                                  ("GPU-B", {"separate": [9.0] * n, "grouped": [1.0] * n, "branched": [2.0] * n},
                                   [([r], "separate") for r in runs])):
        monkeypatch.setattr(run_state, "device_name", lambda device, name=name: name)
        assert planning.decide_in_worker(runs, opts, torch.device("cuda"), fake_windows(rates, {}, [])) == expected
    kept = json.loads((tmp_path / "runs" / planning.STACK_CHOICES).read_text())
    assert sorted(k.split(" | ")[0] for k in kept) == ["GPU-A", "GPU-B"]


def test_shards_split_the_longest_first_jobs_between_cluster_jobs():
    jobs = list(range(7))
    assert [schedule.shard_of(jobs, i, 3) for i in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert schedule.shard_of(jobs, None, None) == jobs
    from simpnet_cli.errors import UserError

    with pytest.raises(UserError, match="shard= and shards= go together"):
        schedule.shard_of(jobs, 1, None)
    with pytest.raises(UserError, match="shard=3"):
        schedule.shard_of(jobs, 3, 3)


@pytest.mark.skipif(__import__("importlib").util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
@pytest.mark.slow
def test_the_cluster_command_runs_every_slice_through_submitit_into_one_index(tmp_path):
    """`make reproduce-slurm`'s command, on submitit's local executor: one job per slice, each training its own
    runs into the same runs_dir and results_dir, one index with every run."""
    from simpnet_cli.runs import results
    from tests.test_variants import TINY_PROFILE, simpnet

    (tmp_path / "tinyconf" / "profile").mkdir(parents=True)
    (tmp_path / "tinyconf" / "profile" / "tiny.yaml").write_text(TINY_PROFILE)
    args = make_line("reproduce-slurm", "TABLES=5", "SEEDS=2", "SHARDS=2", "LAUNCHER=submitit_local",
                     f"RUN_ARGS=row=P5 profile=tiny conf_dir={tmp_path}/tinyconf results_dir={tmp_path}/results "
                     f"runs_dir={tmp_path}/runs hydra.sweep.dir={tmp_path}/sweep")
    assert args[:2] == ["run", "-m"] and "hydra/launcher=submitit_local" in args and "shard=range(0,2)" in args
    proc = simpnet(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows, bad = results.read(tmp_path / "results" / "table5.csv")
    assert not bad and sorted((r["row_id"], r["seed"]) for r in rows) == [("P5", 0), ("P5", 1)]
    logs = sorted((tmp_path / "sweep").glob(".submitit/*/*_log.err"))
    assert len(logs) == 2, "one submitit job per slice"
    trained = [log.read_text().count("run(s): 1 ok;") for log in logs]
    assert trained == [1, 1], [log.read_text()[-500:] for log in logs]


def test_a_shard_trains_its_slice_only_and_a_bad_shard_is_one_line(tmp_path, capsys):
    from simpnet_cli.cli import main
    from tests.test_stacked import family_plan, options

    runs = family_plan("plain")  # three seeds of one tiny network: three jobs on the CPU
    counts = runner.execute(runs, options(tmp_path, stack="auto", shard=0, shards=2))
    assert counts == {"ok": 2}  # jobs 0 and 2 of three
    counts = runner.execute(runs, options(tmp_path, stack="auto", shard=1, shards=2))
    assert counts == {"ok": 1}
    assert main(["run", "table=5", "row=P5", "profile=smoke", "shard=2", "shards=2", f"results_dir={tmp_path}/r",
                 f"runs_dir={tmp_path}/e"]) == 2
    assert capsys.readouterr().err.strip() == "simpnet: error: shard=2: give a shard from 0 to shards-1 (1)"


def test_a_stack_auto_job_whose_runs_are_recorded_measures_nothing(tmp_path, monkeypatch):
    """A resumed reproduce-all: a job of finished runs is skipped without a measurement."""
    from tests.test_stacked import family_plan, options

    runs = family_plan("plain")
    opts = options(tmp_path, stack="auto")
    assert runner.execute(runs, opts) == {"ok": 3}  # on the CPU: separately
    monkeypatch.setattr(runner, "decide_in_worker", lambda *a, **k: pytest.fail("measured recorded runs"))
    outcomes = runner.execute_group(runs, opts, "cpu", auto=True)
    assert [(run.seed, outcome) for run, outcome, _ in outcomes] == [(0, "skipped"), (1, "skipped"), (2, "skipped")]


def test_stack_autos_timed_window_holds_no_epoch_boundary(monkeypatch):
    """together.time_steps gives its synthetic data one batch for every step it runs (warm-up and timed), so
    no reshuffle or wrap falls inside the window stack=auto compares."""
    from simpnet_cli.train import together
    from tests.test_stacked import family_plan

    run = family_plan("plain")[0]
    seen: list = []

    def stop(r, *a, **k):
        seen.append(int(r.dataset["train_size"]))
        raise RuntimeError("recorded")

    monkeypatch.setattr(together.run_state, "build", stop)
    with pytest.raises(RuntimeError, match="recorded"):
        together.time_steps(run, torch.device("cpu"), "separate", 2, 5000, 30)
    batch = int(run.train["batch_size"])
    assert seen and seen[0] >= (5000 + 30 + 1) * batch  # (before: 20 batches, at least 2,000 images)
