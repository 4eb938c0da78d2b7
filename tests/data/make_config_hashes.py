"""Write tests/data/config_hashes.yaml: the config hash (the run folder's name) of every row of every table.

A run's folder is named by the hash of what it computes, so a refactor of how configs are composed must not
change any hash, or every finished run would be trained again and old results orphaned. tests/test_configs.py
checks the hashes against this file. Run this script only when a change is MEANT to change what runs compute
(and say so in the change):

    python tests/data/make_config_hashes.py
"""
from __future__ import annotations

from pathlib import Path

import yaml

from simpnet_cli.config import tables

OUT = Path(__file__).resolve().parent / "config_hashes.yaml"
SEEDS = (0, 1)


def current() -> dict:
    return {f"{t.name}/{r['id']}/{seed}": tables.resolve(t, r, seed, {}).config_hash
            for t in tables.load_tables("all") for r in t.rows for seed in SEEDS}


if __name__ == "__main__":
    OUT.write_text("# Written by tests/data/make_config_hashes.py: TABLE/ROW/SEED -> config hash (run folder name).\n"
                   + yaml.safe_dump(current(), sort_keys=True))
    print(f"wrote {OUT}")
