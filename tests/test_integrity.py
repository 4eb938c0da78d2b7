"""Nothing wrong is ever recorded (issue 11): results files that cannot be read back are rebuilt from the run
folders without losing or duplicating a run, checkpoints are checksummed and refused when damaged, diverged
runs record their real time, and malformed input of any shape ends in one line with exit 2 before anything
is written.
"""
from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import torch

from simpnet_cli import cli, files
from simpnet_cli.train import checkpoint
from simpnet_cli.runs import results
from simpnet_cli.config import tables
from simpnet_cli.train import loop as train
from simpnet_cli.errors import UserError

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

def interrupted_run(tmp_path: Path, monkeypatch) -> tuple[tables.RunSpec, Path]:
    """A run killed right after its checkpoint at iteration 4."""
    table = tables.load_table("5")
    profile = {"train": {"iterations": 8, "batch_size": 8, "eval_every": 4, "checkpoint_every": 4,
                         "precision": "fp32"}, "data": {"source": "synthetic", "train_size": 40, "test_size": 16}}
    run = tables.resolve(table, table.row("P5"), 0, profile)
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
    "seeds": ["0", "-1", "abc", "[a,b]"],
    "jobs_per_device": ["0", "-3", "abc", "1.5"],
    "iterations": ["0", "-5", "abc", "1.5"],
    "batch_size": ["0", "-1", "x"],
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
    "table": ["99", "nope"],
    "row": ["ZZ", "99"],
    "nope": ["1"],
    "results_dir": [""],
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


@pytest.mark.parametrize("text", generated_table_files(25, seed=7))
def test_fuzz_malformed_table_files(tmp_path, capsys, text):
    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "tablefuzz.yaml").write_text(text)
    try:
        code = cli.main(["run", "table=fuzz", *SMOKE, f"conf_dir={root}", f"results_dir={tmp_path}/results",
                         f"runs_dir={tmp_path}/runs"])
    finally:
        tables.use_conf_dir(None)
    one_line(capsys, code)
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_the_fuzzed_table_is_valid_before_mutation(tmp_path, capsys):
    """The generator starts from a table that runs: each failure above is the mutation's doing."""
    import json

    root = tmp_path / "conf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "tablefuzz.yaml").write_text(json.dumps(TABLE_OK))
    try:
        assert cli.main(["show", "table=fuzz", f"conf_dir={root}"]) == 0
    finally:
        tables.use_conf_dir(None)


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
