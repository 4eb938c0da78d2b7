"""Derive tests/data/reference_rows.yaml from ../shared/reference/experiments.yaml.

The fidelity tests (tests/test_configs.py) need, for every row of Tables 2-14, the authors' layers, parameter
count, solver, runs and the paper's figures. They read them from this repository's own file, so a clone
without ../shared runs them too; tests/test_configs.py checks the two files agree whenever the reference is
present. Run this script again after the reference changes:

    python tests/data/make_reference_rows.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parents[2] / "shared" / "reference" / "experiments.yaml"
OUT = HERE / "reference_rows.yaml"
FIELDS = ("table", "row", "paper_params", "paper_acc", "notation", "dataset", "layers", "solver", "authors_runs",
          "counted_params", "recipe")
HEADER = ("# Derived from ../shared/reference/experiments.yaml by tests/data/make_reference_rows.py; do not edit.\n"
          "# One entry per row of Tables 2-14: the fields the fidelity tests check (see that file's header).\n")


def derive(reference: list[dict]) -> list[dict]:
    return [{k: entry[k] for k in FIELDS if k in entry} for entry in reference]


def render(reference: list[dict]) -> str:
    return HEADER + yaml.safe_dump(derive(reference), sort_keys=False, allow_unicode=True, width=200)


if __name__ == "__main__":
    if not REFERENCE.exists():
        sys.exit(f"no reference at {REFERENCE}")
    OUT.write_text(render(yaml.safe_load(REFERENCE.read_text())))
    print(f"wrote {OUT}")
