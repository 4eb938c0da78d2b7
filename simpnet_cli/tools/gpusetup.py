"""The set-up of `make install` and `make gpu-check`: the machine's own torch, and only what is missing beside it.

A GPU machine lent for the check has a CUDA torch and nothing of ours; installing torch again would take minutes,
need the network, and could replace the machine's CUDA build with another. Often its ``python3`` is itself a venv
or a conda env: a venv made from it with ``--system-site-packages`` sees the *base* interpreter's packages, not
that env's, and ``import torch`` fails there. So the rule, for both commands:

1. gpu-check: if this Python already imports every requirement (pyproject's dependencies and pytest), the check
   runs with it, nothing installed;
2. else a venv (``.venv-gpu``; ``.venv`` for ``make install``) that sees *this interpreter's* site-packages,
   whatever it is (system, venv or conda): a ``.pth`` file in the venv adds them with ``site.addsitedir``. The
   machine's environment is never written to. pip, run in that venv, counts what it sees as installed, so it
   installs only what is missing (torch pinned to the version already there); ``--wheels DIR`` installs from a
   folder of wheels with no index (offline machines);
3. no torch at all (``make install`` on a bare machine): on a machine without an NVIDIA driver the CPU build is
   installed (``--torch-index``, default PyTorch's CPU wheel index), not the multi-GB CUDA one;
4. gpu-check then runs ``python -m simpnet_cli.tools.gpucheck`` from the repository (the package is not installed:
   run from its folder, it imports as it is); ``make install`` installs the project itself, editable, instead.

Each step prints its time. Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import re
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-gpu"
PARENT_PTH = "_simpnet_parent_env.pth"  # in the venv's site-packages: the interpreter's own site-packages
# PyTorch's wheel index of CPU-only builds (README: "Installing"); TORCH_INDEX= in make picks another.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def say(line: str) -> None:
    print(f"setup: {line}", flush=True)


def requirements(pyproject: Path = REPO / "pyproject.toml", extra: str = "test") -> list[str]:
    """The project's dependencies and the test extra's pytest (the CPU proofs are pytest files; the test
    extra's other packages serve tests the check does not run)."""
    text = pyproject.read_text()

    def array(name: str) -> list[str]:
        found = re.search(rf"^{name}\s*=\s*\[(.*?)\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    return array("dependencies") + [r for r in array(extra) if re.match(r"pytest\b", r)]


def _name(req: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", req).group(0)


def unmet(reqs: list[str]) -> list[str]:
    """The requirements this interpreter does not satisfy (absent, or a version outside the range)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            Requirement = None  # noqa: N806 - then presence is all that is checked
    out = []
    for req in reqs:
        try:
            version = metadata.version(_name(req))
        except metadata.PackageNotFoundError:
            out.append(req)
            continue
        if Requirement is not None and not Requirement(req).specifier.contains(version, prereleases=True):
            out.append(req)
    return out


def _unmet_in(python: str, reqs: list[str]) -> list[str] | None:
    """``unmet`` as seen by another interpreter; None if that one cannot run this module."""
    proc = subprocess.run([python, "-m", "simpnet_cli.tools.gpusetup", "--unmet", *reqs], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    line = proc.stdout.strip()
    return line.split("\t") if line else []


def torch_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def environment_kind() -> str:
    """What this interpreter is: "venv" (its own site-packages over a base Python's), "conda" (an env of
    conda's) or "system"."""
    if sys.prefix != sys.base_prefix:
        return "venv"
    if (Path(sys.prefix) / "conda-meta").is_dir():
        return "conda"
    return "system"


def visible_site_dirs() -> list[str]:
    """Every site-packages folder this interpreter imports from (its env's, then its user site if enabled): what a
    venv made from it must see to import the same torch."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def has_nvidia_driver(proc: Path = Path("/proc/driver/nvidia"), which=shutil.which) -> bool:
    """An NVIDIA driver on this machine (a CUDA build of torch can use it): its /proc entry or nvidia-smi."""
    return proc.exists() or which("nvidia-smi") is not None


@dataclass
class Plan:
    """What the set-up will do: run with ``python``, after making the venv (seeing ``parent_sites``) and installing
    ``install`` (``torch_args``: how pip fetches torch when the machine has none)."""
    python: str
    make_venv: bool = False
    install: list[str] = field(default_factory=list)
    pip_args: list[str] = field(default_factory=list)
    torch_args: list[str] = field(default_factory=list)
    parent_sites: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan(missing: list[str], torch_here: str | None, wheels: Path | None, venv: Path = VENV,
         python: str = sys.executable, parent_sites: list[str] | None = None, always_venv: bool = False,
         gpu: bool | None = None, torch_index: str = CPU_TORCH_INDEX) -> Plan:
    """The decision, from what this interpreter lacks (``missing``), its torch version (None: no torch), and
    whether a venv is wanted even when nothing is missing (``make install``: the project goes into one)."""
    if not missing and not always_venv:
        return Plan(python, notes=["everything imports here: no venv, nothing to install"])
    p = Plan(str(venv / "bin" / "python"), make_venv=not (venv / "bin" / "python").exists(), install=list(missing))
    if wheels is not None:
        p.pip_args += ["--no-index", "--find-links", str(wheels)]
        p.notes.append(f"installing from {wheels} only (no index)")
    if torch_here:
        # Never replace the machine's torch (a CUDA build) with whatever a dependency would pull in; the venv sees
        # it through a .pth file, whatever this interpreter is (--system-site-packages would see the base's only).
        p.parent_sites = list(visible_site_dirs() if parent_sites is None else parent_sites)
        p.pip_args += ["--constraint", "{constraints}"]
        p.notes.append(f"the machine's torch {torch_here} is kept (the venv sees {python}'s site-packages; pinned)")
    elif gpu is False and wheels is None:
        p.torch_args = ["--index-url", torch_index]
        p.notes.append(f"no torch and no NVIDIA driver here: the CPU build of torch, from {torch_index}")
    else:
        p.notes.append("no torch on this machine: pip installs one")
    return p


def make_venv(venv: Path, parent_sites: list[str]) -> None:
    """A venv at ``venv`` that also imports from ``parent_sites`` (after its own site-packages). Without pip of
    its own when the parent's pip is seen (seconds, and no ensurepip needed)."""
    args = [sys.executable, "-m", "venv", str(venv)]
    if parent_sites and _importable("pip"):
        args.insert(3, "--without-pip")
    run_step(f"venv {venv.name}", args)
    link_parent_sites(venv, parent_sites)


def link_parent_sites(venv: Path, parent_sites: list[str]) -> None:
    """Write (or rewrite) the venv's .pth file naming ``parent_sites``: ``site.addsitedir`` also reads their own
    .pth files (editable installs, namespace packages), which a bare path line would not."""
    py = venv / "bin" / "python"
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    pth = Path(own) / PARENT_PTH
    if parent_sites:
        pth.write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in parent_sites))
    elif pth.exists():
        pth.unlink()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_step(name: str, cmd: list[str], hint: str = "") -> None:
    t0 = time.monotonic()
    say(f"{name} ...")
    proc = subprocess.run(cmd, cwd=REPO)
    say(f"{name}: {time.monotonic() - t0:.1f} s")
    if proc.returncode != 0:
        say(f"{name} failed (exit {proc.returncode}): {' '.join(cmd)}{hint}")
        raise SystemExit(2)


def wheels_hint(reqs: list[str]) -> str:
    """How to fill a WHEELS folder on a connected machine: built wheels (a source archive in it would need
    build tools the offline machine may lack), with their dependencies."""
    return "; WHEELS must hold wheels, made on a connected machine with: python -m pip wheel -w DIR " + \
        " ".join(f"'{r}'" for r in reqs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpusetup", description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, help="a folder of wheels: install from it only (offline)")
    ap.add_argument("--venv", type=Path, default=None, help="the venv to make or complete (default .venv-gpu)")
    ap.add_argument("--project", metavar="EXTRAS", default=None,
                    help="make install: always a venv, then the project itself, editable, with these extras")
    ap.add_argument("--torch-index", default=CPU_TORCH_INDEX, help="where the CPU build of torch comes from")
    ap.add_argument("--setup-only", action="store_true", help="set up, do not run the check")
    ap.add_argument("--unmet", nargs="*", help=argparse.SUPPRESS)  # the probe another interpreter runs
    args = ap.parse_args(argv)
    if args.unmet is not None:
        print("\t".join(unmet(args.unmet)))
        return 0
    if args.wheels is not None and not args.wheels.is_dir():
        say(f"WHEELS={args.wheels} is not a folder")
        return 2
    venv = (args.venv or VENV).absolute()
    t_all = time.monotonic()
    reqs = requirements()
    here = torch_version()
    p = plan(unmet(reqs), here, args.wheels, venv, always_venv=args.project is not None,
             gpu=has_nvidia_driver(), torch_index=args.torch_index)
    say(f"{sys.executable} ({environment_kind()}) lacks {', '.join(p.install)}" if p.install else
        f"{sys.executable} ({environment_kind()}): {p.notes[0]}")
    for note in p.notes[bool(not p.install):]:
        if not p.torch_args or note != p.notes[-1]:  # the CPU build's note: said when it is installed
            say(note)
    if p.make_venv:
        make_venv(venv, p.parent_sites)
    elif p.parent_sites:
        link_parent_sites(venv, p.parent_sites)  # a venv of an earlier set-up (--system-site-packages) sees it now
    constraints = venv / "simpnet-constraints.txt"
    if venv.exists():
        constraints.write_text(f"torch=={here}\n" if here else "")
    pip_args = [a.replace("{constraints}", str(constraints)) for a in p.pip_args]
    if p.install:
        still = _unmet_in(p.python, p.install)  # the venv may already hold some from an earlier set-up
        if still is None:
            say(f"{p.python} cannot run the probe; installing all of {p.install}")
            still = p.install
        torch_first = [r for r in still if _name(r) in ("torch", "torchvision")] if p.torch_args else []
        if torch_first:
            say(p.notes[-1])
            run_step(f"pip install {', '.join(torch_first)} (CPU build)",
                     [p.python, "-m", "pip", "install", "-q", *p.torch_args, *torch_first])
            still = [r for r in still if r not in torch_first]
        if not still:
            say(f"{venv.name} already holds them")
        elif args.project is None:
            say(f"installing {', '.join(still)} into {venv.name}")
            run_step("pip install", [p.python, "-m", "pip", "install", "-q", *pip_args, *still],
                     wheels_hint(still) if args.wheels else "")
    if args.project is not None:
        extras = f"[{args.project}]" if args.project else ""
        offline = ["--no-build-isolation"] if args.wheels is not None else []  # setuptools from the venv's view
        run_step(f"pip install -e .{extras}", [p.python, "-m", "pip", "install", "-q", *pip_args, *offline,
                                               "-e", f"{REPO}{extras}"],
                 wheels_hint(reqs) if args.wheels else "")
    say(f"set-up done in {time.monotonic() - t_all:.1f} s" + ("" if args.setup_only or args.project is not None
                                                               else f"; running the check with {p.python}"))
    if args.setup_only or args.project is not None:
        return 0
    return subprocess.run([p.python, "-m", "simpnet_cli.tools.gpucheck"], cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
