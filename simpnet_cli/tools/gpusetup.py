"""`make gpu-check`'s set-up: the machine's own torch, and only what is missing beside it.

A GPU machine lent for the check has a CUDA torch and nothing of ours; installing torch again would take minutes,
need the network, and could replace the machine's CUDA build with another. So:

1. if this Python already imports every requirement (pyproject's dependencies and pytest), the check runs with it;
2. else a venv, ``.venv-gpu``, made with ``--system-site-packages`` (it sees the machine's torch), gets only
   what is missing, with torch pinned to the version already there; ``--wheels DIR`` installs from a folder
   of wheels with no index (offline machines);
3. then ``python -m simpnet_cli.tools.gpucheck`` runs from the repository (the package is not installed:
   run from its folder, it imports as it is).

Each step prints its time. Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-gpu"


def say(line: str) -> None:
    print(f"gpu-check setup: {line}", flush=True)


def requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The project's dependencies and the test extra's pytest (the CPU proofs are pytest files; the test
    extra's other packages serve tests the check does not run)."""
    text = pyproject.read_text()

    def array(name: str) -> list[str]:
        found = re.search(rf"^{name}\s*=\s*\[(.*?)\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    return array("dependencies") + [r for r in array("test") if re.match(r"pytest\b", r)]


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


@dataclass
class Plan:
    """What the set-up will do: run with ``python``, after making the venv and installing ``install``."""
    python: str
    make_venv: bool = False
    install: list[str] = field(default_factory=list)
    pip_args: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan(missing: list[str], torch_here: str | None, wheels: Path | None, venv: Path = VENV,
         python: str = sys.executable) -> Plan:
    """The decision, from what this interpreter lacks (``missing``) and its torch version (None: no torch)."""
    if not missing:
        return Plan(python, notes=["everything imports here: no venv, nothing to install"])
    p = Plan(str(venv / "bin" / "python"), make_venv=not (venv / "bin" / "python").exists(), install=list(missing))
    if wheels is not None:
        p.pip_args += ["--no-index", "--find-links", str(wheels)]
        p.notes.append(f"installing from {wheels} only (no index)")
    if torch_here:
        # Never replace the machine's torch (a CUDA build) with whatever a dependency would pull in.
        p.pip_args += ["--constraint", "{constraints}"]
        p.notes.append(f"the machine's torch {torch_here} is kept (--system-site-packages, pinned)")
    else:
        p.notes.append("no torch on this machine: pip installs one")
    return p


def run_step(name: str, cmd: list[str], hint: str = "") -> None:
    t0 = time.monotonic()
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
    ap.add_argument("--unmet", nargs="*", help=argparse.SUPPRESS)  # the probe another interpreter runs
    args = ap.parse_args(argv)
    if args.unmet is not None:
        print("\t".join(unmet(args.unmet)))
        return 0
    if args.wheels is not None and not args.wheels.is_dir():
        say(f"WHEELS={args.wheels} is not a folder")
        return 2
    t_all = time.monotonic()
    reqs = requirements()
    here = torch_version()
    p = plan(unmet(reqs), here, args.wheels)
    say(f"{sys.executable} lacks {', '.join(p.install)}" if p.install else p.notes[0])
    if p.make_venv:
        run_step(f"venv {VENV.name} with system site-packages", [sys.executable, "-m", "venv",
                                                                  "--system-site-packages", str(VENV)])
    if p.install:
        still = _unmet_in(p.python, p.install)  # the venv may already hold some from an earlier check
        if still is None:
            say(f"{p.python} cannot run the probe; installing all of {p.install}")
            still = p.install
        if not still:
            say(f"{VENV.name} already holds them")
        else:
            constraints = VENV / "constraints.txt"
            constraints.write_text(f"torch=={here}\n" if here else "")
            pip_args = [a.replace("{constraints}", str(constraints)) for a in p.pip_args]
            for note in p.notes:
                say(note)
            say(f"installing {', '.join(still)} into {VENV.name}")
            run_step("pip install", [p.python, "-m", "pip", "install", "-q", *pip_args, *still],
                     wheels_hint(still) if args.wheels else "")
    say(f"set-up done in {time.monotonic() - t_all:.1f} s; running the check with {p.python}")
    return subprocess.run([p.python, "-m", "simpnet_cli.tools.gpucheck"], cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
