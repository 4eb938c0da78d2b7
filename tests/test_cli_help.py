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
