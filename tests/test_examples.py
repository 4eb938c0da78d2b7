"""Every example simpnet prints (`simpnet --help`, `simpnet CMD --help`) and every command of the README's code
blocks and command table runs, in a temporary folder. The commands are read from the texts themselves, so an
example added to either is covered without touching this file.

How an example is run (the rule; everything else is run as printed):

* results_dir=, runs_dir= and data_dir= point into a temporary folder, which holds one finished smoke run of
  Table 2's 8L (for report, repair, export); placeholders are filled: table=N -> table=2, row=ID -> row=8L,
  run_dir=PATH -> that run's folder, out=FILE -> a temporary file, a|b -> a.
* ``[...]``, the usage's optional parts: kept when concrete or filled (``[seeds=3]``, ``[--latex]``,
  ``[table=N]``), left out when a placeholder that cannot be filled (``[row=..]``, ``[KEY=VALUE ...]``); the key of a left-out ``[KEY=..]`` must still be one simpnet
  takes (a key of conf/config.yaml or a row's key), so ``[rows=..]`` for ``bench.rows`` fails here.
* ``simpnet run`` trains on a GPU for hours: it is run with ``--cfg job`` (Hydra composes it, every run is
  planned, checked and printed, nothing trains; training on the smoke profile is tests/test_smoke_tables.py's).
  With ``--dry-run`` it runs as printed on the smoke profile with ``dry_run.iters=1 dry_run.batch_size=8`` (slow
  tier). ``download=true`` is left out (nothing is fetched in a test; --cfg job reads no data).
* ``simpnet run -m`` (a sweep, maybe of SLURM jobs): on the smoke profile, every job of the sweep is composed,
  planned and checked as ``-m`` does before its first job starts (sweep.check_sweep); a cluster cannot be reached
  from a test, and the sweeps' training is tests/test_variants.py's.
* ``simpnet bench`` measures for minutes: it is composed and its keys checked (tests/test_speed_paths.py runs it).
* ``format=onnx`` without the onnx extra must be refused in one line naming ``pip install -e '.[onnx]'``.
* ``make TARGET``: the target exists in the Makefile (``make smoke`` is the smoke run above, ``make test`` this).
* GPU administration (nvidia-smi, the MPS daemon) is the GPU owner's, not simpnet's: only listed in ADMIN.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import math
import re
import shlex
from pathlib import Path

import pytest

from simpnet_cli import cli, commands, sweep

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"(?:\.venv/bin/)?simpnet (?:list|show|run|report|bench|repair|index|export|CMD|--version)\b")
ADMIN = ("nvidia-smi ", "nvidia-cuda-mps-control ", "echo quit | nvidia-cuda-mps-control")
PLACEHOLDERS = {"table=N": "table=2", "row=ID": "row=8L", "out=FILE": "out={tmp}/exported"}


def help_texts() -> dict[str, str]:
    texts = {}
    for args in [["--help"]] + [[cmd, "--help"] for cmd in cli.HELP]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(args) == 0
        texts[f"simpnet {' '.join(args)}"] = out.getvalue()
    return texts


def commands_in_help(text: str) -> list[str]:
    """Each `simpnet CMD ...` of a help text, up to the end of its line, a wide gap or a comment in brackets."""
    found = []
    for line in text.splitlines():
        for match in COMMAND.finditer(line):
            rest = line[match.start():]
            found.append(re.split(r"\s{2,}|\s+\(|\)", rest)[0].strip())
    return found


def readme_commands() -> tuple[list[str], list[str]]:
    """(the commands of the README's bash code blocks, split at && and continued lines joined; the commands of
    its command table)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", line)).strip()
            if line and not line.startswith("#"):
                lines += [part.strip() for part in line.split("&&")]
    cells = [c for cell in re.findall(r"^\| `([^|]*?)` \|", text, re.M) for c in re.split(r"`, `", cell)]
    table = [c for c in cells if COMMAND.match(c) or c.startswith("make ")]  # (not the tables of keys or modules)
    return lines, table


def fill_optional(command: str) -> tuple[str, list[str]]:
    """The command with its concrete ``[...]`` parts kept and the others left out; the keys left out."""
    out, left_out, i = [], [], 0
    while i < len(command):
        if command[i] == "[" and (i == 0 or command[i - 1] == " "):
            depth, j = 0, i
            while True:
                depth += {"[": 1, "]": -1}.get(command[j], 0)
                if depth == 0:
                    break
                j += 1
            inner = command[i + 1:j]
            if ".." in inner or "|" in inner or re.search(r"=[A-Z]+\b|\b[A-Z]{2,}\b|=N\b", inner):
                left_out += [part.split("=", 1)[0] for part in inner.split() if "=" in part]
            else:
                out.append(inner)
            i = j + 1
            continue
        out.append(command[i])
        i += 1
    return re.sub(r"\s+", " ", "".join(out)).strip(), left_out


def all_examples() -> list[tuple[str, str]]:
    """(where, command) of every example, each command once (the first place that shows it)."""
    found = [(where, c) for where, text in help_texts().items() for c in commands_in_help(text)]
    found += [("README code block", c) for c in readme_commands()[0]]
    found += [("README command table", c) for c in readme_commands()[1]]
    return [(where, c) for c, where in {c: where for where, c in reversed(found)}.items()]


EXAMPLES = all_examples()
# A dry run measures a warm-up step of every network it names, and an ONNX export traces and translates the
# network (tests/test_newcomer.py checks one against torch): the slow tier runs those.
CASES = [pytest.param(where, c, marks=[pytest.mark.slow] * ("--dry-run" in c or "format=onnx" in c))
         for where, c in EXAMPLES]


def test_the_examples_are_found():
    commands = [c for _, c in EXAMPLES]
    for expected in ("simpnet bench [bench.rows=[2/8L]]", "simpnet export run_dir=PATH [format=onnx]",
                     "simpnet run -m table=4 row=WE10,BW10 dataset=cifar10,cifar100",
                     "simpnet run -m table=8 row=1x1-first,2x2-first,1x1-mid,2x2-mid,1x1-end,3x3-end,2x2-end11,3x3-end11 "
                     "hydra/launcher=submitit_slurm hydra.launcher.partition=gpu "
                     "hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=2880", "make smoke"):
        assert any(c.replace("  ", " ").startswith(expected) for c in commands), expected
    assert len(EXAMPLES) > 25


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A results_dir and runs_dir holding one finished smoke run of Table 2's 8L, and that run's folder."""
    tmp = tmp_path_factory.mktemp("examples")
    assert cli.main(["run", "table=2", "row=8L", "profile=smoke", "quiet=true", f"results_dir={tmp}/results",
                     f"runs_dir={tmp}/runs"]) == 0
    (run_dir,) = (tmp / "runs").glob("*/result.json")
    return tmp, run_dir.parent


def is_config_key(key: str) -> bool:
    from omegaconf import OmegaConf

    from simpnet_cli.config import compose as composition, variants

    cfg, _ = composition.compose([])
    bare = key.lstrip("+")
    return variants.is_row_key(bare) or bare in ("--json", "--latex") or OmegaConf.select(cfg, bare, default=KeyError) \
        is not KeyError


@pytest.mark.parametrize("where,example", CASES)
def test_every_example_runs(where, example, done_run, tmp_path, monkeypatch, capsys):
    tmp, run_dir = done_run
    monkeypatch.chdir(tmp_path)
    if example.startswith("make "):
        target = example.split()[1]
        assert re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), re.M), example
        return
    if example.startswith(ADMIN):
        return
    assert COMMAND.match(example), f"{where}: a command this test does not know how to run: {example}"
    command = example.split("simpnet ", 1)[1]
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value.format(tmp=tmp_path))
    command = re.sub(r"=(\w+)\|\w+", r"=\1", command).replace("run_dir=PATH", f"run_dir={run_dir}")
    command, left_out = fill_optional(command)
    if command == "--version":
        assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("simpnet ")
        return
    if command.startswith("CMD "):  # `simpnet CMD --help`: every command's
        for cmd in cli.HELP:
            assert cli.main([cmd, *command.split()[1:]]) == 0
        return
    for key in left_out:  # (KEY=VALUE: any key)
        takes = key.isupper() or is_config_key(key)
        assert takes, f"{where}: {example}: {key}= is not a key simpnet takes"
    argv = shlex.split(command)
    assert not [a for a in argv if re.search(r"=[A-Z]+$|\b[A-Z]{2,}\b", a)], f"unfilled placeholder in {example}"
    cmd, args = argv[0], [a for a in argv[1:] if a != "download=true"]
    if cmd == "export":
        code = cli.main([cmd, *args])
        if "format=onnx" in args and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
            assert code == 2 and "pip install -e '.[onnx]'" in capsys.readouterr().err
            return
        assert code == 0, capsys.readouterr().err
        return
    args += [f"results_dir={tmp}/results", f"runs_dir={tmp}/runs", f"data_dir={tmp_path}/data"]
    if cmd == "bench":  # (its flags, --json, are the command's: cli.COMMAND_FLAGS)
        assert {a for a in args if a.startswith("--")} <= cli.COMMAND_FLAGS["bench"], example
        cfg, _ = commands.compose([a for a in args if not a.startswith("--")])
        commands.check_options(cfg)
        return
    if cmd == "run" and sweep.is_multirun(set(args), args):
        from simpnet_cli.config import compose as composition, variants

        if "submitit" in command and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            pytest.skip("hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
        overrides = [a for a in args if not a.startswith("-")] + ["profile=smoke"]  # (synthetic data)
        primary, search = composition.config_dirs(overrides)
        assert sweep.check_sweep(variants.prepare(overrides), search, primary) >= 1
        return
    if cmd == "run" and "--dry-run" in args:
        args += ["profile=smoke", "dry_run.iters=1", "dry_run.batch_size=2", "quiet=true"]
    elif cmd == "run" and "--cfg" not in args:
        args += ["--cfg", "job"]
    code = cli.main([cmd, *args])
    assert code == 0, f"{where}: {example}: {capsys.readouterr().err[-1000:]}"


# --------------------------------------------------------------------------- the keys of each command's help

KEY_TOKEN = re.compile(r"(?<![\w.\-/\[{'])(\+{0,2}[a-z_][\w.]*=(?:'[^']*'|\[[^\]]*\]|\{[^}]*\}|[^\s()]+))")
KEY_BASES = {"run": ["table=2", "row=8L", "profile=smoke"], "show": ["table=2", "row=8L"], "bench": []}


def key_examples() -> list[tuple[str, str]]:
    """Every KEY=VALUE a command's help shows as an example (outside its `simpnet ...` commands, which
    test_every_example_runs runs), for the commands that compose a config."""
    found = []
    for where, text in help_texts().items():
        cmd = where.split()[1]
        if cmd not in KEY_BASES:
            continue
        for line in text.splitlines()[1:]:
            line = COMMAND.split(line)[0]  # (a command on the line is an example of its own)
            found += [(cmd, token) for token in KEY_TOKEN.findall(line) if not token.startswith("hydra")]
    return sorted({token: cmd for cmd, token in reversed(found)}.items(), key=lambda t: (t[1], t[0]))


def test_the_keys_of_the_help_are_found():
    keys = {token for token, _ in key_examples()}
    assert {"profile.train.eval_every=4", "dataset.train_size=512", "logger=[csv,tensorboard]",
            "net.widths='C64{3}, C128{4}'", "bench.batch_size=100", "custom.row=NAME"} <= keys


@pytest.mark.parametrize("token,cmd", key_examples())
def test_every_key_example_of_the_help_is_accepted(cmd, token, tmp_path, monkeypatch):
    """Each key once, composed into the first command whose help shows it (run and show: Table 2's 8L, planned and checked as `simpnet run` checks before
    training; bench: composed and its keys checked). A placeholder value (NAME, PATH, N) checks the key only."""
    monkeypatch.chdir(tmp_path)
    key, _, value = token.partition("=")
    if re.fullmatch(r"[A-Z]+|N", value):
        assert is_config_key(key), token
        return
    token = re.sub(r"=(\w+)\|\w+.*", r"=\1", token)  # a|b: a
    cfg, variant = commands.compose([*KEY_BASES[cmd], token])
    commands.check_options(cfg)
    if cmd in ("run", "show") and not token.startswith(("arch=", "custom.")):
        assert commands.plan_runs(cfg, variant)


# --------------------------------------------------------------------------- real data on the CPU (README)

def fashion_commands() -> list[str]:
    """The README's Fashion-MNIST commands: in its first screen, before the GPU's."""
    first_screen = (REPO / "README.md").read_text().split("## Commands")[0]
    return [c for c in readme_commands()[0] if "dataset=fashion_mnist" in c and c in first_screen]


def test_the_readme_opens_with_a_cpu_path_to_real_data():
    commands = fashion_commands()
    assert len(commands) == 2 and any("dataset.train_size=" in c for c in commands), commands


@pytest.mark.slow
def test_the_readmes_small_real_subset_trains_on_fashion_mnist(fashion_mnist_dir, tmp_path, monkeypatch):
    """The README's CI command, as printed (in a temporary folder): Table 13's slim 300K SimpNet (AdaDelta lr 0.1,
    its own solver) with Fashion-MNIST in place of MNIST, 80 iterations of batch 50 (one pass over a 4,000-image
    subset), tested on 500 images at 40 and 80 (on 500 an accuracy has a standard error of about 2 points).

    Measured on the 2-core CPU machine (seed 0; deterministic for a given CPU and thread count): 2 threads: test
    accuracy 49.4% at iteration 40, 65.0% at 80 (best 65.0, final 65.0), train loss 1.71 -> 0.95; 1 thread: 57.2%
    and 69.8% (the float sums differ). 40-70 s. Chance is 10%; the thresholds leave 15 points of room for other
    CPUs' floating-point differences."""
    from simpnet_cli.runs import results

    (command,) = [c for c in fashion_commands() if "dataset.train_size=" in c]
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command.split("simpnet ", 1)[1])
    assert cli.main([*argv, f"data_dir={fashion_mnist_dir}", "results_dir=results", "runs_dir=runs", "quiet=true"]) == 0
    (row,), bad = results.read(tmp_path / "results" / "table13.csv")
    assert not bad and row["status"] == "ok" and row["dataset"] == "fashion_mnist" and row["iterations"] == 80
    assert row["epochs"] == pytest.approx(1.0)
    assert row["best_acc"] >= 50.0 and row["final_acc"] >= 45.0, row
    with open(tmp_path / row["run_dir"] / "curve.csv", newline="") as fh:
        curve = list(csv.DictReader(fh))
    assert [int(c["iter"]) for c in curve] == [40, 80]
    assert float(curve[-1]["train_loss"]) < float(curve[0]["train_loss"])
    assert float(curve[-1]["test_loss"]) < math.log(10)  # better than a uniform guess
