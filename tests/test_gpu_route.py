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
