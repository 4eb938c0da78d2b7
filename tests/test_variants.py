"""Variants from the command line (issue 10) and the validation of every run before training (issue 11).

A row's dataset, solver, schedule, length, batch and network keys are Hydra overrides; a sweep runs every
combination; a network in no table and tables of one's own are recorded like the paper's rows; every bad
value is one line naming the row and the key, with exit 2, before anything trains.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simpnet_cli import cli
from simpnet_cli.nets import specs as network
from simpnet_cli.runs import results
from simpnet_cli.config import tables
from simpnet_cli.config import compose as composition, variants
from simpnet_cli.errors import UserError

SMOKE = {"train": {"iterations": 4, "batch_size": 8, "eval_every": 2, "checkpoint_every": 2, "precision": "fp32"},
         "data": {"source": "synthetic", "train_size": 64, "test_size": 32}}


def overrides(*args: str) -> variants.RowOverrides:
    return composition.overrides_of(list(args))


def resolve(table: str, row: str, *args: str, profile: dict | None = None) -> tables.RunSpec:
    t = tables.load_table(table)
    return tables.resolve(t, t.row(row), 0, profile if profile is not None else {}, overrides=overrides(*args))


def simpnet(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in a subprocess (Hydra's multirun owns sys.argv), one CPU thread per process."""
    full_env = {k: v for k, v in os.environ.items() if k != "SIMPNET_CONF_DIR"}
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "simpnet_cli.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}, stderr: {err}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("simpnet: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------- overrides applied to a row

def test_dataset_choice_replaces_the_rows_dataset_and_names_the_variant():
    paper = resolve("13", "slim-300K")
    run = resolve("13", "slim-300K", "dataset=fashion_mnist")
    assert paper.dataset["name"] == "mnist" and run.dataset["name"] == "fashion_mnist"
    assert run.variant == "dataset=fashion_mnist" and paper.variant == ""
    assert run.config_hash != paper.config_hash
    assert network.tokens(run.spec) == network.tokens(paper.spec)  # same 28x28x1 network


def test_dataset_with_other_shape_changes_the_classifier_and_input():
    run = resolve("4", "WE13", "dataset=cifar100")
    assert network.tokens(run.spec)[-1] == "fc100"
    assert run.in_shape == network.Shape(3, 32, 32)


def test_solver_choice_then_dotted_keys_on_top():
    run = resolve("2", "8L", "solver=nesterov_80k", "solver.lr=0.05", "solver.weight_decay=0.001",
                  "solver.schedule.steps=[1000,2000]")
    assert run.solver["type"] == "nesterov" and run.solver["lr"] == 0.05 and run.solver["weight_decay"] == 0.001
    assert run.solver["schedule"] == {"kind": "multistep", "gamma": 0.1, "steps": [1000, 2000]}
    assert run.variant == ("solver=nesterov_80k solver.lr=0.05 solver.schedule.steps=[1000,2000] "
                           "solver.weight_decay=0.001")


def test_dotted_solver_key_keeps_the_rows_own_solver():
    paper = resolve("2", "8L")
    run = resolve("2", "8L", "solver.lr=0.2")
    assert run.solver == {**paper.solver, "lr": 0.2}


def test_network_keys_change_the_layers():
    run = resolve("2", "8L", "net.widths=C64{3}, C128{4}", "net.pools_after=[3,7]", "net.dropout.head=0.3",
                  "net.global_pool=avg")
    assert network.tokens(run.spec) == (["conv64k3p1"] * 3 + ["pool-MAXk2s2"] + ["conv128k3p1"] * 4
                                        + ["pool-MAXk2s2", "GP-AVE", "drop0.3", "fc10"])
    assert run.variant == ("net.dropout.head=0.3 net.global_pool=avg net.pools_after=[3,7] "
                           "net.widths=C64{3},C128{4}")


def test_a_mapping_on_the_command_line_replaces_the_rows_mapping():
    paper = resolve("4", "WE10")
    assert paper.net["dropout"]["conv"] == {"1-3": 0.2, "5-6": 0.2, "8-10": 0.2}
    run = resolve("4", "WE10", "net.dropout.conv={1-2: 0.1}")
    assert run.net["dropout"]["conv"] == {"1-2": 0.1}
    assert run.net["dropout"]["pool"] == paper.net["dropout"]["pool"]


def test_strided_downsampling_and_kernels_from_the_command_line():
    run = resolve("2", "8L", "net.downsample=strided_conv", "net.kernels={1-3: 5}")
    toks = network.tokens(run.spec)
    assert toks[:3] == ["conv41k5p2", "conv43k5p2", "conv70k5s2p2"] and "pool-MAXk2s2" not in toks


def test_iterations_and_batch_size_override_row_and_profile():
    run = resolve("2", "8L", "iterations=90000", "batch_size=50", profile=SMOKE)
    assert run.train["iterations"] == 90000 and run.train["batch_size"] == 50
    assert run.variant == "batch_size=50 iterations=90000"


def test_an_override_that_changes_nothing_is_the_papers_row():
    paper = resolve("2", "8L")
    same = resolve("2", "8L", "dataset=cifar10", "net.widths=C41, C43, C70, C70{3}, C85, C90")
    assert same.config_hash == paper.config_hash and same.variant == ""


def test_profile_iterations_zero_is_refused_not_taken_as_unset():
    t = tables.load_table("2")
    with pytest.raises(UserError, match=r"train\.iterations: must be > 0, got 0"):
        tables.resolve(t, t.row("8L"), 0, {"train": {"iterations": 0}})


def test_widths_are_quoted_for_hydra_and_other_keys_are_added_with_force():
    assert variants.prepare(["net.widths=C64{3}, C128", "solver.lr=0.1", "dataset=cifar100", "table=4"]) == [
        "++net.widths='C64{3}, C128'", "++solver.lr=0.1", "dataset=cifar100", "table=4"]
    with pytest.raises(UserError, match="net.kernel"):
        variants.prepare(["arch.kernel=5"])


# --------------------------------------------------------------------------- the commands of the issue

def test_show_prints_the_resolved_network_of_a_variant(capsys):
    assert cli.main(["show", "table=4", "row=WE10", "net.dropout.head=0.3", "dataset=cifar100"]) == 0
    out = capsys.readouterr().out
    assert "variant: dataset=cifar100 net.dropout.head=0.3" in out
    assert "GP-MAX drop0.3 fc100" in out


# A profile of one's own for the sweeps below (a conf_dir's profile/ is searched like its tables/): the smoke
# profile cut to one step of two images and a test set of two. These are 5-8M-parameter networks, and what a sweep
# records, not what its runs learn, is checked; a profile of its own keeps the variants the paper's words.
TINY_PROFILE = """\
name: tiny
device: cpu
train: {iterations: 1, batch_size: 2, eval_every: 1, checkpoint_every: 2, precision: fp32}
data: {source: synthetic, train_size: 4, test_size: 2}
"""


@pytest.fixture
def tiny_profile(tmp_path):
    """The overrides that select the tiny profile from a conf_dir of the test's own."""
    root = tmp_path / "tinyconf"
    (root / "profile").mkdir(parents=True)
    (root / "profile" / "tiny.yaml").write_text(TINY_PROFILE)
    yield ["profile=tiny", f"conf_dir={root}"]


@pytest.mark.slow
def test_sweep_two_datasets_by_two_rows_records_four_variants_and_reruns_nothing(tmp_path, tiny_profile):
    args = ["run", "-m", "table=13", "row=slim-300K,SimpNet", "dataset=fashion_mnist,cifar10", *tiny_profile,
            "quiet=true", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
            f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = simpnet(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows, bad = results.read(tmp_path / "results" / "table13.csv")
    assert not bad and len(rows) == 4
    assert sorted((r["row_id"], r["variant"]) for r in rows) == [
        ("SimpNet", "dataset=cifar10"), ("SimpNet", "dataset=fashion_mnist"),
        ("slim-300K", "dataset=cifar10"), ("slim-300K", "dataset=fashion_mnist")]
    assert len({r["config_hash"] for r in rows}) == 4
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    again = simpnet(*args[:-1], f"hydra.sweep.dir={tmp_path}/sweep2", "quiet=false", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("already recorded") == 4 and "ok (final" not in again.stderr
    assert len(results.read(tmp_path / "results" / "table13.csv")[0]) == 4
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before


# A sweep over a network key, recording each job's variant: test_cli_help's sweep test (the same command).


@pytest.mark.slow
def test_a_network_in_no_table_is_recorded_as_custom(tmp_path, capsys, tiny_profile):
    code = cli.main(["run", "arch=arch2", "net.widths=C64, C128{2}, C256{3}", "dataset=cifar10", *tiny_profile,
                     "quiet=true", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"])
    assert code == 0, capsys.readouterr().err
    rows, bad = results.read(tmp_path / "results" / "tablecustom.csv")
    assert not bad and len(rows) == 1
    assert rows[0]["table"] == "custom" and rows[0]["row_id"] == "arch2"
    assert rows[0]["variant"] == "dataset=cifar10 net.widths=C64,C128{2},C256{3}"
    # Arch2's pools after layers 4, 7, 9, 12: the six-layer network keeps the one it has.
    assert cli.main(["show", "arch=arch2", "net.widths=C64, C128{2}, C256{3}", "--json"]) == 0
    import json
    rec = json.loads(capsys.readouterr().out)[0]
    assert rec["layers"][:5] == ["conv64k3p1", "conv128k3p1", "conv128k3p1", "conv256k3p1", "pool-MAXk2s2"]
    assert rec["layers"].count("pool-MAXk2s2") == 1


def test_a_network_of_ones_own_under_a_name_of_ones_own(capsys):
    assert cli.main(["show", "arch=resnet32", "dataset=cifar100", "custom.table=resnets", "--json"]) == 0
    import json
    rec = json.loads(capsys.readouterr().out)[0]
    assert rec["table"] == "resnets" and rec["layers"][-1] == "fc100"
    one_line_error(capsys, ["show", "arch=arch1"], "net.widths", "missing")
    one_line_error(capsys, ["show", "arch=arch1", "net.widths=C8", "custom.table=4"], "existing table")


MY_TABLE = """\
title: My depth check
row_defaults: {arch: arch1, dataset: cifar10, solver: adadelta_30k, iterations: 30000}
rows:
  - id: A
    label: six layers
    net: {widths: "C16{3}, C32{3}", pools_after: [3, 6]}
  - id: B
    label: eight layers
    net: {widths: "C16{4}, C32{4}", pools_after: [4, 8]}
claims:
  - text: deeper is better
    holds_if: ["B > A"]
"""


@pytest.fixture
def my_conf(tmp_path) -> Path:
    """A folder of one's own holding only tables/ (the built-in arch, solver and dataset configs are used)."""
    root = tmp_path / "myconf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "mine.yaml").write_text(MY_TABLE)
    yield root


def test_tables_of_ones_own_are_listed_with_their_origin_and_run(tmp_path, my_conf, capsys):
    assert cli.main(["list", f"conf_dir={my_conf}"]) == 0
    out = capsys.readouterr().out
    assert f"Table mine: My depth check  [{my_conf / 'tables' / 'mine.yaml'}]" in out
    assert "Table 2: Gradual expansion" in out and "[built-in: conf/tables/table2.yaml]" in out
    code = cli.main(["run", "table=mine", f"conf_dir={my_conf}", "profile=smoke", "quiet=true",
                     f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"])
    assert code == 0, capsys.readouterr().err
    rows, _ = results.read(tmp_path / "results" / "tablemine.csv")
    assert sorted(r["row_id"] for r in rows) == ["A", "B"]


def test_tables_of_ones_own_through_the_environment(tmp_path, my_conf, capsys, monkeypatch):
    # In-process (the variable is read when the command composes its config, as in a fresh process).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMPNET_CONF_DIR", str(my_conf))
    code = cli.main(["show", "table=mine", "row=B"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Table mine / B: eight layers" in out


# --------------------------------------------------------------------------- bad variant input: one line, exit 2

@pytest.mark.parametrize("args, needles", [
    (["net.nope=1"], ["row 8L", "net.nope: unknown key"]),
    (["nope=1"], ["nope", "unknown config key"]),
    (["net.widths=C41,{3}"], ["row 8L", "net.widths=C41,{3}", "C_x{y}", "unbalanced brace"]),
    (["iterations=-5"], ["row 8L", "train.iterations: must be > 0, got -5"]),
    (["dataset=nope"], ["dataset/nope"]),
    (["net.pools_after=[1,2,3,4,5,6]"], ["row 8L", "pooling a 1x1 map"]),
    # (pools the row places are fitted to fewer layers, with a note; pools placed on the command line are not)
    (["net.widths=C41{3}", "net.pools_after=[3,7]"], ["row 8L", "pools_after [3, 7]", "1-3"]),
    (["solver.lr=-1"], ["row 8L", "solver.lr: must be a finite number > 0, got -1.0"]),
    (["solver.lr=inf"], ["row 8L", "solver.lr: must be a finite number > 0, got inf"]),
    (["solver.rho=abc"], ["solver.rho", "abc"]),
    (["solver.weight_decay=5"], ["solver.weight_decay"]),
    (["solver.schedule.kind=cosine"], ["solver.schedule.kind: must be multistep or piecewise"]),
    (["solver.momentum=0.9"], ["solver.momentum: unknown key"]),
    (["dataset.channels=0"], ["dataset.channels: must be > 0"]),
    (["dataset.channels=1.5"], ["dataset.channels", "1.5"]),
    (["profile.train.iterations=0"], ["train.iterations: must be > 0, got 0"]),
    (["profile.train.eval_every=0"], ["train.eval_every: must be > 0"]),
    (["profile.train.checkpoint_every=x"], ["train.checkpoint_every", "'x'"]),
    (["batch_size=0"], ["train.batch_size: must be > 0"]),
    (["precision=fp8"], ["precision"]),
    (["precision=fp16"], ["fp16", "bf16"]),
    (["profile.data.train_size=0"], ["dataset.train_size: must be > 0"]),
    (["jobs_per_device=0"], ["jobs_per_device", "got 0"]),
    (["jobs_per_device=-2"], ["jobs_per_device", "got -2"]),
    (["jobs_per_device=abc"], ["jobs_per_device"]),
    (["results_dir="], ["results_dir", "give a folder"]),
    (["arch.kernel=5"], ["net.kernel"]),
], ids=lambda v: v[0] if isinstance(v, list) and v and "=" in v[0] else None)
def test_bad_variant_input_is_one_line_and_trains_nothing(tmp_path, capsys, args, needles):
    results_dir = "" if args == ["results_dir="] else f"results_dir={tmp_path}/results"
    argv = ["run", "table=2", "row=8L", "profile=smoke", f"runs_dir={tmp_path}/runs", *args]
    if args != ["results_dir="]:
        argv.append(results_dir)
    one_line_error(capsys, argv, *needles)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_a_bad_key_in_a_sweep_is_one_line_before_any_job(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = simpnet("run", "-m", "table=5", "row=P5,P3", "net.dropout.head=0.1,2", "profile=smoke",
                   f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
                   f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "net.dropout.head" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists(), "no job may start"
    # (the same check in-process: the sweep is refused before Hydra's multirun takes over sys.argv)
    capsys.readouterr()
    code = cli.main(["run", "-m", "table=5", "row=P5,P3", "nope=1", f"hydra.sweep.dir={tmp_path}/sweep"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_table_all_with_one_broken_row_anywhere_fails_before_the_first_run(tmp_path, capsys):
    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "table99.yaml").write_text(
        "title: broken last\nrow_defaults: {arch: arch1, dataset: cifar10, solver: adadelta_30k, "
        "iterations: 10}\nrows:\n  - id: LATE\n    label: bad schedule\n    net: {widths: 'C8{3}', "
        "pools_after: [3]}\n    solver: {base: adadelta_30k, schedule: {kind: cosine}}\n")
    line = one_line_error(capsys, ["run", "table=all", "profile=smoke", f"conf_dir={root}",
                                   f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"],
                          "table 99, row LATE", str(root / "tables" / "table99.yaml"), "solver.schedule.kind")
    assert "cosine" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_an_empty_table_file_is_refused(tmp_path, capsys):
    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "tableempty.yaml").write_text("")
    one_line_error(capsys, ["run", "table=empty", f"conf_dir={root}", f"results_dir={tmp_path}/r"],
                   "tableempty.yaml", "empty")


def test_a_table_name_that_is_not_a_number_no_longer_breaks_every_command(tmp_path, capsys):
    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "tablemine.yaml").write_text(MY_TABLE)
    assert cli.main(["list", f"conf_dir={root}"]) == 0
    assert tables.conf_dirs() == [tables.DEFAULT_CONF_DIR], "a command leaves the search path as it found it"
    assert cli.main(["show", "table=all", f"conf_dir={root}"]) == 0
    assert "Table mine / A" in capsys.readouterr().out


@pytest.mark.skipif(__import__("importlib").util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
@pytest.mark.slow
def test_a_variant_sweep_through_the_submitit_launcher(tmp_path, tiny_profile):
    # Each job runs in its own process: the variant must come from that job's own overrides. Two rows by two
    # variants: also one job per row into one CSV (this was test_speed_paths' submitit test, a command of its own).
    proc = simpnet("run", "-m", "table=5", "row=P5,P3", "net.dropout.head=0.1,0.2", *tiny_profile, "quiet=true",
                   "hydra/launcher=submitit_local", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
                   f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows, bad = results.read(tmp_path / "results" / "table5.csv")
    assert not bad
    assert sorted((r["row_id"], r["variant"]) for r in rows) == [
        (row, f"net.dropout.head={p}") for row in ("P3", "P5") for p in ("0.1", "0.2")]
    assert list((tmp_path / "sweep").glob(".submitit/*/*_log.out")), "jobs did not go through submitit"


@pytest.mark.slow
def test_the_issues_table_4_sweep_runs_as_written(tmp_path, tiny_profile):
    """`simpnet run -m table=4 row=WE10,BW10 dataset=cifar10,cifar100 seeds=3` (a profile cut to one step of
    two images): twelve runs, CIFAR-10 being the rows' own dataset (the paper's rows, variant ""), CIFAR-100 a
    variant."""
    proc = simpnet("run", "-m", "table=4", "row=WE10,BW10", "dataset=cifar10,cifar100", "seeds=3", *tiny_profile,
                   "quiet=true", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs",
                   f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows, bad = results.read(tmp_path / "results" / "table4.csv")
    assert not bad and len(rows) == 12
    from collections import Counter
    assert Counter((r["row_id"], r["variant"]) for r in rows) == {
        ("WE10", ""): 3, ("BW10", ""): 3, ("WE10", "dataset=cifar100"): 3, ("BW10", "dataset=cifar100"): 3}
    assert {(r["profile"], r["iterations"]) for r in rows} == {("tiny", 1)}


# --------------------------------------------------------------------------- the recipe as variants (issue: recipes)

def test_the_rows_last_conv_biases_follow_a_change_of_depth():
    """The authors give the biases of a net's last convs lr x2 / no decay; a row says "the last two" (-2, -1),
    so a variant with fewer convs keeps that meaning instead of naming convs that no longer exist."""
    paper = resolve("2", "13L")
    assert paper.param_mults["convs"]["indices"] == [12, 13]
    shallow = resolve("2", "13L", "net.widths=C64{3}, C128{4}", "net.pools_after=[3,7]")
    assert shallow.param_mults["convs"]["indices"] == [6, 7]
    assert shallow.recipe()["param_mults"]["convs"]["bias"] == {"lr": 2, "decay": 0}


@pytest.mark.parametrize("override,want", [
    ("feed.augment=pad4_crop32_mirror", {"augment": "pad4_crop32_mirror"}),
    ("feed=padded_standardized", {"input": "per_channel_standardized", "augment": "pad4_crop32_mirror",
                                  "test_transform": "centre_crop32"}),
    ("net.bn_fraction=0.99", {"bn_fraction": 0.99}),
    ("test_interval=500", {"test_interval": 500}),
    ("net.param_mults.convs.indices=[]", {"param_mults": {"classifier": {"weight": {"lr": 1, "decay": 0},
                                                                          "bias": {"lr": 2, "decay": 0}},
                                                           "convs": {"indices": [], "bias": None}}}),
])
def test_every_recipe_key_is_a_variant(override, want):
    """Table 5 with padded crops (or any other recipe key changed) is a variant of the row, named by its override."""
    paper = resolve("5", "P5")
    assert paper.recipe()["augment"] == "mirror" and paper.recipe()["test_interval"] == 1000
    run = resolve("5", "P5", override)
    got = run.recipe()
    assert {k: got[k] for k in want} == want
    assert run.config_hash != paper.config_hash
    assert run.variant == override.replace(" ", "")


def test_a_recipe_index_past_the_network_is_one_clear_error():
    with pytest.raises(UserError) as info:
        resolve("2", "8L", "net.init.on_convs=[9]", "net.init.gaussian_std=0.01")
    assert "net.init.on_convs" in str(info.value) and "8 convs" in str(info.value)


def test_svhn_trains_on_train_and_extra_unless_told_not_to():
    t = tables.load_table("14")
    row = t.row("slim-300K")
    assert tables.resolve(t, row, 0, {}).dataset["extra"] is True
    assert tables.resolve(t, row, 0, {}, data_opts={"svhn": {"extra": False}}).dataset["extra"] is False


def test_net_widths_is_parsed_once_per_composed_run(widths_parses, capsys):
    """The C_x{y} text travels from the command line to the builder as text and is parsed once, where the run
    is composed (config.tables); the spec, the pool fitting and the variant's name use that parse."""
    assert cli.main(["show", "table=2", "row=8L", "net.widths=C64{3}, C128{4}", "net.pools_after=[3,7]",
                     "--json"]) == 0
    (rec,) = __import__("json").loads(capsys.readouterr().out)
    assert rec["variant"] == "net.pools_after=[3,7] net.widths=C64{3},C128{4}"
    # The variant's widths once, and the paper's row once (composed to tell a real variant from a no-op).
    assert sorted(widths_parses) == sorted(["C64{3}, C128{4}", "C41, C43, C70{4}, C85, C90"])


@pytest.mark.parametrize("args,want", [
    (("precision=bf16",), "precision=bf16"),
    (("profile.train.eval_every=4",), "profile.train.eval_every=4"),
    (("profile.data.train_size=48",), "profile.data.train_size=48"),
    (("profile.train.eval_every=2",), ""),                    # the smoke profile's own value: no change
    (("profile.train.checkpoint_every=1",), ""),              # changes when files are written, not the run
])
def test_every_key_that_changes_the_run_names_its_variant(args, want, capsys):
    """Two runs share a report cell only if they computed the same thing: keys outside the row (profile.*,
    precision) that change the hash are in the variant; keys that do not change it are not."""
    assert cli.main(["show", "table=2", "row=8L", "profile=smoke", *args, "--json"]) == 0
    (rec,) = __import__("json").loads(capsys.readouterr().out)
    assert rec["variant"] == want
    assert cli.main(["show", "table=2", "row=8L", "profile=smoke", "--json"]) == 0
    (plain,) = __import__("json").loads(capsys.readouterr().out)
    assert (rec["config_hash"] == plain["config_hash"]) == (want == "")


def test_svhn_extra_off_is_a_variant_of_the_svhn_rows_only(tmp_path, capsys):
    for table, row, want in (("14", "slim-300K", "svhn_extra=false"), ("2", "8L", "")):
        assert cli.main(["run", f"table={table}", f"row={row}", "svhn_extra=false", "--cfg", "job"]) == 0
        assert f"variant: {want or chr(39) * 2}" in capsys.readouterr().out


def test_solver_lr_is_parsed_once_by_hydra_and_reaches_the_optimizer(tmp_path, monkeypatch, one_thread):
    """``solver.lr=`` is parsed by Hydra's grammar once, while the config is composed; the row overrides read
    the composed value, and the optimizer is built with it (config/compose.py)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from simpnet_cli.train import solvers

    parsed: list[str] = []
    original = OverridesParser.parse_overrides

    def counting(self, overrides):
        out = original(self, overrides)
        parsed.extend(o.key_or_group for o in out if o.key_or_group == "solver.lr")
        return out

    built: list[float] = []

    real = solvers.make_optimizer

    def make_optimizer(solver, groups):
        built.append(solver["lr"])
        return real(solver, groups)

    monkeypatch.setattr(OverridesParser, "parse_overrides", counting)
    monkeypatch.setattr(solvers, "make_optimizer", make_optimizer)
    assert cli.main(["run", "table=2", "row=8L", "profile=smoke", "solver.lr=0.0123457", "quiet=true",
                     "profile.train.iterations=1", "profile.train.batch_size=2", "profile.data.train_size=16",
                     "profile.data.test_size=8", f"results_dir={tmp_path / 'r'}", f"runs_dir={tmp_path / 'e'}"]) == 0
    assert parsed == ["solver.lr"]
    assert built == [0.0123457]


@pytest.mark.parametrize("key, value, route", [
    ("solver.lr", 0.0123457, {"config/compose.py:row_overrides", "config/tables.py:_parts",
                              "config/variants.py:assign", "train/solvers.py:make_optimizer",
                              "train/solvers.py:__init__"}),
    # (the text: quoted for Hydra's grammar, read back, set in the row's net, parsed once; the parse feeds the
    # builder)
    ("net.widths", "C64{3}, C128{4}", {"config/variants.py:prepare", "config/compose.py:row_overrides",
                                       "config/tables.py:_parts", "config/variants.py:assign",
                                       "nets/notation.py:parse_widths", "nets/notation.py:_strip_latex"}),
])
def test_a_value_reaches_its_use_through_at_most_six_functions(key, value, route, tmp_path, monkeypatch,
                                                               one_thread):
    """The functions of simpnet that hold a command-line value (a local variable equal to it) before the
    optimizer is built: the composition reads it, the row takes it, the optimizer or the notation parser uses
    it. Checking it (the schema) and naming the variant (its text) are uses of the value, not steps on its
    way; comprehensions count as the function they are in."""
    import sys

    from simpnet_cli.train import solvers

    held, built = set(), []

    def local(frame, event, arg):
        if not built and event in ("line", "return") and any(
                type(v) is type(value) and v == value for v in frame.f_locals.values()):
            held.add(f"{frame.f_code.co_filename.rsplit('simpnet_cli/', 1)[-1]}:{frame.f_code.co_name}")
        return local

    def calls(frame, event, arg):
        return local if event == "call" and "simpnet_cli" in frame.f_code.co_filename else None

    real = solvers.make_optimizer

    def make_optimizer(solver, groups):
        optimizer = real(solver, groups)
        built.append(optimizer)
        return optimizer

    monkeypatch.setattr(solvers, "make_optimizer", make_optimizer)
    sys.settrace(calls)
    try:
        code = cli.main(["run", "table=2", "row=8L", "profile=smoke", f"{key}={value}", "net.pools_after=[3,7]",
                         "quiet=true", "profile.train.iterations=1", "profile.train.batch_size=2",
                         "profile.data.train_size=16", "profile.data.test_size=8", f"results_dir={tmp_path / 'r'}",
                         f"runs_dir={tmp_path / 'e'}"])
    finally:
        sys.settrace(None)
    assert code == 0 and built
    uses = {"config/schemas.py:_require", "config/variants.py:text", "config/variants.py:_compact"}
    assert {name for name in held - uses if not name.endswith(("<listcomp>", "<genexpr>", "<dictcomp>"))} == route, \
        sorted(held)
    assert len(route) <= 6
