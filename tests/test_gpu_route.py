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

    assert authors.authors_runs(), "authors_runs.csv: neither the package's copy nor ../shared/reference"
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
    assert cells[6:8] == ["2,341", "0.375"] and cells[8] == f"{ours / 2341:.2f}x"
    assert authors.beside("2", "Arch1, 8 layers", ours).endswith(cells[8])


def test_bench_writes_no_tracked_file_and_shows_progress_from_the_start(tmp_path, capsys):
    from simpnet_cli.cli import compose
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
    from simpnet_cli.cli import compose
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
    assert bench.packed_rate([(1000, 0.0, 10.0, "cuda-graph"), (1000, 5.0, 15.0, "eager")]) == pytest.approx(2000 / 15)
