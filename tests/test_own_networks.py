"""Networks and tables of one's own in one report (issue 18, item 4): rows named with custom.row/custom.label sit
side by side in one section; a conf_dir's table keeps its title and claims in a report run without conf_dir=;
the template's pools cut for a shallow network are said, not silently dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from simpnet_cli import cli
from simpnet_cli.report import write as report
from simpnet_cli.runs import results, sources

from conftest import TINY

MY_TABLE = """\
title: My width check
row_defaults: {arch: arch1, dataset: cifar10, solver: adadelta_30k, iterations: 30000}
rows:
  - id: narrow
    label: narrow, six layers
    net: {widths: "C8{3}, C16{3}", pools_after: [3, 6]}
  - id: wide
    label: wide, six layers
    net: {widths: "C16{3}, C32{3}", pools_after: [3, 6]}
claims:
  - text: wider is better
    holds_if: ["wide > narrow"]
"""
# The smoke profile on a quarter of its data (as tests/test_smoke_tables.py): four iterations on 16 images.
SMOKE = ["profile=smoke", "quiet=true", *TINY]


@pytest.fixture
def my_conf(tmp_path) -> Path:
    root = tmp_path / "myconf"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "mine.yaml").write_text(MY_TABLE)
    return root


def _dirs(tmp_path: Path) -> list[str]:
    return [f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs", f"data_dir={tmp_path}/data"]


def _section(md: str, heading_start: str) -> str:
    """One section of REPORT.md: from its heading to the next one of its level."""
    start = md.index(heading_start)
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def test_a_conf_dir_table_and_two_named_networks_in_one_report(tmp_path, my_conf, capsys):
    own = ["arch=arch2", "custom.table=mynets", *SMOKE, *_dirs(tmp_path)]
    assert cli.main(["run", "table=mine", f"conf_dir={my_conf}", *SMOKE, *_dirs(tmp_path)]) == 0
    assert cli.main(["run", *own, "custom.row=a", "net.widths=C8{2}, C16{2}", "custom.label=small pair"]) == 0
    assert cli.main(["run", *own, "custom.row=b", "net.widths=C8, C16{2}, C32{3}"]) == 0
    err = capsys.readouterr().err
    # Arch2's four pools do not fit the four- and six-layer networks: said once per network, not silently.
    assert "arch2's pools_after [4,7,9,12] adapted to [4] for 4 layers; set net.pools_after=[..]" in err
    assert "adapted to [4] for 6 layers" in err
    kept = json.loads(sources.source_path(tmp_path / "results", "mine").read_text())
    assert kept["title"] == "My width check" and kept["file"] == str(my_conf / "tables" / "mine.yaml")
    rows, bad = results.read(tmp_path / "results" / "tablemynets.csv")
    assert not bad and sorted((r["row_id"], r["row"]) for r in rows) == [
        ("a", "small pair"), ("b", "arch2: C8, C16{2}, C32{3}")]
    assert len({r["variant"] for r in rows}) == 1 and "widths" not in rows[0]["variant"]  # a row, not a variant

    # The report, without conf_dir=: the conf_dir's table keeps its title and claim, the two networks are the
    # two rows of one section, with no phantom row of the template. (The two tables only: every table's
    # figures would take most of this test's time, and REPORT.md is written from every table with runs anyway.)
    assert cli.main(["report", "table=[mine,mynets]", *_dirs(tmp_path)]) == 0
    md = (tmp_path / "results" / "REPORT.md").read_text()
    mine = _section(md, "## Table mine: My width check")
    assert "wider is better" in mine and "| narrow " in mine and "| wide " in mine
    assert "unknown table" not in md and "has no row" not in md and "## Table 2:" not in md
    nets = _section(md, "## Table mynets: Networks of your own")
    assert "| a " in nets and "small pair" in nets and "| b " in nets and "arch2: C8, C16{2}, C32{3}" in nets
    assert md.count("## Table mynets") == 1 and "| arch2 " not in nets and "not run" not in nets
    assert "report/tablemynets_ablation.png" in nets and "plots failed" not in md
    # Every table (what a plain `simpnet report` reads), without figures: the same two sections.
    every = report.render(tmp_path / "results", "all", out_dir=tmp_path / "every", plots=False).read_text()
    assert "wider is better" in _section(every, "## Table mine: My width check") and "unknown table" not in every
    assert "| b " in _section(every, "## Table mynets: Networks of your own")


def test_named_rows_and_labels_are_checked(capsys):
    for args, words in ((["custom.row=../x"], ["custom.row", "a name is"]),
                        (["custom.row=a", "custom.label=''"], ["custom.label", "give a text"])):
        assert cli.main(["show", "arch=arch2", "net.widths=C8{6}", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err
    assert cli.main(["show", "table=2", "custom.row=a"]) == 2
    assert "custom.row names a network of your own" in capsys.readouterr().err


def test_show_says_when_the_templates_pools_were_adapted(capsys, widths_parses):
    assert cli.main(["show", "arch=arch2", "net.widths=C8{6}", "custom.row=six"]) == 0
    assert widths_parses == ["C8{6}"]  # the label is made from the widths the run parsed
    out = capsys.readouterr().out
    assert "Table custom / six: arch2: C8{6}" in out
    assert "note: arch2's pools_after [4,7,9,12] adapted to [4] for 6 layers" in out
    assert cli.main(["show", "arch=arch2", "net.widths=C8{6}", "net.pools_after=[2,6]", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["notes"] == []  # placed by hand: nothing adapted


def test_a_named_row_keeps_the_hash_of_the_same_network_unnamed(capsys):
    net = ["show", "arch=arch2", "net.widths=C8{6}", "--json"]
    assert cli.main(net) == 0
    plain = json.loads(capsys.readouterr().out)[0]
    assert cli.main(net + ["custom.row=six", "custom.label=mine"]) == 0
    named = json.loads(capsys.readouterr().out)[0]
    assert plain["config_hash"] == named["config_hash"]
    assert (plain["row_id"], named["row_id"], named["row"]) == ("arch2", "six", "mine")
    assert plain["variant"] == "net.widths=C8{6}" and named["variant"] == ""
