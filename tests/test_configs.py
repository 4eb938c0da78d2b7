"""The table configs (conf/tables/*.yaml) against the reference (../shared/reference/experiments.yaml).

Fast: nothing trains. Every trained row must resolve to the authors' network token for token, with their
parameter count, their solver and the length of their best run; the paper's printed sizes must agree with
what we count; claims must name real rows and cited rows must say where they come from.
"""
from __future__ import annotations

import json
import os
import re
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from simpnet_cli.nets import specs as network
from simpnet_cli.config import tables

# The facts come from the repository's own test data (derived from ../shared/reference/experiments.yaml by
# tests/data/make_reference_rows.py), so every clone runs these tests; the last test keeps the two in agreement.
# SIMPNET_REFERENCE names another copy of experiments.yaml (or a missing path, to check a clone without one).
SHARED_REF = Path(os.environ.get("SIMPNET_REFERENCE")
                  or Path(__file__).resolve().parents[2] / "shared" / "reference" / "experiments.yaml")
REF_PATH = Path(__file__).resolve().parent / "data" / "reference_rows.yaml"
REF = yaml.safe_load(REF_PATH.read_text())
NO_REF = f"reference file {SHARED_REF} is absent (clone the project with ../shared beside it)"

TABLES = tables.load_tables("all")
ALL_ROWS = [pytest.param(t, r, id=f"{t.name}:{r['id']}") for t in TABLES for r in t.rows]


def _ref_entry(table: tables.Table, row: dict) -> dict | None:
    for e in REF or []:
        if str(e["table"]) == table.name and e["row"] == row["label"]:
            return e
    return None


if REF is None:
    REF_ROWS = [pytest.param(None, None, marks=pytest.mark.skip(reason=NO_REF), id="no-reference")]
else:
    REF_ROWS = [pytest.param(t, r, id=f"{t.name}:{r['id']}") for t in TABLES for r in t.rows
                if _ref_entry(t, r) is not None]


def _resolved(table, row):
    return tables.resolve(table, row, 0, {})


# --------------------------------------------------------------------------- coverage

def test_every_reference_row_has_a_config_row():
    if REF is None:
        pytest.skip(NO_REF)
    have = {(t.name, r["label"]) for t in TABLES for r in t.rows}
    missing = [(str(e["table"]), e["row"]) for e in REF if (str(e["table"]), e["row"]) not in have]
    assert not missing, f"reference rows with no config row (labels must equal the reference's `row`): {missing}"


def test_tables_2_to_14b_exist():
    want = [str(n) for n in range(2, 15)] + ["14b"]
    assert [t.name for t in TABLES] == want


# --------------------------------------------------------------------------- per row, against the reference

@pytest.mark.parametrize("table,row", REF_ROWS)
def test_tokens_match_reference(table, row):
    ref = _ref_entry(table, row)
    spec = _resolved(table, row)
    assert network.tokens(spec.spec) == ref["layers"].split()


@pytest.mark.parametrize("table,row", REF_ROWS)
def test_param_count_matches_reference(table, row):
    ref = _ref_entry(table, row)
    spec = _resolved(table, row)
    counted = network.count_params(spec.spec, spec.in_shape)[0]
    if spec.in_shape.c != 3:
        # The reference counts every network with 3 input channels, MNIST's too (see conf/tables/table13.yaml).
        three = network.Shape(3, spec.in_shape.h, spec.in_shape.w)
        assert network.count_params(spec.spec, three)[0] == ref["counted_params"]
        assert counted < ref["counted_params"]
    else:
        assert counted == ref["counted_params"]


@pytest.mark.parametrize("table,row", REF_ROWS)
def test_paper_figures_match_reference(table, row):
    ref = _ref_entry(table, row)
    assert str(row["paper"]["params"]) == str(ref["paper_params"])
    assert float(row["paper"]["acc"]) == pytest.approx(float(ref["paper_acc"]))
    assert row["dataset"] == ref["dataset"] or row["dataset"].get("base") == ref["dataset"]


def _points(text: str) -> dict[int, float]:
    return {int(k): float(v) for k, v in (p.split(":") for p in text.split(","))}


@pytest.mark.parametrize("table,row", REF_ROWS)
def test_solver_matches_reference(table, row):
    ref = _ref_entry(table, row)["solver"]
    solver = _resolved(table, row).solver
    sched = solver["schedule"]
    if "lr_by_iteration" in ref:
        # A log printing no solver: the schedule is read off its lr lines; the reference's note gives AdaDelta
        # rho 0.9, eps 1e-3 and the weight decay the authors use with it (MNIST: 0.003 or 0.005, not recorded).
        assert "rho 0.9, eps 1e-3" in ref["note"]
        assert solver["type"] == "adadelta"
        assert (solver["rho"], solver["eps"]) == pytest.approx((0.9, 1e-3))
        decays = [float(d) for d in re.findall(r"weight_decay (0\.\d+)", ref["note"])]
        assert decays and any(solver["weight_decay"] == pytest.approx(d) for d in decays)
        assert sched["kind"] == "piecewise"
        want = _points(ref["lr_by_iteration"])
        got = {int(k): float(v) for k, v in sched["points"].items()}
        assert sorted(got) == sorted(want)
        assert got == pytest.approx(want)
        assert solver["lr"] == pytest.approx(want[0])
        poly = ref.get("lr_poly")
        assert (sched.get("poly") is None) == (poly is None)
        if poly:
            assert sched["poly"]["from_iter"] == poly["from_iter"]
            assert float(sched["poly"]["base_lr"]) == pytest.approx(float(poly["base_lr"]))
            assert sched["poly"]["power"] == poly["power"] and sched["poly"]["max_iter"] == poly["max_iter"]
        return
    assert solver["type"] == ref["type"].lower()
    assert solver["lr"] == pytest.approx(float(ref["base_lr"]))
    momentum_key = {"adadelta": "rho", "nesterov": "momentum"}[solver["type"]]
    assert solver[momentum_key] == pytest.approx(float(ref["momentum"]))
    if "delta" in ref:
        assert solver["eps"] == pytest.approx(float(ref["delta"]))
    assert solver["weight_decay"] == pytest.approx(float(ref["weight_decay"]))
    assert ref["lr_policy"] == "multistep" and sched["kind"] == "multistep"
    assert sched["gamma"] == pytest.approx(float(ref["gamma"]))
    assert [int(s) for s in sched["steps"]] == [int(s) for s in str(ref["steps"]).split(",")]


RECIPE_KEYS = ("input", "augment", "test_transform", "bn_fraction", "init", "param_mults", "test_interval")


@pytest.mark.parametrize("table,row", REF_ROWS)
def test_recipe_matches_reference(table, row):
    """Every key of the reference's recipe (all but its notes), in its vocabulary, from the resolved run."""
    ref = _ref_entry(table, row)["recipe"]
    assert set(ref) - {"notes"} == set(RECIPE_KEYS)
    got = _resolved(table, row).recipe()
    for key in RECIPE_KEYS:
        assert got[key] == ref[key], f"recipe.{key}: {got[key]!r}, the reference says {ref[key]!r}"


def test_show_json_gives_the_reference_layers_and_recipe_of_every_row(capsys):
    """`simpnet show table=all --json`: per row, `layers` in the reference's grammar and `recipe` in its keys."""
    from simpnet_cli import cli

    assert cli.main(["show", "table=all", "--json"]) == 0
    records = {(r["table"], r["row"]): r for r in json.loads(capsys.readouterr().out)}
    for entry in REF:
        rec = records[(str(entry["table"]), entry["row"])]
        assert rec["layers"] == entry["layers"].split()
        assert rec["recipe"] == {k: entry["recipe"][k] for k in RECIPE_KEYS}


@pytest.mark.parametrize("table,row", REF_ROWS)
def test_iterations_are_the_best_runs_length(table, row):
    runs = _ref_entry(table, row)["authors_runs"]
    best = max(r["best_acc"] for r in runs)
    lengths = {r["last_iter"] for r in runs if r["best_acc"] == best}
    assert int(row["iterations"]) in lengths, f"best run(s) at {best} stopped at {sorted(lengths)}"


# --------------------------------------------------------------------------- per row, against the paper

_SIZE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)(?P<unit>[KM])$")


def printed_size_ok(counted: int, printed: str) -> bool:
    """|counted - printed| <= max(3% of printed, half a unit of the last printed digit)."""
    m = _SIZE.match(printed.strip())
    if not m:
        raise ValueError(f"cannot parse a parameter size {printed!r}")
    num = Decimal(m["num"])
    unit = Decimal(1000 if m["unit"] == "K" else 1_000_000)
    value = num * unit
    half_digit = Decimal(10) ** num.as_tuple().exponent * unit / 2
    return abs(Decimal(counted) - value) <= max(value * Decimal("0.03"), half_digit)


def test_printed_size_rule():
    assert printed_size_ok(1_147_978, "1.1M")      # half a unit: 1.05M-1.15M
    assert not printed_size_ok(1_160_000, "1.1M")
    assert printed_size_ok(309_000, "300K")        # 3%
    assert not printed_size_ok(310_000, "300K")
    assert printed_size_ok(5_472_677, "5.48M")
    assert printed_size_ok(7_600_000, "8M")        # half a unit of "8M" is 0.5M


@pytest.mark.parametrize("table,row", ALL_ROWS)
def test_params_close_to_printed_size(table, row):
    printed = str(row["paper"]["params"])
    if printed == "-":
        pytest.skip("the paper prints no size for this row")
    spec = _resolved(table, row)
    counted = network.count_params(spec.spec, spec.in_shape)[0]
    assert printed_size_ok(counted, printed), f"{counted:,} params vs printed {printed}"


# --------------------------------------------------------------------------- per table

@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_claims_name_existing_rows(table):
    ids = {r["id"] for r in table.rows}
    for claim in table.claims:
        assert claim.get("text"), f"claim without text in table {table.name}"
        assert claim.get("holds_if"), f"claim {claim['text']!r} has no comparisons"
        for cmp in claim["holds_if"]:
            parts = cmp.split()
            assert len(parts) == 3 and parts[1] in (">", ">=", "<", "<=", "=="), f"bad comparison {cmp!r}"
            assert parts[0] in ids and parts[2] in ids, f"{cmp!r} names a row not in table {table.name}: {ids}"


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_cited_rows_have_label_and_source(table):
    figure = "error" if table.display == "error" else "acc"
    for c in table.cited:
        assert c.get("label") and c.get("source"), f"table {table.name}: cited row without label/source: {c}"
        assert figure in c, f"table {table.name}: cited row {c['label']!r} has no {figure!r}"


def test_cited_tables():
    by_name = {t.name: t for t in TABLES}
    for name in ("12", "13", "14", "14b"):
        assert by_name[name].cited, f"table {name} should list the other papers' rows"
    assert {t.name for t in TABLES if t.display == "error"} == {"13", "14"}


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_row_ids_are_selector_safe(table):
    for r in table.rows:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", r["id"]), f"row id {r['id']!r} should be one word"


def test_the_repositorys_reference_rows_agree_with_the_shared_reference():
    if not SHARED_REF.exists():
        pytest.skip(NO_REF)
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_reference_rows", REF_PATH.parent / "make_reference_rows.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    assert REF_PATH.read_text() == maker.render(yaml.safe_load(SHARED_REF.read_text())), \
        "tests/data/reference_rows.yaml is stale: run python tests/data/make_reference_rows.py"


def test_all_52_reference_rows_are_checked_from_the_repository():
    assert len(REF) == 52 and len(REF_ROWS) == 52


def test_config_hashes_are_stable():
    """Existing run folders keep their identity: every row's hash equals the one recorded in tests/data (see
    tests/data/make_config_hashes.py), whatever the refactor of how a run's config is composed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_config_hashes",
                                                  REF_PATH.parent / "make_config_hashes.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    recorded = yaml.safe_load((REF_PATH.parent / "config_hashes.yaml").read_text())
    assert maker.current() == recorded
