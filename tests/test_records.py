"""One hash, one figure; one row, one computation (issue 25, items 2-5).

Item 2: the report pools a row's seeds only within one computation (the run's identity apart from its seed);
item 3: the index and ``load_model`` trust only files that name their run; item 4: records survive a moved or
copied project; item 5: a sweep writes only under results_dir and runs_dir. Each has a test that failed before
its fix and a property or fuzz test over many cases.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

SMOKE = ["profile=smoke", "quiet=true", *TINY]


def simpnet_process(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in a subprocess (Hydra's multirun owns sys.argv), one CPU thread."""
    env = {k: v for k, v in os.environ.items() if k != "SIMPNET_CONF_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "simpnet_cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- item 5: writes only where told

@pytest.mark.slow
def test_a_sweep_writes_nothing_outside_results_dir_and_runs_dir(tmp_path):
    """Hydra's sweep folder (multirun.yaml, a folder per job) went to ./experiments/multirun/<date>/ whatever
    results_dir and runs_dir said; it goes under runs_dir."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    proc = simpnet_process("run", "-m", "table=5", "row=P5", "seeds=1,2", *SMOKE, f"results_dir={out}/results",
                           f"runs_dir={out}/runs", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(cwd.rglob("*")) == [], sorted(cwd.rglob("*"))
    assert sorted(p.name for p in out.iterdir()) == ["results", "runs"]
    (sweep,) = (out / "runs" / "multirun").iterdir()
    assert (sweep / "multirun.yaml").is_file()


# --------------------------------------------------------------------------- item 3: records carry their identity

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402


from simpnet_cli import cli  # noqa: E402
from simpnet_cli.errors import UserError  # noqa: E402
from simpnet_cli.runs import results  # noqa: E402


IDENTITY = ("config_hash", "table", "row_id", "seed")  # what a result.json says about whose it is


from test_index import dirs, planned, repair  # noqa: E402 - (the index's tests' helpers: the same folders)


def lines_of(path: Path) -> list[dict]:
    rows, bad = results.read(path)
    assert not bad, [str(b) for b in bad]
    return rows


def two_seeds(tmp_path: Path, finished_run) -> tuple[Path, Path]:
    """Seeds 0 and 1 of Table 5's P5 finished by hand, with different figures (one network: equal counts)."""
    out, runs = dirs(tmp_path)
    s0, s1 = planned(tmp_path, "table=5", "row=P5", "seeds=2")
    return (finished_run(s0, out, runs, "2025-01-01T00:00:00Z", final_acc=10.0, best_acc=12.0),
            finished_run(s1, out, runs, "2025-01-01T00:00:01Z", final_acc=90.0, best_acc=95.0))


def warnings_naming(err: str, folder: Path) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("simpnet: warning:") and str(folder) in line]


def test_a_result_without_its_identity_copied_into_another_runs_folder_is_refused(tmp_path, capsys, finished_run):
    """Seed 1's result.json, without the keys that name its run, copied over seed 0's: seed 0's line got seed 1's
    figures (the parameter counts, all that was checked, are one network's). Now the folder is refused, once."""
    out, _ = dirs(tmp_path)
    d0, d1 = two_seeds(tmp_path, finished_run)
    copied = {k: v for k, v in json.loads((d1 / "result.json").read_text()).items() if k not in IDENTITY}
    (d0 / "result.json").write_text(json.dumps(copied))
    path = results.csv_path(out, "5")
    capsys.readouterr()
    assert repair(tmp_path, "table=5") == 0
    err = capsys.readouterr().err
    assert len(warnings_naming(err, d0)) == 1 and "refused" in warnings_naming(err, d0)[0], err
    assert [(r["seed"], r["final_acc"]) for r in lines_of(path)] == [(1, 90.0)]


# How an identity key of seed 0's result.json is damaged: ``(key, seed 0's value, seed 1's hash)`` -> the value
# written ("deleted" removes the key).
IDENTITY_CORRUPTIONS = {
    "deleted": None,
    "null": lambda key, mine, other_hash: None,
    "empty": lambda key, mine, other_hash: "",
    "another run's": lambda key, mine, other_hash: {"config_hash": other_hash, "seed": 1, "table": "2",
                                                    "row_id": "P3"}[key],
    "in a list": lambda key, mine, other_hash: [mine],
    "in a mapping": lambda key, mine, other_hash: {key: mine},
    "edited": lambda key, mine, other_hash: f"{mine}x",
}


def corruptions(n: int, seed: int = 25):
    """``n`` random corruptions of a result.json's identity: a non-empty set of its keys, each damaged one way."""
    rng = random.Random(seed)
    for _ in range(n):
        keys = rng.sample(IDENTITY, rng.randint(1, len(IDENTITY)))
        yield {k: rng.choice(sorted(IDENTITY_CORRUPTIONS)) for k in keys}


@pytest.mark.parametrize("with_csv", [False, True])
def test_fuzz_no_run_is_indexed_from_a_folder_whose_result_has_a_damaged_identity(tmp_path, capsys, finished_run,
                                                                                    with_csv):
    """For random deletions and changes of the identity keys of seed 0's result.json (seed 1's figures in it),
    nothing is indexed from that folder: one warning names it, and the CSV never holds seed 1's figures on seed
    0's line (with an earlier CSV, seed 0's own line is kept as it was)."""
    for case, damage in enumerate(corruptions(8 if with_csv else 12, seed=25 + with_csv)):
        base = tmp_path / str(case)
        out, _ = dirs(base)
        d0, d1 = two_seeds(base, finished_run)
        path = results.csv_path(out, "5")
        if with_csv:
            assert repair(base, "table=5") == 0
            before = {r["seed"]: r["final_acc"] for r in lines_of(path)}
        else:
            path.unlink(missing_ok=True)
        mine, other = json.loads((d0 / "result.json").read_text()), json.loads((d1 / "result.json").read_text())
        forged = {**other, **{k: mine[k] for k in IDENTITY}}  # seed 1's figures under seed 0's name...
        for key, how in damage.items():  # ...then the name damaged
            if how == "deleted":
                forged.pop(key)
            else:
                forged[key] = IDENTITY_CORRUPTIONS[how](key, mine[key], other["config_hash"])
        (d0 / "result.json").write_text(json.dumps(forged))
        capsys.readouterr()
        assert repair(base, "table=5") == 0, damage
        err = capsys.readouterr().err
        assert len(warnings_naming(err, d0)) == 1, (damage, err)
        got = {r["seed"]: r["final_acc"] for r in (lines_of(path) if path.exists() else [])}
        assert got == (before if with_csv else {1: 90.0}), (damage, got)


@pytest.fixture
def trained_pair(tmp_path, one_thread):
    """Seeds 0 and 1 of Table 5's P5, trained (a few steps of the tiny smoke profile): their folders."""
    out, runs = dirs(tmp_path)
    assert cli.main(["run", "table=5", "row=P5", "seeds=2", *SMOKE, f"results_dir={out}",
                     f"runs_dir={runs}"]) == 0
    s0, s1 = planned(tmp_path, "table=5", "row=P5", "seeds=2")
    return runs / s0.config_hash, runs / s1.config_hash


def copy_files(src: Path, dst: Path, names: list[str]) -> None:
    for name in names:
        shutil.copy2(src / name, dst / name)


@pytest.mark.parametrize("copied", [["model.pt"], ["model.pt", "result.json"]])
def test_load_model_and_export_refuse_weights_that_are_another_runs(trained_pair, tmp_path, capsys, copied):
    """Seed 1's model.pt (alone, or with its result.json) copied into seed 0's folder loaded as seed 0's."""
    import simpnet_cli

    d0, d1 = trained_pair
    simpnet_cli.load_model(d0)  # its own weights load
    copy_files(d1, d0, copied)
    with pytest.raises(UserError) as info:
        simpnet_cli.load_model(d0)
    assert str(d0) in str(info.value) and "\n" not in str(info.value)
    capsys.readouterr()
    assert cli.main(["export", f"run_dir={d0}", f"out={tmp_path}/m.ts"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simpnet: error: ") and not (tmp_path / "m.ts").exists(), err


def test_fuzz_load_model_takes_only_the_folders_own_weights(trained_pair, tmp_path):
    """Property: over random mixes of the two folders' files (config.yaml, result.json, model.pt from either
    run) in a third folder, load_model gives weights exactly when all three are one run's, and then that run's."""
    import torch

    import simpnet_cli

    names = ["config.yaml", "result.json", "model.pt"]
    own = [torch.load(d / "model.pt", weights_only=True) for d in trained_pair]
    rng = random.Random(25)
    mixes = {tuple(rng.randrange(2) for _ in names) for _ in range(12)} | {(0, 0, 0), (1, 1, 1), (0, 0, 1)}
    for mix in sorted(mixes):
        folder = tmp_path / ("mix" + "".join(map(str, mix)))
        folder.mkdir()
        for name, which in zip(names, mix):
            shutil.copy2(trained_pair[which] / name, folder / name)
        if len(set(mix)) == 1:
            state = simpnet_cli.load_model(folder).state_dict()
            assert all(torch.equal(state[k], own[mix[0]][k]) for k in own[mix[0]]), mix
        else:
            with pytest.raises(UserError):
                simpnet_cli.load_model(folder)


@pytest.mark.slow
def test_weights_written_before_their_digest_was_recorded_load_with_a_warning(trained_pair, capsys):
    """The rule for an older folder: its result.json names the run but holds no digest of model.pt, so the
    weights cannot be checked; they load (they fit the network) and the user is told."""
    import simpnet_cli

    d0, _ = trained_pair
    result = json.loads((d0 / "result.json").read_text())
    del result["model_sha256"]
    (d0 / "result.json").write_text(json.dumps(result))
    with pytest.warns(UserWarning, match="cannot be checked"):
        simpnet_cli.load_model(d0)
    capsys.readouterr()
    assert cli.main(["export", f"run_dir={d0}", f"out={d0.parent}/m.ts"]) == 0
    assert "simpnet: warning:" in capsys.readouterr().err


# --------------------------------------------------------------------------- item 4: a moved or copied project

def project(root: Path, finished_run, results: str = "results", runs: str = "runs", seeds: int = 2) -> list:
    """A project folder with ``seeds`` finished runs of Table 5's P5 recorded for its results folder."""
    planned_runs = planned(root, "table=5", "row=P5", f"seeds={seeds}")
    for i, run in enumerate(planned_runs):
        finished_run(run, root / results, root / runs, f"2025-01-01T00:00:0{i}Z", final_acc=10.0 + i)
    assert cli.main(["repair", "table=5", f"results_dir={root / results}", f"runs_dir={root / runs}"]) == 0
    return planned_runs


def as_an_older_simpnet_wrote_them(root: Path, results: str = "results", runs: str = "runs",
                                   relative_run_dir: bool = False) -> None:
    """Rewrite the project's records as simpnet wrote them before issue 25: the absolute results_dir, and
    run_dir as the command was given it (absolute, or relative to the project folder it was run from)."""
    for path in (root / runs).glob("*/records/*.json"):
        rec = json.loads(path.read_text())
        run_dir = path.parent.parent
        rec.update(results_dir=str((root / results).resolve()),
                   run_dir=str(run_dir.relative_to(root)) if relative_run_dir else str(run_dir))
        path.write_text(json.dumps(rec))


def repair_in(root: Path, capsys, results: str = "results", runs: str = "runs") -> tuple[list[dict], str]:
    capsys.readouterr()
    assert cli.main(["repair", "table=5", f"results_dir={root / results}", f"runs_dir={root / runs}"]) == 0
    err = capsys.readouterr().err
    path = results_csv(root / results)
    return (lines_of(path) if path.exists() else []), err


def results_csv(results_dir: Path) -> Path:
    return results.csv_path(results_dir, "5")


def test_a_runs_dir_moved_alone_keeps_its_records(tmp_path, capsys, finished_run):
    a, b = tmp_path / "a", tmp_path / "b"
    project(a / "p", finished_run)
    shutil.move(a / "p" / "runs", a / "elsewhere")
    results_csv(a / "p" / "results").unlink()
    rows, err = repair_in(a, capsys, results="p/results", runs="elsewhere")
    assert [r["seed"] for r in rows] == [0, 1] and "2 run folder(s) read, 2 indexed" in err, err
    shutil.move(a, b)  # then all of it (the records were rewritten for where the runs are now)
    results_csv(b / "p" / "results").unlink()
    rows, err = repair_in(b, capsys, results="p/results", runs="elsewhere")
    assert [r["seed"] for r in rows] == [0, 1], err


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_repair_after_a_move_or_copy_rebuilds_every_intact_run_and_says_how_many(tmp_path, capsys, finished_run,
                                                                                  how):
    """`mv p q`, the CSV gone: repair found none of the runs (their records named p's results folder) and said
    nothing of the folders. Now it indexes both and says what it read."""
    p, q = tmp_path / "p", tmp_path / "q"
    project(p, finished_run)
    (shutil.move if how == "moved" else shutil.copytree)(p, q)
    results_csv(q / "results").unlink(missing_ok=True)
    rows, err = repair_in(q, capsys)
    assert sorted((r["seed"], r["final_acc"]) for r in rows) == [(0, 10.0), (1, 11.0)], err
    assert "2 run folder(s) read, 2 indexed, 0 refused" in err, err
    assert all(Path(r["run_dir"]).parent == q / "runs" for r in rows)
    if how == "copied":
        assert [r["seed"] for r in lines_of(results_csv(p / "results"))] == [0, 1]
        assert all(Path(r["run_dir"]).parent == p / "runs" for r in lines_of(results_csv(p / "results")))


@pytest.mark.parametrize("relative_run_dir", [False, True])
def test_an_older_simpnets_absolute_records_are_read_in_place_and_after_a_move(tmp_path, capsys, finished_run,
                                                                               relative_run_dir):
    p, q = tmp_path / "p", tmp_path / "q"
    project(p, finished_run)
    as_an_older_simpnet_wrote_them(p, relative_run_dir=relative_run_dir)
    shutil.copytree(p, tmp_path / "p-as-it-was")
    results_csv(p / "results").unlink()
    rows, err = repair_in(p, capsys)
    assert [r["seed"] for r in rows] == [0, 1], err
    assert all(not os.path.isabs(json.loads(f.read_text())["results_dir"])
               for f in (p / "runs").glob("*/records/*.json")), "rewritten relative where found in place"
    shutil.move(tmp_path / "p-as-it-was", q)  # never read in place: still absolute, naming p
    results_csv(q / "results").unlink()
    rows, err = repair_in(q, capsys)
    assert [r["seed"] for r in rows] == [0, 1], err


def test_repair_says_where_the_runs_are_recorded_when_none_is_for_its_results_folder(tmp_path, capsys,
                                                                                      finished_run):
    project(tmp_path, finished_run)
    rows, err = repair_in(tmp_path, capsys, results="elsewhere")
    assert rows == [] and "0 run folder(s) read" in err
    assert f"have runs there: {tmp_path / 'results'}" in err, err


def test_fuzz_records_survive_any_move_or_copy_of_the_project(tmp_path, capsys, finished_run):
    """Property: for random layouts (results and runs folders at random depths), records written now or by an
    older simpnet, and a random move or copy of the project to a random depth, repair indexes every run once."""
    rng = random.Random(25)
    for case in range(6):
        base = tmp_path / str(case)
        depth = lambda: "/".join(rng.sample(["a", "b", "c", "d"], rng.randint(0, 2)))  # noqa: E731
        res, runs = f"{depth()}/results".lstrip("/"), f"{depth()}/runs".lstrip("/")
        p = base / "p"
        n = rng.randint(1, 3)
        project(p, finished_run, res, runs, seeds=n)
        if rng.random() < 0.5:
            as_an_older_simpnet_wrote_them(p, res, runs, relative_run_dir=rng.random() < 0.5)
        q = base / "/".join(["q"] + rng.sample(["x", "y"], rng.randint(0, 2)))
        q.parent.mkdir(parents=True, exist_ok=True)
        (shutil.move if rng.random() < 0.5 else shutil.copytree)(p, q)
        results_csv(q / res).unlink()
        rows, err = repair_in(q, capsys, res, runs)
        assert sorted(r["seed"] for r in rows) == list(range(n)), (case, res, runs, err)
        assert f"{n} run folder(s) read, {n} indexed, 0 refused" in err, (case, err)


# --------------------------------------------------------------------------- item 2: one row, one computation

import dataclasses  # noqa: E402

from simpnet_cli.config import tables  # noqa: E402
from simpnet_cli.report import data as report_data  # noqa: E402


def report_lines(results_dir: Path, table: str, row_id: str) -> list:
    rep = report_data.collect(results_dir, table, profile="smoke")
    return [r for tr in rep.tables for r in tr.rows if r.kind == "trained" and r.row_id == row_id and r.n]


def own_conf_dir(tmp_path: Path) -> Path:
    """A conf_dir whose arch1 is not the built-in one (another BatchNorm fraction): Table 2's 8L redefined."""
    root = tmp_path / "conf"
    (root / "arch").mkdir(parents=True)
    text = (tables.DEFAULT_CONF_DIR / "arch" / "arch1.yaml").read_text()
    (root / "arch" / "arch1.yaml").write_text(text.replace("bn_fraction: 0.99", "bn_fraction: 0.9"))
    return root


def two_computations(tmp_path: Path, case: str):
    """(table, row id, two runs of seed 0 under one row and no variant, computing different things)."""
    if case == "two networks under one custom.row":
        a = planned(tmp_path, "arch=arch2", "net.widths=C16, C32", "custom.row=six")
        b = planned(tmp_path, "arch=arch2", "net.widths=C16{2}, C32", "custom.row=six")
        return "custom", "six", a[0], b[0]
    if case == "custom.dataset=mnist beside cifar10":
        a = planned(tmp_path, "arch=arch2", "net.widths=C16, C32")
        b = planned(tmp_path, "arch=arch2", "net.widths=C16, C32", "custom.dataset=mnist")
        return "custom", "arch2", a[0], b[0]
    if case == "a conf_dir arch that redefines 8L":
        (a,) = planned(tmp_path, "table=2", "row=8L")
        (b,) = planned(tmp_path, "table=2", "row=8L", f"conf_dir={own_conf_dir(tmp_path)}")
        return "2", "8L", a, b
    (a,) = planned(tmp_path, "table=2", "row=8L")  # an older simpnet's folder of the seed, under another hash
    return "2", "8L", a, dataclasses.replace(a, train={**a.train, "iterations": 5})


@pytest.mark.parametrize("case", ["two networks under one custom.row", "custom.dataset=mnist beside cifar10",
                                  "a conf_dir arch that redefines 8L", "a second folder of the seed"])
def test_a_rows_figures_pool_only_one_computation(tmp_path, finished_run, case):
    """Each of these was one line with n=2, seed 0 counted twice; now each computation is a line of its own,
    the second named by what differs."""
    out, runs = dirs(tmp_path)
    table, row_id, a, b = two_computations(tmp_path, case)
    assert (a.table, a.row_id, a.variant, a.seed) == (b.table, b.row_id, b.variant, b.seed)
    assert a.config_hash != b.config_hash
    finished_run(a, out, runs, "2025-01-01T00:00:00Z", final_acc=10.0, best_acc=10.0)
    finished_run(b, out, runs, "2025-01-01T00:00:01Z", final_acc=90.0, best_acc=90.0)
    assert repair(tmp_path, f"table={table}") == 0
    lines = report_lines(out, table, row_id)
    assert [(r.n, r.values("final")) for r in lines] == [(1, [10.0]), (1, [90.0])], [r.label for r in lines]
    assert lines[0].differs == "" and lines[1].differs and lines[1].differs in lines[1].label
    assert [r.computation for r in lines] == [a.computation, b.computation]


def test_the_computation_is_the_runs_identity_but_its_seed_and_reads_back_from_its_folder(tmp_path, finished_run):
    out, runs = dirs(tmp_path)
    s0, s1 = planned(tmp_path, "table=5", "row=P5", "seeds=2")
    assert s0.computation == s1.computation and s0.config_hash != s1.config_hash
    import yaml
    from omegaconf import OmegaConf

    config = yaml.safe_load(OmegaConf.to_yaml(OmegaConf.create(s0.to_dict())))
    assert tables.computation_of(config) == s0.computation
    assert tables.computation_of({**config, "config_hash": "0" * 16}) is None  # not the run it names


def blank_computations(path: Path, rng: random.Random) -> None:
    """A CSV as written before the computation column, for a random share of its lines."""
    import csv as _csv
    import io

    rows = list(_csv.DictReader(io.StringIO(path.read_text())))
    for row in rows:
        if rng.random() < 0.5:
            row["computation"] = ""
    buf = io.StringIO()
    writer = _csv.DictWriter(buf, fieldnames=results.COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def test_property_every_report_line_pools_the_distinct_seeds_of_one_computation(tmp_path, finished_run):
    """For random sets of runs of one row (several computations, random seeds, some lines without the
    computation column and some of those without their folder), each report line's n is the number of distinct
    seeds of one computation, no seed counts twice, and every ok run is on exactly one line."""
    rng = random.Random(25)
    (base,) = planned(tmp_path, "table=5", "row=P5")
    for case in range(8):
        root = tmp_path / str(case)
        out, runs = dirs(root)
        made = []
        for length in rng.sample([4, 5, 6, 7], rng.randint(1, 3)):
            comp = dataclasses.replace(base, train={**base.train, "iterations": length})
            for seed in rng.sample(range(5), rng.randint(1, 4)):
                run = comp.with_seed(seed)
                finished_run(run, out, runs, f"2025-01-01T00:00:{len(made):02d}Z", final_acc=float(len(made)),
                             iterations=length, best_iter=length)
                made.append(run)
        assert repair(root, "table=5") == 0
        path = results.csv_path(out, "5")
        blank_computations(path, rng)
        for run in made:
            if rng.random() < 0.2:
                shutil.rmtree(runs / run.config_hash)  # (only what the line says of its run is left)
        lines = report_lines(out, "5", "P5")
        by_acc = {float(i): run for i, run in enumerate(made)}
        seen = []
        for line in lines:
            mine = [by_acc[v] for v in line.values("final")]
            assert line.n == len({r.seed for r in mine}), (case, line.label)
            assert len({r.train["iterations"] for r in mine}) == 1, (case, line.label)  # one computation
            seen += mine
        assert sorted(r.config_hash for r in seen) == sorted(r.config_hash for r in made), case


def test_property_hydras_own_folders_are_under_runs_dir_whatever_it_is(tmp_path):
    """For random runs_dir values (absolute or relative, nested, with odd characters), the folder a sweep's
    Hydra writes to is under runs_dir, and Hydra writes no output subfolder of its own anywhere."""
    from hydra import compose, initialize_config_dir

    rng = random.Random(25)
    parts = ["runs", "a b", "x.y", "deep", "_r", "é"]
    with initialize_config_dir(config_dir=str(tables.DEFAULT_CONF_DIR), version_base="1.3"):
        for case in range(12):
            runs_dir = "/".join(rng.sample(parts, rng.randint(1, 3)))
            if rng.random() < 0.5:
                runs_dir = str(tmp_path / runs_dir)
            cfg = compose(config_name="config", overrides=[f"runs_dir='{runs_dir}'", f"results_dir={tmp_path}/r"],
                          return_hydra_config=True)
            sweep = Path(str(cfg.hydra.sweep.dir))
            assert Path(runs_dir) in sweep.parents, (runs_dir, sweep)
            assert cfg.hydra.output_subdir is None and not cfg.hydra.job.chdir
