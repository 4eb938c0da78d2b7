"""What a new user meets first (issue 27, part A): the ONNX export, the Python API, discoverable flags, git-clean
runs, adapted dropout ranges, one line for every missing dataset, the loss logged between evaluations."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import simpnet_cli
import simpnet_cli.errors
from simpnet_cli import cli

HAS_ONNX_EXTRA = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))
SMOKE_8L = ["table=2", "row=8L", "profile=smoke", "quiet=true"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One finished smoke run of Table 2's 8L (four steps on synthetic data): (its folder, results_dir)."""
    tmp = tmp_path_factory.mktemp("smoke_run")
    assert cli.main(["run", *SMOKE_8L, f"results_dir={tmp}/r", f"runs_dir={tmp}/e"]) == 0
    (run_dir,) = [p for p in (tmp / "e").iterdir() if (p / "result.json").exists()]
    return run_dir, tmp / "r"


# --------------------------------------------------------------------------- A1: export


@pytest.mark.slow  # (tracing and translating the network: 5-15 s)
@pytest.mark.skipif(not HAS_ONNX_EXTRA, reason="the onnx extra is not installed (pip install -e '.[onnx]')")
def test_onnx_export_computes_what_the_torch_model_computes(smoke_run, tmp_path, capsys):
    run_dir, _ = smoke_run
    out = tmp_path / "m.onnx"
    assert cli.main(["export", f"run_dir={run_dir}", "format=onnx", f"out={out}"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    model = simpnet_cli.load_model(run_dir)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # another batch size than exported
    with torch.no_grad():
        expected = model(x).numpy()
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"images": x.numpy()})[0]
    else:
        from onnx.reference import ReferenceEvaluator

        got = ReferenceEvaluator(str(out)).run(None, {"images": x.numpy()})[0]
    assert got.shape == (5, 10)
    assert abs(got - expected).max() < 1e-4


def test_onnx_export_without_the_extra_names_the_command_for_a_clone(smoke_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    assert cli.main(["export", f"run_dir={smoke_run[0]}", "format=onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxscript" in err and "pip install -e '.[onnx]'" in err


# --------------------------------------------------------------------------- A6: the Python API


def test_build_model_builds_a_rows_network_untrained_with_overrides(capsys):
    from simpnet_cli.nets import modules as M

    model = simpnet_cli.build_model(table=4, row="WE10")
    assert cli.main(["show", "table=4", "row=WE10", "--json"]) == 0
    import json

    (shown,) = json.loads(capsys.readouterr().out)
    assert M.count_trainable(model) == shown["params_total"]
    again = simpnet_cli.build_model(table=4, row="WE10")  # seed 0's fillers, as a run of seed 0 starts
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    wide = simpnet_cli.build_model(table=4, row="WE10", dataset="cifar100", net={"dropout": {"head": 0.3}})
    assert wide(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in wide.modules())
    with pytest.raises(simpnet_cli.errors.UserError, match="nope"):
        simpnet_cli.build_model(table=4, row="WE10", nope=1)


def test_read_runs_gives_a_tables_runs_as_a_dataframe(smoke_run, tmp_path):
    _, results_dir = smoke_run
    runs = simpnet_cli.read_runs(table=2, results_dir=results_dir)
    assert list(runs["row_id"]) == ["8L"] and runs.loc[0, "status"] == "ok"
    assert {"best_acc", "final_acc", "config_hash", "run_dir", "variant"} <= set(runs.columns)
    assert simpnet_cli.read_runs(table=4, results_dir=tmp_path).empty


# --------------------------------------------------------------------------- A8: a row given fewer layers


def test_a_row_given_fewer_layers_adapts_its_dropout_ranges_and_pools_with_a_note(capsys):
    assert cli.main(["show", "table=4", "row=WE10", "net.widths=C64"]) == 0  # was refused: layer 1-3 outside 1-1
    out = capsys.readouterr().out
    assert ["conv64k3p1", "drop0.2", "GP-MAX", "fc10"] in [line.split() for line in out.splitlines()]
    assert ("note: WE10's dropout.conv {\"1-3\":0.2,\"5-6\":0.2,\"8-10\":0.2} adapted to {\"1\":0.2} for 1 layer; "
            "set net.dropout.conv={..} to place them") in out
    assert "note: WE10's pools_after [4,7,9] adapted to [] for 1 layer" in out
    assert cli.main(["show", "table=4", "row=WE10", "net.widths=C64{3}, C128{6}"]) == 0  # a range cut at the end
    assert 'adapted to {"1-3":0.2,"5-6":0.2,"8-9":0.2} for 9 layers' in capsys.readouterr().out
    # ranges set on the command line are the user's: refused, not adapted
    assert cli.main(["show", "table=4", "row=WE10", "net.widths=C64", "net.dropout.conv={1-3: 0.2}"]) == 2
    assert "dropout.conv: layer 1-3 is outside 1-1" in capsys.readouterr().err


def test_a_row_whose_layers_fit_is_not_adapted():
    from simpnet_cli.config import tables

    row = tables.load_table("4").row("WE10")
    net = {**tables.load_named("arch", "arch2"), **row["net"]}
    fitted, notes = tables.fit_to_depth(net, 10, "WE10", [])
    assert notes == () and fitted == net  # the paper's rows (and their config hashes) are untouched


# --------------------------------------------------------------------------- A9: missing datasets


def test_one_command_names_every_missing_dataset_at_once(tmp_path, capsys):
    argv = ["run", "table=[6,13]", f"data_dir={tmp_path}/data", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/e"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("simpnet: error: 3 datasets not found under")
    for name, file in (("mnist", "MNIST/raw/train-images-idx3-ubyte"), ("cifar10", "cifar-10-batches-py/data_batch_1"),
                       ("cifar100", "cifar-100-python/train")):
        assert f"{name} (no {tmp_path}/data/{file})" in err
    assert "download=true" in err and not list(tmp_path.glob("e/*/result.json"))  # nothing trained


def test_a_sweep_names_every_missing_dataset_of_its_jobs_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "-m", "table=4", "row=WE10", "dataset=cifar10,cifar100", f"data_dir={tmp_path}/data",
            f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/e"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 datasets not found" in err and "cifar10 (no" in err and "cifar100 (no" in err


# --------------------------------------------------------------------------- A5: outputs are not tracked


def test_what_run_and_report_write_under_results_is_ignored_by_git(smoke_run):
    """Every file a run and its report write under results_dir, placed at the default results/ of this clone, is
    ignored by git (so `git status` stays clean after a command), and the hand-curated benchmarks.md is tracked."""
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git clone")
    _, results_dir = smoke_run
    assert cli.main(["report", "table=2", f"results_dir={results_dir}"]) == 0
    written = sorted(f"results/{p.relative_to(results_dir)}" for p in results_dir.rglob("*") if p.is_file())
    assert {"results/REPORT.md", "results/table2.csv"} <= set(written) and any(p.endswith(".png") for p in written)
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=repo, capture_output=True,
                             text=True).stdout.split()
    assert sorted(ignored) == written
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=repo, capture_output=True, text=True).stdout.split()
    assert tracked == ["results/benchmarks.md"]


# --------------------------------------------------------------------------- A7: logged while it trains


def _tiny_run(iterations: int, eval_every: int, checkpoint_every: int):
    from simpnet_cli.config import tables

    table = tables.load_table("5")
    profile = {"train": {"iterations": iterations, "batch_size": 8, "eval_every": eval_every,
                         "checkpoint_every": checkpoint_every, "precision": "fp32"},
               "data": {"source": "synthetic", "train_size": 40, "test_size": 16}}
    return tables.resolve(table, table.row("P5"), 0, profile)


def _curve_iters(run_dir) -> list[int]:
    import csv

    with open(run_dir / "curve.csv", newline="") as fh:
        return [int(r["iter"]) for r in csv.DictReader(fh)]


def test_curve_csv_grows_at_each_evaluation_and_a_resume_writes_no_line_twice(tmp_path, one_thread, crash_at):
    from simpnet_cli.train import loop

    run, run_dir = _tiny_run(iterations=6, eval_every=1, checkpoint_every=3), tmp_path / "run"
    crash_at(5)  # dies about to train iteration 6, after the evaluation of 5, two past its checkpoint (3)
    with pytest.raises(KeyboardInterrupt):
        loop.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)
    assert _curve_iters(run_dir) == [1, 2, 3, 4, 5]  # written as it trained, not only at the end
    crash_at(None)
    loop.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)
    assert _curve_iters(run_dir) == [1, 2, 3, 4, 5, 6]


def test_tensorboard_gets_the_training_loss_at_every_check_between_evaluations(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simpnet_cli.train import callbacks as C
    from simpnet_cli.train import loop
    from simpnet_cli.train import state as run_state

    run, run_dir = _tiny_run(iterations=8, eval_every=4, checkpoint_every=100), tmp_path / "run"
    run_state.write_config(run, run_dir)
    state = run_state.build(run, run_dir, torch.device("cpu"), tmp_path, False, lambda s: None, None)
    state.check_every = 2  # (a run's is min(eval_every, 50): a check every 2 of 4 iterations, as 50 of 500)
    loop.fit([state], loop.Alone(state.step), [loop.run_callbacks([C.CsvLogger(), C.TensorBoardLogger()], None, ())])
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [step for step, _ in loss] == [2, 4, 6, 8]
    assert [e.step for e in acc.Scalars("test/acc")] == [4, 8]
    # each point is the mean of its two iterations: two of them make the evaluation interval's mean (curve.csv)
    for (_, a), (_, b), row in zip(loss[0::2], loss[1::2], state.curve):
        assert (a + b) / 2 == pytest.approx(row["train_loss"], rel=1e-5)


def test_show_prints_the_solver_and_its_schedule(capsys):
    assert cli.main(["show", "table=4", "row=WE10", "solver.lr=0.05"]) == 0
    (line,) = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("solver:")]
    assert line == ("solver: adadelta lr 0.05, rho 0.9, eps 0.001, weight decay 0.005; "
                    "lr x0.1 at [50000, 95000, 253000, 295000, 320000, 370000]")
    assert cli.main(["show", "table=13", "row=SimpNet"]) == 0
    assert "; lr 0.1 from 0, 0.01 from 5000, 0.001 from 9500," in capsys.readouterr().out


# --------------------------------------------------------------------------- A4: discoverable


def test_the_top_help_names_export_the_loggers_cfg_job_and_the_python_api(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: simpnet COMMAND")
    for word in ("simpnet export", "load_model", "build_model", "read_runs", "logger=[csv,tensorboard]", "mlflow",
                 "--cfg job", "--version"):
        assert word in out, word


def test_version(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"simpnet {version('simpnet')}\n"


@pytest.mark.parametrize("args", [["-h"], ["run", "--help"], ["--version"]])
@pytest.mark.parametrize("reader", ["head -2", "true"])  # (true leaves before a byte is written: always EPIPE)
def test_help_into_a_pipe_that_closes_early_is_no_traceback(args, reader):
    import subprocess

    shell = f"{sys.executable} -m simpnet_cli.cli {' '.join(args)} | {reader}"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert reader == "true" or proc.stdout.startswith(("usage: simpnet", "simpnet "))


@pytest.mark.parametrize("args,says", [
    (["--info"], "simpnet list"), (["run", "--info"], "--cfg job"), (["run", "table=2", "--cfg", "hydra"], "--cfg job"),
    (["run", "--shell-completion", "install=bash"], "simpnet CMD --help"), (["show", "--hydra-help"], "--help"),
    (["run", "-cp", "x"], "conf_dir=")])
def test_hydras_own_flags_are_answered_in_one_line_naming_what_to_use(args, says, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_cfg_job_prints_plain_yaml_without_anchors(capsys):
    import yaml

    assert cli.main(["run", "table=2", "seeds=2", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "&id0" not in out and "*id0" not in out
    docs = list(yaml.safe_load_all(out))
    assert len(docs) == 8 and docs[0]["net"]["param_mults"]["classifier"]["bias"]["lr"] == 2


def test_profile_keys_are_taken_as_written_and_still_checked(capsys):
    assert cli.main(["run", "table=2", "row=8L", "profile.data.train_size=512", "--cfg", "job"]) == 0
    assert "variant: profile.data.train_size=512" in capsys.readouterr().out
    assert cli.main(["run", "table=2", "row=8L", "profile.data.train_sze=512", "--cfg", "job"]) == 2
    assert "profile.data.train_sze: unknown key" in capsys.readouterr().err
