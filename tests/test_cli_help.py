"""`simpnet CMD --help` prints the command's usage and keys and does nothing else (nothing composed, trained,
written or read)."""
from __future__ import annotations

import pytest

from simpnet_cli import cli

COMMANDS = ["list", "show", "run", "report", "bench", "repair", "export"]


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_after_a_subcommand_prints_usage_and_touches_nothing(cmd, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [cmd, "table=4", f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs", flag]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: simpnet {cmd}")
    assert "results_dir=" in out  # the keys, with examples
    assert list(tmp_path.iterdir()) == []  # no results, no runs folder, no report, no lock


def test_run_help_names_the_keys_a_researcher_sets(capsys):
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("profile.train.eval_every", "dataset.extra", "feed.augment", "net.widths", "seeds=", "-m"):
        assert key in out, key


def test_help_for_an_unknown_command_is_one_line(capsys):
    assert cli.main(["nope", "--help"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cfg_job_prints_each_resolved_run_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    argv = ["run", "table=4", "row=WE10", "seeds=2", "solver.lr=0.05", f"results_dir={tmp_path}/results",
            f"runs_dir={tmp_path}/runs", "--cfg", "job"]
    assert cli.main(argv) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["seed"] for d in docs] == [0, 1]
    for doc in docs:
        assert doc["solver"]["lr"] == 0.05 and doc["solver"]["schedule"]["steps"][0] == 50000
        assert doc["solver"]["weight_decay"] == 0.005
        assert doc["net"]["layers"].startswith("conv64k3p1 drop0.2") and doc["net"]["params"] > 7_000_000
        assert doc["recipe"]["bn_fraction"] == 0.95 and doc["train"]["eval_every"] == 500
        assert doc["variant"] == "solver.lr=0.05" and len(doc["config_hash"]) == 16
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arg", ["hydra.run.dir=elsewhere", "hydra.job.chdir=true", "+hydra.output_subdir=x"])
def test_hydra_keys_that_do_nothing_are_refused(arg, capsys):
    assert cli.main(["run", "table=2", "row=8L", "profile=smoke", arg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changes nothing" in err


def test_list_json_gives_tables_and_rows(capsys):
    import json

    assert cli.main(["list", "table=4", "--json"]) == 0
    (table,) = json.loads(capsys.readouterr().out)
    assert table["table"] == "4" and [r["id"] for r in table["rows"]] == ["WE10", "BW10", "WE13", "BW13"]


def test_show_prints_the_network_layer_by_layer_with_shapes_and_params(capsys):
    assert cli.main(["show", "table=2", "row=8L"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "conv41k3p1" and lines[1].split()[-1] == "fc10"  # the reference's token line
    table = lines[3:lines.index(next(line for line in lines if line.strip().startswith("params:")))]
    assert table[0].split()[:3] == ["conv41k3p1", "41x32x32", "1,148"]
    assert table[-1].split() == ["fc10", "10", "910"]
    assert sum(int(line.split()[-1].replace(",", "")) for line in table) == 300_213


def test_a_sweep_names_each_job_records_its_variant_and_ends_with_a_summary(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "simpnet_cli.cli", "run", "-m", "table=5", "row=P5",
                           "net.dropout.head=0.1,0.2", "profile=smoke",
                           f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/e", f"hydra.sweep.dir={tmp_path}/s"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heads = [line for line in proc.stderr.splitlines() if line.startswith("sweep job ")]
    assert [h.split()[2] for h in heads] == ["1/2:", "2/2:"]
    assert "(variant: net.dropout.head=0.1)" in heads[0] and "(variant: net.dropout.head=0.2)" in heads[1]
    assert "sweep: 2 job(s), 2 ok, 0 failed" in proc.stderr
    # a sweep over a network key records each job's variant (this was test_variants' test_sweep_over_a_network_key)
    from simpnet_cli.runs import results

    rows, bad = results.read(tmp_path / "r" / "table5.csv")
    assert not bad and sorted(r["variant"] for r in rows) == ["net.dropout.head=0.1", "net.dropout.head=0.2"]
