"""Shared fixtures: resolved table rows and a Fashion-MNIST data directory imported once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from simpnet_cli.train import data as D
from simpnet_cli.config import tables

FASHION_SYSTEM_COPY = Path(tables.load_named("dataset", "fashion_mnist")["system_copy"])
NO_FASHION = (f"Fashion-MNIST is not installed at {FASHION_SYSTEM_COPY} "
              f"(Debian package dataset-fashion-mnist; apt-get install dataset-fashion-mnist)")


def resolve_row(table: str, row_id: str, profile: dict | None = None, seed: int = 0, **row_overrides):
    """The RunSpec of one table row (optionally with row keys such as ``dataset`` replaced)."""
    t = tables.load_table(table)
    row = {**t.row(row_id), **row_overrides}
    return tables.resolve(t, row, seed, profile or {})


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory) -> Path:
    """A data_dir holding Fashion-MNIST where torchvision looks for it (``FashionMNIST/raw/``), unpacked once
    from the Debian package's copy; the tests that need real data are skipped when it is absent."""
    if not FASHION_SYSTEM_COPY.is_dir() or not list(FASHION_SYSTEM_COPY.glob("*-ubyte.gz")):
        pytest.skip(NO_FASHION)
    root = tmp_path_factory.mktemp("fashion_data")
    D.import_idx_gz(FASHION_SYSTEM_COPY, root, "FashionMNIST")
    return root
