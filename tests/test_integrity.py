"""Nothing wrong is ever recorded (issue 11): results files that cannot be read back are rebuilt from the run
folders without losing or duplicating a run, checkpoints are checksummed and refused when damaged, diverged
runs record their real time, and malformed input of any shape ends in one line with exit 2 before anything
is written. Issue 19's classes 5-12 have a section each below (``test_classN_...``), then a fuzz test of every
key with values of every type, and a run given names that look like paths writes nowhere else.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from simpnet_cli import cli, commands, files
from simpnet_cli.train import checkpoint
from simpnet_cli.runs import results
from simpnet_cli.config import tables
from simpnet_cli.train import loop as train
from simpnet_cli.errors import UserError

from conftest import fast_sample

SMOKE = ["profile=smoke", "quiet=true"]


def run_p5(tmp_path: Path, *extra: str) -> int:
    return cli.main(["run", "table=5", "row=P5", *SMOKE, f"results_dir={tmp_path}/results",
                     f"runs_dir={tmp_path}/runs", *extra])


def csv5(tmp_path: Path) -> Path:
    return results.csv_path(tmp_path / "results", "5")


def one_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("simpnet: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- results files

def test_a_csv_resaved_with_a_bom_gains_no_duplicate_and_reports_its_lines(tmp_path, one_thread):
    assert run_p5(tmp_path, "seeds=2") == 0
    path = csv5(tmp_path)
    path.write_bytes("\ufeff".encode() + path.read_bytes())  # a spreadsheet's "UTF-8 with BOM"
    for _ in range(2):
        assert run_p5(tmp_path, "seeds=2") == 0
    rows, bad = results.read(path)
    assert not bad and len(rows) == 2 and len(path.read_text().splitlines()) == 3
    from simpnet_cli.report import write as report
    rep = report.collect(tmp_path / "results", "5", profile="smoke")
    assert "P5" in repr(rep)  # the report sees the runs of the file


def test_a_damaged_header_is_rebuilt_by_the_next_run_and_the_damaged_file_kept(tmp_path, capsys, one_thread):
    """A file we cannot read back never gains a duplicate or loses a run: its lines are matched to columns by
    header name, so none is read (the report lists them all), and the next run rebuilds the file from the
    run folders, keeping the damaged one beside it."""
    assert run_p5(tmp_path, "seeds=2") == 0
    path = csv5(tmp_path)
    healthy = path.read_text()
    path.write_text("tabl,row,@@garbage\n" + "\n".join(healthy.splitlines()[1:]) + "\n")
    damaged = path.read_bytes()
    good, bad = results.read(path)
    assert not good and [b.lineno for b in bad] == [1, 2, 3] and "simpnet repair" in bad[0].why
    capsys.readouterr()
    assert run_p5(tmp_path, "seeds=3") == 0  # seeds 0 and 1 are recorded (in their folders), seed 2 is new
    assert f"simpnet: warning: {path}:1: damaged header" in capsys.readouterr().err
    rows, bad = results.read(path)
    assert not bad and sorted(r["seed"] for r in rows) == [0, 1, 2]
    assert path.read_text().startswith(healthy)
    (backup,) = path.parent.glob("table5.csv.damaged-*")
    assert backup.read_bytes() == damaged, "the damaged file is kept as a backup"
    assert cli.main(["repair", "table=5", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]) == 0
    assert "unchanged" in capsys.readouterr().err and len(list(path.parent.glob("table5.csv.damaged-*"))) == 1


def test_repair_recovers_runs_whose_lines_were_lost(tmp_path, capsys, one_thread):
    assert run_p5(tmp_path, "seeds=2") == 0
    path = csv5(tmp_path)
    path.write_text(path.read_text().splitlines()[0] + "\n")  # every line lost
    assert cli.main(["repair", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]) == 0
    assert "2 recovered" in capsys.readouterr().err
    assert sorted(r["seed"] for r in results.read(path)[0]) == [0, 1]


def test_a_file_of_the_older_layout_is_migrated_on_append(tmp_path, one_thread):
    assert run_p5(tmp_path) == 0
    path = csv5(tmp_path)
    rows, _ = results.read(path)
    old = [c for c in results.COLUMNS if c not in ("variant", "step_mode")]
    import csv
    import io
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([old, [rows[0][c] for c in old]])
    path.write_text(buf.getvalue())
    assert results.read(path)[0][0]["step_mode"] == "eager"
    assert run_p5(tmp_path, "seeds=2") == 0  # seed 0 is recorded (read from the old layout), seed 1 is new
    rows, bad = results.read(path)
    assert not bad and sorted(r["seed"] for r in rows) == [0, 1]
    assert path.read_text().splitlines()[0] == ",".join(results.COLUMNS)


@pytest.mark.slow
def test_at_most_one_line_per_run_after_any_sequence_of_runs_and_faults(tmp_path, capsys, one_thread):
    """A generated sequence of runs, re-runs and faults on the file; the invariant holds after every step."""
    rng = random.Random(11)
    path = csv5(tmp_path)

    def fault(kind: str) -> None:
        if not path.exists():
            return
        text = path.read_bytes()
        if kind == "bom" and not text.startswith(b"\xef\xbb\xbf"):
            path.write_bytes(b"\xef\xbb\xbf" + text)
        elif kind == "torn":
            path.write_bytes(text + b"5,row P5,P5,,9,cifar")  # a line cut by a crash
        elif kind == "header":
            path.write_bytes(b"oops" + text.split(b"\n", 1)[1] if b"\n" in text else text)
        elif kind == "duplicate" and text.count(b"\n") > 1:
            path.write_bytes(text + text.split(b"\n")[1] + b"\n")  # a line pasted twice by hand

    for step in range(7):
        action = rng.choice(["run", "run", "bom", "torn", "header", "duplicate"])
        if action == "run":
            code = run_p5(tmp_path, f"seeds={rng.randint(1, 3)}")
            if code == 2:  # a damaged header: the run refuses, the user repairs
                assert "simpnet repair" in capsys.readouterr().err
                cli.main(["repair", "table=5", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"])
        else:
            fault(action)
        rows, _ = results.read(path)
        keys = [results.key(r) for r in rows if r["status"] == "ok"]
        if action != "duplicate":  # a hand-pasted duplicate exists until the next repair
            assert len(keys) == len(set(keys)), (step, action, keys)
    cli.main(["repair", "table=5", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"])
    rows, bad = results.read(path)
    keys = [results.key(r) for r in rows]
    assert not bad and len(keys) == len(set(keys))


# --------------------------------------------------------------------------- checkpoints

def interrupted_run(tmp_path: Path, monkeypatch, row: dict | None = None,
                    iterations: int = 8) -> tuple[tables.RunSpec, Path]:
    """A run of Table 5's P5 (or ``row``) killed right after its checkpoint at iteration 4."""
    table = tables.load_table("5")
    profile = {"train": {"iterations": iterations, "batch_size": 8, "eval_every": 4, "checkpoint_every": 4,
                         "precision": "fp32"}, "data": {"source": "synthetic", "train_size": 40, "test_size": 16}}
    run = tables.resolve(table, row or table.row("P5"), 0, profile)
    real = checkpoint.atomic_write

    def die_after_checkpoint(path, write):
        real(path, write)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_write", die_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, tmp_path / "run", torch.device("cpu"), tmp_path, False)
    monkeypatch.undo()
    assert checkpoint.iteration(tmp_path / "run" / "checkpoint.pt") == 4
    return run, tmp_path / "run"


def test_a_checkpoint_with_a_flipped_byte_is_refused_and_never_trained_from(tmp_path, monkeypatch, one_thread):
    run, run_dir = interrupted_run(tmp_path, monkeypatch)
    ckpt = run_dir / "checkpoint.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="unreadable.*checksum.*move it away"):
        train.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)
    assert not (run_dir / "result.json").exists()
    ckpt.unlink()  # moved away: the run starts again from iteration 0 and finishes
    assert train.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)["status"] == "ok"


@pytest.mark.parametrize("damage", ["header", "truncated", "other-run", "wrong-shapes", "wrong-keys"])
def test_damaged_or_foreign_checkpoints_are_refused(tmp_path, monkeypatch, one_thread, damage):
    run, run_dir = interrupted_run(tmp_path, monkeypatch)
    ckpt = run_dir / "checkpoint.pt"
    state = checkpoint.read(ckpt, run.config_hash)
    if damage == "header":
        ckpt.write_bytes(b"garbage" + ckpt.read_bytes()[7:])
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:-100])
    elif damage == "other-run":
        checkpoint.save(ckpt, state, "0123456789abcdef")
    elif damage == "wrong-shapes":
        first = next(iter(state["model"]))
        state["model"][first] = torch.zeros(3, 3)
        checkpoint.save(ckpt, state, run.config_hash)
    else:
        del state["rng"]
        checkpoint.save(ckpt, state, run.config_hash)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable.*move it away to restart"):
        train.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)


def test_a_nan_right_after_resume_is_a_corrupt_checkpoint_not_a_divergence(tmp_path, monkeypatch, one_thread):
    run, run_dir = interrupted_run(tmp_path, monkeypatch)
    ckpt = run_dir / "checkpoint.pt"
    state = checkpoint.read(ckpt, run.config_hash)
    for value in state["model"].values():  # damage that survives the checksum: written that way
        if value.is_floating_point():
            value.fill_(float("nan"))
    checkpoint.save(ckpt, state, run.config_hash)
    with pytest.raises(checkpoint.CheckpointError, match="NaN or infinite right after resuming at iteration 4"):
        train.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)
    assert not (run_dir / "result.json").exists()


def test_checkpoints_load_on_the_cpu_whatever_the_run_device(tmp_path, monkeypatch, one_thread):
    """Issue 9, item 1: loading with map_location=<the GPU> put the RNG states on the GPU, where
    torch.set_rng_state refuses them. Reproduced without a GPU: a state on another device is refused."""
    with pytest.raises((TypeError, RuntimeError)):
        torch.set_rng_state(torch.get_rng_state().to("meta"))  # what a GPU-loaded state meets
    run, run_dir = interrupted_run(tmp_path, monkeypatch)
    seen = []
    real_load = torch.load

    def spy(f, *args, map_location=None, **kw):
        seen.append(map_location)
        return real_load(f, *args, map_location=map_location, **kw)

    monkeypatch.setattr(torch, "load", spy)
    state = checkpoint.read(run_dir / "checkpoint.pt", run.config_hash)
    assert seen == ["cpu"] and state["rng"]["cpu"].device.type == "cpu"
    assert train.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)["iterations"] == 8


# --------------------------------------------------------------------------- diverged runs, full disks

def test_a_diverged_run_records_its_real_time_and_speed(tmp_path, one_thread):
    table = tables.load_table("5")
    row = {**table.row("P5"), "solver": {"base": "nesterov_50k", "lr": 1.0e10}}
    profile = {"train": {"iterations": 4, "batch_size": 8, "eval_every": 2, "checkpoint_every": 2,
                         "precision": "fp32"}, "data": {"source": "synthetic", "train_size": 64, "test_size": 32}}
    result = train.train_run(tables.resolve(table, row, 0, profile), tmp_path / "run", torch.device("cpu"),
                             tmp_path, False)
    assert result["status"] == "diverged"
    assert result["wall_s"] > 0 and 0 < result["img_per_s"] < 1e6, result


def test_torch_writer_full_disk_error_says_the_disk_is_full(tmp_path):
    def torch_full(tmp):
        Path(tmp).write_bytes(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(UserError, match="disk is full"):
        files.atomic_write(tmp_path / "model.pt", torch_full)
    assert not list(tmp_path.iterdir()), "no half-written file is left"
    with pytest.raises(UserError, match="disk is full"):
        files.atomic_write(tmp_path / "x", lambda tmp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))


def test_a_damaged_result_json_is_one_line(tmp_path, capsys, one_thread):
    assert run_p5(tmp_path) == 0
    (result,) = (tmp_path / "runs").glob("*/result.json")
    result.write_text("{not json")
    csv5(tmp_path).unlink()
    capsys.readouterr()
    one_line(capsys, run_p5(tmp_path), str(result), "unreadable")


# --------------------------------------------------------------------------- fuzz: malformed input of any shape

BAD_VALUES = {  # key -> values that are each wrong for it
    "seeds": ["0", "-1", "abc", "[a,b]", "3000000"],
    "jobs_per_device": ["0", "-3", "abc", "1.5"],
    "iterations": ["0", "-5", "abc", "1.5"],
    "batch_size": ["0", "-1", "x", "65"],  # (65: one more than the smoke profile's training images)
    "profile.train.eval_every": ["0", "-2", "x"],
    "profile.train.checkpoint_every": ["0", "y"],
    "profile.train.precision": ["fp16", "fp8", "1"],
    "profile.data.train_size": ["0", "-4"],
    "solver.lr": ["0", "-0.1", "inf", "abc"],
    "solver.weight_decay": ["-1", "5", "abc"],
    "solver.rho": ["0", "1.5", "abc"],
    "solver.eps": ["0", "2"],
    "solver.schedule.kind": ["cosine", "1"],
    "solver.schedule.gamma": ["0", "7"],
    "solver.nope": ["1"],
    "dataset.channels": ["0", "1.5", "abc"],
    "dataset.classes": ["0", "1"],
    "feed.input": ["zscore"],
    "feed.augment": ["crop", "true"],
    "feed.test_transform": ["centre_crop28"],
    "feed": ["nope"],
    "test_interval": ["0", "-5", "abc"],
    "net.bn_fraction": ["0", "1", "1.5", "abc"],
    "net.init.default": ["kaiming"],
    "net.init.on_convs": ["[99]", "[0]"],
    "net.init.gaussian_std": ["-1"],
    "net.param_mults.convs.indices": ["[99]"],
    "net.param_mults.classifier.weight.decay": ["-1"],
    "net.conv_suffix": ["{1: nope}", "{99: linear}"],
    "net.bn_after_pool": ["[1]", "[99]"],
    "net.widths": ["C41,{3}", "C0", "C-3", "41", "''", "C4 1", "C41{0}", "C{3}"],
    "net.pools_after": ["[0]", "[1,1]", "[1,2,3,4,5,6,7]", "[99]"],
    "net.kernel": ["0", "-1"],
    "net.dropout.head": ["1.5", "-0.1", "x"],
    "net.global_pool": ["median"],
    "net.downsample": ["avg_pool"],
    "net.nope": ["1"],
    "dataset": ["nope", "cifar"],
    "solver": ["sgd"],
    "arch": ["arch9"],
    "table": ["99", "nope", "9" * 5000],
    "row": ["ZZ", "99", "0"],
    "nope": ["1"],
    "results_dir": [""],
    # issue 25: what used to be found only once the run (or a sweep's second job) started, or an internal error
    "dataset.torchvision": ["Nope"],
    "solver.schedule.points": ["{0: 0.1}"],
    "solver.schedule.poly": ["{from_iter: 1}"],
    "custom.table": ["a" * 300],
    "dry_run.iters": ["100000"],
    "": ["2"],
}


def generated_command_lines(n: int, seed: int) -> list[list[str]]:
    """Command lines with one or two wrong values among otherwise good keys (a wrong value stays wrong
    whatever else is set: every value above is invalid on its own)."""
    rng = random.Random(seed)
    keys = sorted(BAD_VALUES)
    cases = []
    for _ in range(n):
        chosen = rng.sample(keys, rng.choice([1, 1, 2]))
        cases.append([f"{k}={rng.choice(BAD_VALUES[k])}" for k in chosen])
    return cases


@pytest.mark.parametrize("bad", generated_command_lines(60, seed=2026), ids=lambda b: " ".join(b))
@pytest.mark.slow
def test_fuzz_malformed_command_lines(tmp_path, capsys, bad):
    argv = ["run", "table=5", "row=P5", *SMOKE, f"runs_dir={tmp_path}/runs"]
    if not any(b.startswith("results_dir=") for b in bad):
        argv.append(f"results_dir={tmp_path}/results")
    argv += bad
    one_line(capsys, cli.main(argv))
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


TABLE_OK = {"title": "fuzz", "row_defaults": {"arch": "arch1", "dataset": "cifar10", "solver": "adadelta_30k",
                                              "iterations": 10},
            "rows": [{"id": "A", "label": "a", "net": {"widths": "C8{3}", "pools_after": [3]}}]}
TABLE_MUTATIONS = [
    lambda t: t.pop("rows"),
    lambda t: t.update(rows="not a list"),
    lambda t: t["rows"].append("a string row"),
    lambda t: t["rows"][0].pop("label"),
    lambda t: t["rows"][0].update(unknown=1),
    lambda t: t.update(unknown_key=1),
    lambda t: t["rows"].append(dict(t["rows"][0])),  # a duplicate id
    lambda t: t["rows"][0]["net"].update(widths="C8{"),
    lambda t: t["rows"][0]["net"].update(pools_after=[1, 2, 3]),
    lambda t: t["rows"][0]["net"].update(kernels={"9": 3}),
    lambda t: t["rows"][0].update(solver={"base": "adadelta_30k", "rho": -1}),
    lambda t: t["rows"][0].update(solver={"base": "nowhere"}),
    lambda t: t["rows"][0].update(dataset={"base": "cifar10", "channels": 0}),
    lambda t: t["rows"][0].update(iterations=-1),
    lambda t: t["row_defaults"].update(arch="arch99"),
    lambda t: t["rows"][0]["net"].update(dropout={"conv": {"x": 0.1}}),
    lambda t: t["rows"][0]["net"].update(dropout={"head": 3}),
]


def generated_table_files(n: int, seed: int) -> list[str]:
    import copy
    import json

    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        table = copy.deepcopy(TABLE_OK)
        for mutate in rng.sample(TABLE_MUTATIONS, rng.choice([1, 2])):
            try:
                mutate(table)
            except (KeyError, AttributeError, TypeError):
                pass  # an earlier mutation removed what this one changes: the file is broken anyway
        texts.append(json.dumps(table))  # JSON is YAML
    texts += ["rows: [", "{{{", ": :", "- just\n- a list", "title: only a title"]  # not YAML / not a table
    return texts


@pytest.mark.parametrize("text", fast_sample(generated_table_files(25, seed=7)))
def test_fuzz_malformed_table_files(tmp_path, capsys, text):
    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "tablefuzz.yaml").write_text(text)
    code = cli.main(["run", "table=fuzz", *SMOKE, f"conf_dir={root}", f"results_dir={tmp_path}/results",
                     f"runs_dir={tmp_path}/runs"])
    one_line(capsys, code)
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_the_fuzzed_table_is_valid_before_mutation(tmp_path, capsys):
    """The generator starts from a table that runs: each failure above is the mutation's doing."""
    import json

    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "tablefuzz.yaml").write_text(json.dumps(TABLE_OK))
    assert cli.main(["show", "table=fuzz", f"conf_dir={root}"]) == 0


def test_download_without_a_network_says_so_not_corrupt(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from simpnet_cli.train import data as D

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = tables.load_named("dataset", "cifar10")
    with pytest.raises(D.DatasetError, match="could not be downloaded.*no network") as err:
        D.load_split(cfg, tmp_path, True, download=True)
    assert "corrupt" not in str(err.value)


def test_report_into_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch, one_thread):
    assert run_p5(tmp_path) == 0
    results_dir = tmp_path / "results"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # what a read-only mount does (root ignores chmod, so simulate it)
        if str(self).startswith(str(results_dir)):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    capsys.readouterr()
    one_line(capsys, cli.main(["report", f"results_dir={results_dir}"]), "cannot write the report",
             "Read-only file system")


# --------------------------------------------------------------------------- issue 19: bad input is refused before
# anything trains (one line, exit 2), whatever its kind; each class of the issue has its cases here.

def run_args(tmp_path: Path, *extra: str, table: str = "5", row: str | None = "P5") -> list[str]:
    return ["run", f"table={table}", *([f"row={row}"] if row else []), *SMOKE, f"results_dir={tmp_path}/results",
            f"runs_dir={tmp_path}/runs", *extra]


def nothing_written(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "nothing may train"
    assert not list((tmp_path / "results").glob("table*.csv")) if (tmp_path / "results").exists() else True


@pytest.mark.parametrize("args, needles", [
    (["~seeds"], ["seeds", "missing"]),
    (["~table"], ["table"]),
    (["~results_dir"], ["results_dir", "missing"]),
    (["seeds=[99999999999999999999]"], ["seeds", "99999999999999999999"]),
    (["iterations=100000000000000000000"], ["iterations"]),
    (["profile.data.train_size=100000000000"], ["train_size"]),
    (["net.widths=C100000{2}", "net.pools_after=[1]", "net.init.on_convs=[]"], ["memory", "net.widths"]),
    (["net.paddings={1: 100000}"], ["memory", "net.paddings"]),
    (["profile.data.train_size=1000000000"], ["memory", "train_size"]),
    (["batch_size=10000000"], ["memory", "batch_size"]),
], ids=["delete-seeds", "delete-table", "delete-results_dir", "seed-overflow", "iterations-overflow", "train_size-overflow",
        "huge-widths", "huge-padding", "huge-data", "huge-batch"])
def test_class5_deletions_overflows_and_impossible_memory_are_one_line(tmp_path, capsys, monkeypatch, args, needles):
    """Issue 19, class 5: caught before anything trains (the memory a run needs is estimated from its network,
    batch and data, and compared with the device's), also for --dry-run, which would build the network."""
    from simpnet_cli.tools import bench

    def must_not_start(*args, **kwargs):  # were a check missed, fail here rather than exhaust the machine
        raise AssertionError("a run started")

    monkeypatch.setattr(train, "train_run", must_not_start)
    monkeypatch.setattr(bench, "measure", must_not_start)
    for mode in ([], ["--dry-run"]):
        one_line(capsys, cli.main(run_args(tmp_path, *args, *mode)), *needles)
        nothing_written(tmp_path)


@pytest.mark.parametrize("args, needles", [
    (["dataset.name=''"], ["dataset.name", "non-empty"]),
    (["arch=arch1", "net.widths=C8{3}", "net.pools_after=[3]", "custom.table=''"], ["custom.table"]),
], ids=["empty-dataset-name", "empty-custom-table"])
def test_class6_a_field_of_the_results_line_is_checked_before_training(tmp_path, capsys, args, needles):
    """Issue 19, class 6: a value that only the results line needs used to fail after training, so the run was
    never recorded and every re-run trained and failed again."""
    row = None if "arch=arch1" in args else "P5"
    argv = run_args(tmp_path, *args, row=row)
    if row is None:
        argv.remove("table=5")
    one_line(capsys, cli.main(argv), *needles)
    nothing_written(tmp_path)


def conf_dir_with(tmp_path: Path, row: dict | None = None, **table) -> Path:
    """A conf_dir holding tables/tablex.yaml: one row (``row`` over a good one) and ``table`` keys over a good
    table's."""
    import json

    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True, exist_ok=True)
    good_row = {"id": "A", "label": "a", "net": {"widths": "C8{3}", "pools_after": [3]},
                "paper": {"params": "1K", "acc": 50.0}}
    text = {"title": "t", "row_defaults": {"arch": "arch1", "dataset": "cifar10", "solver": "adadelta_30k",
                                           "iterations": 10},
            "rows": [{**good_row, **(row or {})}], **table}
    (root / "tables" / "tablex.yaml").write_text(json.dumps(text))
    return root


def run_conf_dir(tmp_path: Path, root: Path, *extra: str, command: str = "run") -> int:
    if command == "run":
        return cli.main(run_args(tmp_path, f"conf_dir={root}", *extra, table="x", row=None))
    return cli.main([command, "table=x", f"conf_dir={root}", f"results_dir={tmp_path}/results"])


@pytest.mark.parametrize("row, needles", [
    ({"id": ""}, ["row", "id", "non-empty"]),
    ({"label": ""}, ["label", "non-empty"]),
    ({"label": None}, ["label"]),
    ({"paper": {"params": None, "acc": 90.1}}, ["paper.params"]),
    ({"paper": {"params": "1K", "acc": None}}, ["paper.acc"]),
    ({"label": "two\nlines"}, ["label", "one line"]),
], ids=["empty-id", "empty-label", "null-label", "null-paper-params", "null-paper-acc", "label-newline"])
def test_class6_a_conf_dir_row_without_what_its_line_needs_is_refused(tmp_path, capsys, row, needles):
    one_line(capsys, run_conf_dir(tmp_path, conf_dir_with(tmp_path, row)), "tablex.yaml", *needles)
    nothing_written(tmp_path)


def test_class6_the_good_conf_dir_table_runs(tmp_path, capsys, one_thread):
    """The table the cases above break trains and is recorded: each refusal is the broken field's doing."""
    assert run_conf_dir(tmp_path, conf_dir_with(tmp_path)) == 0
    rows, bad = results.read(tmp_path / "results" / "tablex.csv")
    assert [r["row_id"] for r in rows] == ["A"] and not bad


@pytest.mark.parametrize("row, table, needles", [
    ({"paper": 5}, {}, ["paper", "mapping"]),
    ({"net": ["C16"]}, {}, ["net", "mapping"]),
    ({"dataset": 5}, {}, ["dataset"]),
    ({"solver": ["x"]}, {}, ["solver"]),
    ({"test_interval": "often"}, {}, ["test_interval"]),
    ({}, {"claims": "abc"}, ["claims", "list"]),
    ({}, {"claims": [{"text": "t", "holds_if": "A > B"}]}, ["claims[0].holds_if"]),
    ({}, {"cited": [5]}, ["cited[0]"]),
    ({}, {"title": ["a"]}, ["title"]),
    ({}, {"display": "percent"}, ["display"]),
    ({}, {"axis": 5}, ["axis"]),
], ids=["paper-5", "net-list", "dataset-int", "solver-list", "test_interval-text", "claims-text",
        "holds_if-text", "cited-int", "title-list", "display", "axis-int"])
def test_class7_conf_dir_values_of_the_wrong_type_are_one_line_for_every_command(tmp_path, capsys, row, table,
                                                                                    needles):
    root = conf_dir_with(tmp_path, row, **table)
    for command in ("run", "list", "report"):
        one_line(capsys, run_conf_dir(tmp_path, root, command=command), "tablex.yaml", *needles)
    nothing_written(tmp_path)


def test_class7_a_config_yaml_that_includes_itself_is_one_line(tmp_path, capsys):
    root = tmp_path / "conf"
    shutil.copytree(tables.DEFAULT_CONF_DIR, root)
    text = (root / "config.yaml").read_text().replace("defaults:\n", "defaults:\n  - config\n", 1)
    (root / "config.yaml").write_text(text)
    code = cli.main(run_args(tmp_path, f"conf_dir={root}"))
    one_line(capsys, code, "config")
    nothing_written(tmp_path)


def test_class7_a_results_file_that_is_a_folder_is_one_line_before_training(tmp_path, capsys):
    (tmp_path / "results" / "table5.csv").mkdir(parents=True)
    one_line(capsys, run_p5(tmp_path), "table5.csv", "not a file")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("column, value", [("best_iter", "inf"), ("iterations", "nan"), ("seed", "-inf"),
                                           ("params_total", "1e400"), ("seed", "1.5")])
def test_class7_inf_or_nan_in_an_integer_column_is_a_bad_line_not_a_crash(tmp_path, capsys, column, value):
    from tests.test_robustness import fake_row  # noqa: E402 - the results line the robustness tests write

    path = results.csv_path(tmp_path / "results", "5")
    lines = [results.format_line(fake_row("P5")), results.format_line(fake_row("P3", status="diverged"))]
    results.write(path, lines)
    text = path.read_text().splitlines()
    header = text[0].split(",")
    for n in (1, 2):  # an ok line and a diverged one (whose accuracies may be NaN, but never its counts)
        fields = next(iter(__import__("csv").reader([text[n]])))
        fields[header.index(column)] = value
        text[n] = ",".join(fields)
    path.write_text("\n".join(text) + "\n")
    rows, bad = results.read(path)
    assert not rows and len(bad) == 2 and all(column in b.why for b in bad), [str(b) for b in bad]
    if column == "best_iter":  # (the report reads the file as repair does; once is enough: it is slow)
        assert cli.main(["report", "table=5", f"results_dir={tmp_path}/results"]) == 0
    assert cli.main(["repair", "table=5", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "not-gzip"])
def test_class7_a_truncated_dataset_archive_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, damage):
    import gzip

    copy = tmp_path / "system_copy"
    copy.mkdir()
    whole = gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 4000)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (copy / name).write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"not a gzip file")
    argv = ["run", "table=13", "row=slim-300K", "device=cpu", "quiet=true", f"data_dir={tmp_path}/data",
            f"dataset.system_copy={copy}", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]
    one_line(capsys, cli.main(argv), "damaged", str(copy))
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file()], "no partial file is left to be read"


def diverging_run_interrupted_after_its_checkpoint(tmp_path: Path, monkeypatch) -> tuple[tables.RunSpec, Path]:
    """A run whose learning rate jumps to 1e30 at iteration 4, killed right after its checkpoint there: its
    loss turns NaN at the first steps after the resume."""
    row = {**tables.load_table("5").row("P5"), "solver": {"base": "nesterov_50k",
                                                          "schedule": {"kind": "piecewise",
                                                                       "points": {0: 0.01, 4: 1.0e30}}}}
    return interrupted_run(tmp_path, monkeypatch, row, iterations=12)


def test_class8_a_divergence_right_after_a_resume_is_recorded_as_diverged(tmp_path, monkeypatch, one_thread):
    """Issue 19, class 8: the NaN right after the resume was taken for a corrupt checkpoint, so the run could
    never finish. The checkpoint is checked when it is restored (its weights, solver state and loss are
    finite), so the NaN that follows is the run's own divergence."""
    run, run_dir = diverging_run_interrupted_after_its_checkpoint(tmp_path, monkeypatch)
    result = train.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)
    assert result["status"] == "diverged" and 4 < result["iterations"] <= 12, result
    assert (run_dir / "result.json").exists()


def test_class8_a_checkpoint_with_nan_solver_state_is_still_refused(tmp_path, monkeypatch, one_thread):
    run, run_dir = interrupted_run(tmp_path, monkeypatch)
    ckpt = run_dir / "checkpoint.pt"
    state = checkpoint.read(ckpt, run.config_hash)
    for buffers in state["optimizer"]["state"].values():
        for value in buffers.values():
            if torch.is_tensor(value) and value.is_floating_point():
                value.fill_(float("inf"))
    checkpoint.save(ckpt, state, run.config_hash)
    with pytest.raises(checkpoint.CheckpointError, match="solver state.*NaN or infinite right after resuming"):
        train.train_run(run, run_dir, torch.device("cpu"), tmp_path, False)
    assert not (run_dir / "result.json").exists()


# --------------------------------------------------------------------------- issue 19: fuzz, every key, every type

# Values of every type, as a command line writes them (Hydra's grammar): whole numbers of every size, floats
# (also non-finite), booleans, null, texts (also paths and reserved words), lists and mappings.
FUZZ_VALUES = ["0", "-1", "2", "1099511627776", "99999999999999999999", "1.5", "-0.0", "inf", "nan", "1e300",
               "true", "false", "null", "abc", "''", "../x", "all", "[]", "[1,2]", "[a]", "{a: 1}", "{}"]
FUZZ_ROW_KEYS = ["iterations", "batch_size", "test_interval", "arch", "dataset", "feed", "solver", "net.widths",
                 "net.pools_after", "net.kernel", "net.kernels", "net.paddings", "net.groups", "net.dropout.head",
                 "net.dropout.conv", "net.bn_fraction", "net.init.default", "net.init.on_convs", "net.conv_suffix",
                 "net.param_mults.convs.indices", "net.global_pool", "solver.lr", "solver.momentum",
                 "solver.weight_decay", "solver.schedule", "solver.schedule.steps", "solver.schedule.gamma",
                 "dataset.name", "dataset.classes", "dataset.size", "dataset.channels", "dataset.extra",
                 "feed.augment", "feed.input", "dataset.torchvision", "solver.schedule.points"]
FUZZ_TOP_KEYS = sorted({"table", "row", "seeds", "conf_dir", "data_dir", "download", "results_dir", "runs_dir",
                        "device", "jobs_per_device", "precision", "svhn_extra", "quiet", "logger", "dry_run.iters",
                        "dry_run.batch_size", "custom.table", "custom.iterations", "custom.dataset",
                        "profile.name", "profile.device", "profile.train.batch_size", "profile.train.eval_every",
                        "profile.train.checkpoint_every", "profile.train.precision", "profile.train.graphs",
                        "profile.data.train_size", "profile.data.test_size", "profile.data.source"})
# Values of every type as a table file holds them (YAML), for each field of a table and of its row.
FUZZ_FILE_VALUES = [0, -1, 7, 2**40, 10**20, 1.5, float("inf"), float("nan"), True, False, None, "", "abc",
                    "../x", [], [1, 2], ["C16"], {}, {"a": 1}, {"base": "nowhere"}]
FUZZ_FILE_FIELDS = ["title", "display", "axis", "cited", "claims", "note", "row_defaults", "rows",
                    "row.id", "row.label", "row.arch", "row.dataset", "row.solver", "row.feed", "row.iterations",
                    "row.test_interval", "row.net", "row.paper", "row.note", "row.net.widths",
                    "row.net.pools_after", "row.paper.params", "row.paper.acc"]


def fuzz_command_lines(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    keys = FUZZ_ROW_KEYS + FUZZ_TOP_KEYS
    return [(key, rng.choice(FUZZ_VALUES)) for key in rng.sample(keys, n)]


def fuzz_file_fields(n: int, seed: int) -> list[tuple[str, object]]:
    rng = random.Random(seed)
    return [(field, rng.choice(FUZZ_FILE_VALUES)) for field in
            [rng.choice(FUZZ_FILE_FIELDS) for _ in range(n)]]


def check_outcome(code: int, err: str, out: str, names: tuple[str, ...]) -> list[dict]:
    """Exit 0 with the resolved runs on stdout, or exit 2 with one line naming the key; never a traceback."""
    import yaml

    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        docs = [d for d in yaml.safe_load_all(out) if d]
        assert docs, "exit 0 must plan runs"
        return docs
    assert code == 2, f"exit {code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simpnet: error: "), err
    assert any(name.lower() in lines[0].lower() for name in names), f"none of {names} in {lines[0]!r}"
    return []


@pytest.mark.parametrize("key, value", fast_sample(fuzz_command_lines(len(FUZZ_ROW_KEYS + FUZZ_TOP_KEYS), seed=19)),
                         ids=lambda v: str(v))
def test_fuzz_every_key_with_values_of_every_type(tmp_path, capsys, key, value):
    """Issue 19: each key, row or top-level, with a value of a random type: validated (--cfg job plans and
    checks every run as `simpnet run` would, and trains nothing)."""
    argv = ["run", "table=5", "row=P5", "profile=smoke", f"results_dir={tmp_path}/results",
            f"runs_dir={tmp_path}/runs"]
    argv = [a for a in argv if a.split("=")[0] != key] + [f"{key}={value}", "--cfg", "job"]
    code = cli.main(argv)
    got = capsys.readouterr()
    # named by the key or its last part (the message says `net.widths=...` or `widths: ...`); a group choice
    # that names no config is said by Hydra as "dataset/abc"
    docs = check_outcome(code, got.err, got.out, (key, key.split(".")[-1]))
    if docs and key in FUZZ_ROW_KEYS:
        # A record is correct when it names the key in its variant or computes what the paper's row computes.
        (plain,) = planned_runs(["table=5", "row=P5", "profile=smoke"])
        for doc in docs:
            assert key in doc["variant"] or doc["config_hash"] == plain.config_hash, (key, value, doc["variant"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def planned_runs(args: list[str]):
    cfg, variant = commands.compose(args)
    return commands.plan_runs(cfg, variant)


@pytest.mark.parametrize("field, value", fast_sample(fuzz_file_fields(30, seed=19)), ids=lambda v: repr(v)[:30])
def test_fuzz_every_conf_dir_field_with_values_of_every_type(tmp_path, capsys, field, value):
    import copy

    import yaml

    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    table = copy.deepcopy(TABLE_OK)
    part, _, name = field.partition(".")
    target = table if part != "row" else table["rows"][0]
    *inner, last = name.split(".") if part == "row" else [field]
    for step in inner:
        target = target.setdefault(step, {})
    target[last] = value
    (root / "tables" / "tablefuzz.yaml").write_text(yaml.safe_dump(table))
    code = cli.main(["run", "table=fuzz", "profile=smoke", f"conf_dir={root}", f"results_dir={tmp_path}/results",
                     f"runs_dir={tmp_path}/runs", "--cfg", "job"])
    got = capsys.readouterr()
    docs = check_outcome(code, got.err, got.out, (last, "tablefuzz.yaml"))
    for doc in docs:
        assert doc["table"] == "fuzz" and doc["row_id"] == str(table["rows"][0]["id"]), doc


# --------------------------------------------------------------------------- issue 19, class 10: bad input accepted

@pytest.mark.parametrize("args, needles", [
    (["seeds=[1.5]"], ["seeds", "1.5"]),
    (["seeds='\"12\"'"], ["seeds", "12"]),
    (["seeds=[true,false]"], ["seeds", "True"]),
    (["seeds=[0,0]"], ["seeds", "once"]),
    (["seeds=[]"], ["seeds"]),
    (["download=no"], ["download", "true or false"]),
    (["quiet=yes"], ["quiet", "true or false"]),
    (["svhn_extra=no"], ["svhn_extra"]),
    (["row=[]"], ["row", "empty"]),
    (["+foo=1"], ["foo", "unknown key"]),
    (["+profile.foo=1"], ["profile.foo", "unknown key"]),
    (["+custom.foo=1"], ["custom.foo", "unknown key"]),
    (["logger=5"], ["logger"]),
    (["dataset=null"], ["dataset"]),
    (["arch=2"], ["arch"]),
    (["--json"], ["--json", "run does not take"]),
], ids=["seed-float", "seed-quoted", "seed-bools", "seed-twice", "seeds-empty", "download-no", "quiet-yes",
        "svhn_extra-no", "row-empty", "plus-key", "plus-profile-key", "plus-custom-key", "logger-int",
        "dataset-null", "arch-int"] + ["run-json"])
def test_class10_values_of_the_wrong_kind_are_refused_not_read_loosely(tmp_path, capsys, args, needles):
    one_line(capsys, cli.main(run_args(tmp_path, *args)), *needles)
    nothing_written(tmp_path)


def test_class10_an_empty_table_selection_and_ignored_flags_are_refused(tmp_path, capsys):
    one_line(capsys, cli.main(run_args(tmp_path, table="[]", row=None)), "table", "empty")
    one_line(capsys, cli.main(["list", "--latex"]), "list does not take --latex")
    one_line(capsys, cli.main(["report", "--dry-run", f"results_dir={tmp_path}/results"]), "--dry-run")
    nothing_written(tmp_path)


# --------------------------------------------------------------------------- issue 19, class 11: names, not paths

@pytest.mark.parametrize("command, args, needles", [
    ("run", ["arch=arch1", "net.widths=C8{3}", "net.pools_after=[3]", "custom.table=../../../escape"],
     ["custom.table"]),
    ("run", ["arch=arch1", "net.widths=C8{3}", "net.pools_after=[3]", "custom.table=all"], ["custom.table", "reserved"]),
    ("run", ["arch=arch1", "net.widths=C8{3}", "net.pools_after=[3]", "custom.table=null"], ["custom.table"]),
    ("run", ["table=../tables/table2"], ["table", "../tables/table2"]),
    ("run", ["table=5", "profile.name=../../x"], ["profile.name"]),
    ("run", ["table=5", "dataset=../dataset/cifar100"], ["dataset"]),
    ("repair", ["table=../../x"], ["table", "../../x"]),
    ("report", ["table=../tables/table2"], ["table"]),
    ("list", ["table=/etc/passwd"], ["table"]),
], ids=["custom-escape", "custom-all", "custom-null", "table-path", "profile-path", "dataset-path", "repair-path",
        "report-path", "list-absolute"])
def test_class11_names_that_are_paths_or_reserved_words_are_refused(tmp_path, capsys, command, args, needles):
    argv = [command, *args, f"results_dir={tmp_path}/results"] + (
        [f"runs_dir={tmp_path}/runs", *SMOKE] if command in ("run", "repair") else [])
    if command == "run":
        argv = [a for a in argv if a != "quiet=true"]
    one_line(capsys, cli.main(argv), *needles)
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("*.md"))


def test_class11_repair_takes_a_list_of_tables(tmp_path, capsys, finished_run):
    (p5,) = planned_runs(["table=5", "row=P5", "profile=smoke"])
    (l8,) = planned_runs(["table=2", "row=8L", "profile=smoke"])
    finished_run(p5, tmp_path / "results", tmp_path / "runs")
    finished_run(l8, tmp_path / "results", tmp_path / "runs")
    assert cli.main(["repair", "table=[2,5]", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["table2.csv", "table5.csv"]


def test_run_never_writes_outside_results_dir_and_runs_dir_whatever_the_names(tmp_path, capsys, one_thread,
                                                                             monkeypatch):
    """Issue 19: a run writes only under results_dir and runs_dir, whatever its table, row, label, dataset and
    profile are called (names that look like paths are refused, names that are text are kept as text)."""
    import json

    home = tmp_path / "home"
    conf = home / "conf"
    (conf / "tables").mkdir(parents=True)
    odd = {"title": "../../t", "row_defaults": {"arch": "arch1", "dataset": "cifar10", "solver": "adadelta_30k",
                                                "iterations": 10},
           "rows": [{"id": "../../../escape", "label": "/tmp/escape\nline", "net": {"widths": "C8{3}",
                                                                                    "pools_after": [3]},
                     "paper": {"params": "../p", "acc": "/a"}}]}
    (conf / "tables" / "tableodd.yaml").write_text(json.dumps(odd))
    conf2 = home / "conf2"
    (conf2 / "tables").mkdir(parents=True)
    odd["rows"][0]["label"] = "/tmp/escape"
    (conf2 / "tables" / "tableodd.yaml").write_text(json.dumps(odd))
    cwd = home / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = {p for p in tmp_path.rglob("*")}
    out, runs = cwd / "out" / "results", cwd / "out" / "runs"
    common = [*SMOKE, f"results_dir={out}", f"runs_dir={runs}"]
    attempts = [
        ["run", "table=odd", f"conf_dir={conf}", "dataset.name=../../ds", "variant=x"],
        ["run", "table=odd", f"conf_dir={conf}", "dataset.name=../../ds"],  # (the label's newline: refused)
        ["run", "table=odd", f"conf_dir={conf2}", "dataset.name=../../ds"],
        ["run", "arch=arch1", "net.widths=C8{3}", "net.pools_after=[3]", "custom.table=../../escape"],
        ["run", "arch=arch1", "net.widths=C8{3}", "net.pools_after=[3]", "custom.table=mine"],
        ["run", "table=../../tables/table5"],
        ["run", "table=5", "row=P5", "profile.name=../../p"],
    ]
    codes = []
    for argv in attempts:
        codes.append(cli.main([*argv, *common]))
    assert codes == [2, 2, 0, 2, 0, 2, 2], (codes, capsys.readouterr().err)
    new = {p for p in tmp_path.rglob("*")} - before
    outside = sorted(str(p) for p in new if not (p == out.parent or out in p.parents or p == out
                                                 or runs in p.parents or p == runs))
    assert not outside, outside
    assert (out / "tableodd.csv").exists() and (out / "tablemine.csv").exists()
    rows, bad = results.read(out / "tableodd.csv")
    assert [(r["row_id"], r["row"], r["dataset"]) for r in rows] == [("../../../escape", "/tmp/escape",
                                                                      "../../ds")] and not bad


# --------------------------------------------------------------------------- issue 19, class 12: all before any

def test_class12_a_sweep_checks_every_job_where_it_will_run_before_the_first(tmp_path, capsys):
    """Job 1 is good; job 2 names a device this machine lacks, or a results_dir under a file: nothing trains."""
    (tmp_path / "afile").write_text("a file\n")
    base = ["run", "-m", "table=5", "row=P5", *SMOKE, f"runs_dir={tmp_path}/runs", f"hydra.sweep.dir={tmp_path}/sw"]
    import torch as _torch

    missing = f"cuda:{_torch.cuda.device_count()}"
    one_line(capsys, cli.main([*base, f"results_dir={tmp_path}/results", f"device=cpu,{missing}"]), "device")
    one_line(capsys, cli.main([*base, f"results_dir={tmp_path}/results,{tmp_path}/afile/results"]), "results_dir",
             "not writable")
    nothing_written(tmp_path)


def test_class12_a_missing_dataset_stops_the_command_before_the_available_one_trains(tmp_path, capsys):
    """A table of two rows: one on Fashion-MNIST (its system copy is on disk), one on MNIST (nowhere): the MNIST
    row's missing data is found before the Fashion-MNIST row trains."""
    from tests.conftest import FASHION_SYSTEM_COPY, NO_FASHION

    if not FASHION_SYSTEM_COPY.is_dir():
        pytest.skip(NO_FASHION)
    root = conf_dir_with(tmp_path, {"dataset": "fashion_mnist"})
    table = (root / "tables" / "tablex.yaml").read_text()
    import json

    doc = json.loads(table)
    doc["rows"].append({**doc["rows"][0], "id": "B", "dataset": "mnist"})
    (root / "tables" / "tablex.yaml").write_text(json.dumps(doc))
    code = run_conf_dir(tmp_path, root, "profile.data.source=null", f"data_dir={tmp_path}/data")
    one_line(capsys, code, "dataset mnist not found")
    nothing_written(tmp_path)


# --------------------------------------------------------------------------- issue 19, class 9: crashes and hangs

def test_class9_seeds_30000_resolves_each_row_once(tmp_path, monkeypatch):
    """The configs were read again for every seed (seeds=30000 --dry-run: minutes before the first line)."""
    reads = []
    real = tables._yaml
    monkeypatch.setattr(tables, "_yaml", lambda path: reads.append(path) or real(path))
    runs = planned_runs(["table=5", "row=[P5,P3]", "profile=smoke", "seeds=30000"])
    assert len(runs) == 60000 and len({r.config_hash for r in runs}) == 60000
    assert len(reads) < 20, len(reads)
    p3 = tables.resolve(tables.load_table("5"), tables.load_table("5").row("P3"), 29999,
                        tables.load_named("profile", "smoke"))
    assert runs[-1].config_hash == p3.config_hash and runs[-1].seed == 29999  # a copy, the same identity


@pytest.mark.parametrize("stream", ["full", "closed-pipe"])
def test_class9_an_unwritable_stderr_never_stops_a_run(tmp_path, monkeypatch, one_thread, stream):
    """`2>/dev/full` killed the run; `2>&1 | head -c 1` exited 0 having recorded nothing."""
    if stream == "full":
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full here")
        err = open("/dev/full", "w", buffering=1)
    else:
        r, w = os.pipe()
        os.close(r)  # the reader left
        err = os.fdopen(w, "w", buffering=1)
    monkeypatch.setattr("sys.stderr", err)
    try:
        code = cli.main(["run", "table=5", "row=P5", "profile=smoke", f"results_dir={tmp_path}/results",
                         f"runs_dir={tmp_path}/runs"])
    finally:
        monkeypatch.undo()
        try:
            err.close()
        except OSError:
            pass
    assert code == 0
    rows, bad = results.read(csv5(tmp_path))
    assert [r["row_id"] for r in rows] == ["P5"] and not bad


# --------------------------------------------------------------------------- issue 25, item 6: all of a command is
# checked before its first job trains (sweeps, packed runs, the dry run's own limits)

L8 = ["table=2", "row=8L"]
# (key, a good value, a bad one): the bad one must be refused before anything trains, alone and as the second
# job of a sweep whose first job is good.
BEFORE_THE_FIRST_JOB = [
    ("batch_size", "8", "100", ["fewer than one batch of 100"]),           # smoke data: 64 images
    ("batch_size", "8", "1", ["BatchNorm", "1x1", "batch_size=2"]),        # with the pools below: a 1x1 map
    ("seeds", "1", "3000000", ["3,000,000 runs", "at most"]),
    ("row", "8L", "0", ["no row 0", "by id", "8L"]),
    ("dataset.torchvision", "CIFAR10", "Nope", ["dataset.torchvision", "CIFAR10"]),
    ("solver.schedule.points", None, "{0: 0.1}", ["does not read points", "kind=piecewise"]),
    ("custom.table", "mine", "a" * 300, ["custom.table", "at most 100"]),
    ("table", "2", "9" * 5000, ["table", "5000 digits"]),
    ("dry_run.iters", "1", "100000", ["dry_run.iters", "at most 1000"]),
    ("", None, "2", ["'=2'", "no key"]),
]


@pytest.fixture
def nothing_may_train(monkeypatch):
    from simpnet_cli.tools import bench

    def must_not_start(*args, **kwargs):  # were a check missed, fail here rather than train or time
        raise AssertionError("a run started")

    monkeypatch.setattr(train, "train_run", must_not_start)
    monkeypatch.setattr(bench, "measure", must_not_start)


@pytest.mark.parametrize("key, good, bad, needles", BEFORE_THE_FIRST_JOB,
                         ids=[f"{k or 'no-key'}={b[:12]}" for k, _, b, _ in BEFORE_THE_FIRST_JOB])
def test_item6_fuzz_a_bad_value_is_refused_alone_and_as_a_sweeps_second_job(tmp_path, capsys, nothing_may_train,
                                                                             key, good, bad, needles):
    """`simpnet run -m ... batch_size=8,100` trained job 1, then job 2 failed: every job's runs are planned and
    checked (data size, BatchNorm, memory, folders) before the first starts; and alone, each value is one line."""
    extra = ["net.pools_after=[1,2,3,4,5]"] if bad == "1" else []
    base = [*L8, *SMOKE, *extra, f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]
    base = [a for a in base if not a.startswith(f"{key}=")] if key else base
    one_line(capsys, cli.main(["run", *base, f"{key}={bad}"]), *needles)
    if good is not None:
        sweep = ["run", "-m", *base, f"{key}={good},{bad}", f"hydra.sweep.dir={tmp_path}/sweep"]
        one_line(capsys, cli.main(sweep), *needles)
    nothing_written(tmp_path)


def test_item6_packed_runs_and_the_dry_run_check_their_limits_first(tmp_path, capsys, nothing_may_train):
    """jobs_per_device=2 checks every run before any of them trains; --dry-run checks its own batch (memory,
    BatchNorm) and its run count before it builds or times anything."""
    base = ["run", *L8, *SMOKE, f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]
    one_line(capsys, cli.main([*base, "jobs_per_device=2", "seeds=2", "batch_size=100"]), "fewer than one batch")
    one_line(capsys, cli.main([*base, "--dry-run", "dry_run.batch_size=100000"]), "dry_run.batch_size", "memory")
    one_line(capsys, cli.main([*base, "--dry-run", "dry_run.batch_size=1", "net.pools_after=[1,2,3,4,5]"]),
             "dry_run.batch_size=1", "BatchNorm")
    one_line(capsys, cli.main([*base, "--dry-run", "seeds=3000000"]), "at most 100,000")
    nothing_written(tmp_path)


def test_item6_the_batchnorm_check_walks_into_residual_blocks_and_fire_modules():
    """batch x height x width > 1 at every BatchNorm: 8L with five poolings meets a 1x1 map (fine at batch 2,
    refused at batch 1); the shapes of residual blocks (their BatchNorm after the pool inside) and fire modules
    are walked too, so each family's BatchNorms are all seen."""
    from simpnet_cli.nets import specs as network

    (run,) = planned_runs([*L8, "profile=smoke", "net.pools_after=[1,2,3,4,5]"])
    network.check_batchnorm_batch(run.spec, run.in_shape, 2)
    with pytest.raises(network.NetworkError, match="layer 11"):
        network.check_batchnorm_batch(run.spec, run.in_shape, 1)
    from simpnet_cli.nets import modules as M

    for row in (["table=6", "row=RN32-max"], ["table=6", "row=RN32-strided"], ["table=11", "row=SQ-SAF"],
                ["table=11", "row=SN-SAF"], ["table=2", "row=8L"]):
        (plain,) = planned_runs([*row, "profile=smoke"])
        norms: list = []
        network._walk(plain.spec, plain.in_shape, "", norms)
        model = M.build_model(plain.spec, plain.in_shape, plain.net)
        assert len(norms) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), row
        network.check_batchnorm_batch(plain.spec, plain.in_shape, 2)


# --------------------------------------------------------------------------- issue 25, item 7: no internal error,
# no C++ abort: one line and exit 2

@pytest.fixture(scope="module")
def finished_p5(tmp_path_factory) -> Path:
    """One trained run folder (P5, smoke) for the export cases."""
    root = tmp_path_factory.mktemp("p5")
    torch.set_num_threads(1)
    assert cli.main(["run", "table=5", "row=P5", *SMOKE, f"results_dir={root}/results", f"runs_dir={root}/runs"]) == 0
    (run_dir,) = (root / "runs").glob("*/model.pt")
    return run_dir.parent


def refusing_writes(monkeypatch, under: Path, err: int, text: str) -> None:
    """What a read-only mount or a full disk does to a write under ``under`` (root ignores chmod)."""
    real_write = Path.write_bytes

    def refuse(self, data):
        if str(self).startswith(str(under)):
            raise OSError(err, text, str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)


@pytest.mark.parametrize("case", ["missing-folder", "a-folder", "read-only", "full-disk", "dev-full"])
def test_item7_export_that_cannot_write_is_one_line(finished_p5, tmp_path, capsys, monkeypatch, case):
    """`simpnet export` to a missing folder or onto a folder was torch's RuntimeError; a full disk aborted the
    process (rc -6, a C++ stack trace). No half-written file is left."""
    out = {"missing-folder": tmp_path / "nowhere" / "m.ts", "a-folder": tmp_path,
           "read-only": None, "full-disk": tmp_path / "m.ts", "dev-full": Path("/dev/full")}[case]
    if case == "dev-full" and not out.exists():
        pytest.skip("no /dev/full here")
    if case == "read-only":
        refusing_writes(monkeypatch, finished_p5, errno.EROFS, "Read-only file system")
    if case == "full-disk":
        refusing_writes(monkeypatch, tmp_path, errno.ENOSPC, "No space left on device")
    before = sorted(p.name for p in finished_p5.iterdir())
    argv = ["export", f"run_dir={finished_p5}"] + ([f"out={out}"] if out is not None else [])
    needles = {"missing-folder": ["does not exist"], "a-folder": ["is a folder"], "read-only": ["Read-only"],
               "full-disk": ["disk is full"], "dev-full": ["disk is full"]}[case]
    one_line(capsys, cli.main(argv), *needles)
    assert sorted(p.name for p in finished_p5.iterdir()) == before
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_item7_export_writes_a_loadable_file_and_load_model_refuses_a_missing_cuda(finished_p5, tmp_path, capsys):
    """The export still works (through memory, then a Python write); load_model(device='cuda') without CUDA is
    a UserError, not torch's 'Found no NVIDIA driver' RuntimeError."""
    import simpnet_cli

    assert cli.main(["export", f"run_dir={finished_p5}", f"out={tmp_path}/m.ts"]) == 0
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), simpnet_cli.load_model(finished_p5)(x))
    assert capsys.readouterr().err == "", "no deprecation notices from torch.jit.trace"
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: device='cuda' works")
    with pytest.raises(UserError, match="no CUDA device"):
        simpnet_cli.load_model(finished_p5, device="cuda")


def test_item7_a_results_file_or_lock_that_is_a_folder_and_a_result_that_is_no_number(tmp_path, capsys,
                                                                                      finished_run):
    (run,) = planned_runs(["table=5", "row=P5", "profile=smoke"])
    dirs = [f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]
    (tmp_path / "results" / "table5.csv").mkdir(parents=True)
    one_line(capsys, cli.main(["repair", "table=5", *dirs]), "table5.csv", "not a file")
    one_line(capsys, cli.main(["repair", *dirs]), "table5.csv", "not a file")
    (tmp_path / "results" / "table5.csv").rmdir()
    (tmp_path / "runs" / run.config_hash / ".lock").mkdir(parents=True)
    one_line(capsys, run_p5(tmp_path), ".lock", "remove it")
    shutil.rmtree(tmp_path / "runs")
    # A finished run whose result.json holds final_acc "abc": the next command said "already recorded" and
    # wrote no line; it is refused, naming the folder and the field.
    finished_run(run, tmp_path / "results", tmp_path / "runs", final_acc="abc")
    one_line(capsys, run_p5(tmp_path), run.config_hash, "final_acc", "move the folder away")
    assert not csv5(tmp_path).exists() or not results.read(csv5(tmp_path))[0]


@pytest.mark.parametrize("text, needles", [
    ("defaults: [\n", ["config.yaml", "while parsing"]),
    ("defaults: 5\n", ["config.yaml", "defaults must be a list"]),
    ("- a\n- b\n", ["config.yaml", "DictConfig"]),
    ("a: ${oc.env:X\n", ["config.yaml"]),
], ids=["not-yaml", "defaults-int", "a-list", "open-interpolation"])
def test_item7_a_malformed_conf_dir_config_yaml_is_one_line_naming_it(tmp_path, capsys, text, needles):
    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    (root / "config.yaml").write_text(text)
    for sweep in ([], ["-m"]):
        code = cli.main(["run", *sweep, "table=5", *SMOKE, f"conf_dir={root}", "--cfg", "job"])
        one_line(capsys, code, *needles)


def test_item7_a_deleted_working_directory_and_a_closed_stderr(tmp_path):
    """The two cases where the process itself is the point: a working directory deleted under the command
    (FileNotFoundError without a file name) and `2>&-` (sys.stderr is None: printing the error line failed,
    exit 1; the next file opened would have been fd 2)."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("simpnet")
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f"cd {gone} && rmdir {gone} && exec {exe} list"
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("simpnet: error: the working directory no longer exists"), proc.stderr
    proc = subprocess.run(["sh", "-c", f"exec {exe} run table=5 row=nope 2>&-"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)


# --------------------------------------------------------------------------- issue 25, item 8: words that do not
# mislead

def test_item8_rows_are_chosen_by_id_never_by_position(tmp_path, capsys):
    """`row=0` trained the first row; in a table with a row whose id is 0 after another, it still took the first."""
    one_line(capsys, cli.main(run_args(tmp_path, table="2", row="0")), "no row 0", "by id", "8L, 9L")
    root = conf_dir_with(tmp_path)
    doc = __import__("json").loads((root / "tables" / "tablex.yaml").read_text())
    doc["rows"].append({**doc["rows"][0], "id": 0, "label": "zero"})
    (root / "tables" / "tablex.yaml").write_text(__import__("json").dumps(doc))
    runs = planned_runs(["table=x", "row=0", "profile=smoke", f"conf_dir={root}"])
    by_label = planned_runs(["table=x", "row=zero", "profile=smoke", f"conf_dir={root}"])
    assert [r.row_id for r in runs] == ["0"] and [r.row_id for r in by_label] == ["0"]
    nothing_written(tmp_path)


def test_item8_a_table_file_named_table_yaml_is_the_table_named_table(tmp_path, capsys):
    """It was listed, then refused by name with "got ''"."""
    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    shutil.copy(tables.DEFAULT_CONF_DIR / "tables" / "table5.yaml", root / "tables" / "table.yaml")
    (run,) = planned_runs(["table=table", "row=P5", "profile=smoke", f"conf_dir={root}"])
    assert run.table == "table"
    code = cli.main(["repair", "table=table", f"conf_dir={root}", f"results_dir={tmp_path}/results",
                     f"runs_dir={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 0 and f"{tmp_path}/results/tabletable.csv: unchanged" in err, err


def test_item8_an_unquoted_non_ascii_value_is_told_to_quote_it(tmp_path, capsys):
    own = ["run", "arch=arch1", "net.widths=C8{3}", "net.pools_after=[3]", *SMOKE, "--cfg", "job"]
    one_line(capsys, cli.main([*own, "custom.label=héllo"]), "custom.label=héllo", "needs quotes", "'é'")
    assert cli.main([*own, "custom.label='héllo wörld'"]) == 0


def test_item8_a_data_dir_that_cannot_hold_the_data_is_not_blamed_on_the_system_copy(tmp_path, capsys,
                                                                                    monkeypatch):
    """A data_dir that is a file, or one the copy cannot be unpacked into, was "the system copy ... is damaged"."""
    import gzip

    copy = tmp_path / "system_copy"
    copy.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (copy / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 64))
    argv = ["run", "table=13", "row=slim-300K", "device=cpu", "quiet=true", f"dataset.system_copy={copy}",
            f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]
    (tmp_path / "afile").write_text("not a folder\n")
    err = one_line(capsys, cli.main([*argv, f"data_dir={tmp_path}/afile"]), "data_dir", "not a folder")
    assert "system copy" not in err
    real_open = open

    def unwritable(path, mode="r", *args, **kwargs):  # a folder the unpacked copy cannot be written into
        if "w" in mode and str(path).startswith(str(tmp_path / "data")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", unwritable)
    err = one_line(capsys, cli.main([*argv, f"data_dir={tmp_path}/data"]), "data_dir", "Permission denied")
    assert "system copy" not in err and "damaged" not in err


def test_item8_a_schedule_key_its_kind_does_not_read_is_refused_not_a_variant(tmp_path, capsys):
    """`solver.schedule.points` on a multistep schedule trained the paper's schedule as a variant under a new
    hash. Refused, and why: the researcher meant to change the schedule, and a run recorded as the paper's row (or
    as a variant that is not one) would hide that nothing changed. With kind=piecewise the points are a variant."""
    one_line(capsys, cli.main(run_args(tmp_path, "solver.schedule.points={0: 0.1}")), "solver.schedule.points",
             "multistep schedule does not read points", "solver.schedule.kind=piecewise")
    one_line(capsys, cli.main(run_args(tmp_path, "solver.schedule={kind: multistep, gamma: 0.1, steps: [2], "
                                                 "poly: {from_iter: 1}}")), "does not read poly")
    (plain,) = planned_runs(["table=5", "row=P5", "profile=smoke"])
    (piecewise,) = planned_runs(["table=5", "row=P5", "profile=smoke", "solver.schedule.kind=piecewise",
                                 "solver.schedule.points={0: 0.1}"])
    assert piecewise.config_hash != plain.config_hash and "solver.schedule.points" in piecewise.variant
    # switching a piecewise row to multistep keeps working: the points left from its file are not the command's
    (switched,) = planned_runs(["table=13", "row=slim-300K", "profile=smoke", "solver.schedule.kind=multistep",
                                "solver.schedule.gamma=0.1", "solver.schedule.steps=[2]"])
    assert switched.solver["schedule"]["kind"] == "multistep"
    nothing_written(tmp_path)
