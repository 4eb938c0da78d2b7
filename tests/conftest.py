"""Shared fixtures: resolved table rows and a Fashion-MNIST data directory imported once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from simpnet_cli.train import data as D
from simpnet_cli.config import tables

# A smoke run made smaller still, as command-line keys: batches of 2 of 16 synthetic images, 8 test images. The
# tests that drive whole commands use it; what they check is what a command records, not what a run reaches.
TINY = ["profile.train.batch_size=2", "profile.data.train_size=16", "profile.data.test_size=8"]
FASHION_SYSTEM_COPY = Path(tables.load_named("dataset", "fashion_mnist")["system_copy"])
NO_FASHION = (f"Fashion-MNIST is not installed at {FASHION_SYSTEM_COPY} "
              f"(Debian package dataset-fashion-mnist; apt-get install dataset-fashion-mnist)")


def resolve_row(table: str, row_id: str, profile: dict | None = None, seed: int = 0, **row_overrides):
    """The RunSpec of one table row (optionally with row keys such as ``dataset`` replaced)."""
    t = tables.load_table(table)
    row = {**t.row(row_id), **row_overrides}
    return tables.resolve(t, row, seed, profile or {})


@pytest.fixture(autouse=True)
def conf_search():
    """Every test starts and ends with the built-in config search path (tables.SEARCH): a test that points it
    at a folder of its own, directly or through a command, leaves nothing behind for the next."""
    with tables.SEARCH.scoped():
        yield tables.SEARCH


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory) -> Path:
    """A data_dir holding Fashion-MNIST where torchvision looks for it (``FashionMNIST/raw/``), unpacked once
    from the Debian package's copy; the tests that need real data are skipped when it is absent."""
    if not FASHION_SYSTEM_COPY.is_dir() or not list(FASHION_SYSTEM_COPY.glob("*-ubyte.gz")):
        pytest.skip(NO_FASHION)
    root = tmp_path_factory.mktemp("fashion_data")
    D.import_idx_gz(FASHION_SYSTEM_COPY, root, "FashionMNIST")
    return root


@pytest.fixture
def finished_run():
    """Makes a run folder as the runner leaves a finished run (config.yaml, result.json naming its run, the
    table row's record for a results_dir), by hand and without training: ``make(run, results_dir, runs_dir,
    finished_at=..., stamped=True, **result)`` returns the folder."""
    import json

    from omegaconf import OmegaConf

    from simpnet_cli.nets import specs as network
    from simpnet_cli.runs import index

    def make(run, results_dir: Path, runs_dir: Path, finished_at: str = "2025-01-01T00:00:00Z",
             stamped: bool = True, **over) -> Path:
        run_dir = Path(runs_dir) / run.config_hash
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run.to_dict())))
        paper, total = network.count_params(run.spec, run.in_shape)
        result = {"status": "ok", "final_acc": 50.0, "best_acc": 51.5, "best_iter": 4, "iterations": 4,
                  "epochs": 0.5, "wall_s": 1.0, "img_per_s": 32.0, "device": "cpu (1 threads)", "precision": "fp32",
                  "step_mode": "eager", "params_paper": paper, "params_total": total, **over}
        if stamped:
            result.update(config_hash=run.config_hash, table=run.table, row_id=run.row_id, seed=run.seed,
                          finished_at=finished_at)
        (run_dir / "result.json").write_text(json.dumps(result))
        index.write_record(run_dir, results_dir, index.record_of(run, run_dir, "smoke"))
        return run_dir

    return make


@pytest.fixture
def widths_parses(monkeypatch) -> list[str]:
    """Every C_x{y} text parsed while the test runs, in order (both places that import the parser count)."""
    from simpnet_cli.config import tables
    from simpnet_cli.nets import notation, specs

    parsed: list[str] = []

    def counting(text):
        parsed.append(text)
        return notation.parse_widths(text)

    monkeypatch.setattr(tables, "parse_widths", counting)
    monkeypatch.setattr(specs, "parse_widths", counting)
    return parsed


@pytest.fixture
def crash_at(monkeypatch):
    """``crash_at(n)``: training stops as a Ctrl-C would (KeyboardInterrupt) as it is about to train iteration
    ``n`` (after that iteration's evaluation and checkpoint); ``crash_at(None)`` lets it train on."""
    from simpnet_cli.train import solvers

    real = solvers.lr_at

    def arm(iteration: int | None) -> None:
        def crashing(solver, it):
            if it == iteration:
                raise KeyboardInterrupt
            return real(solver, it)

        monkeypatch.setattr(solvers, "lr_at", real if iteration is None else crashing)

    return arm


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (runs that must match bit for bit, or share the cores with others)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- tiers
# `make test` runs everything; `make test-fast` (pytest -m "not slow") skips the tests marked slow on themselves
# (`@pytest.mark.slow`, or a slow case of a parametrized test: `pytest.param(..., marks=pytest.mark.slow)`),
# which train real networks or drive whole commands in subprocesses, for an inner loop of about two minutes.


def fast_sample(cases, every: int = 3) -> list:
    """The cases of a test of many (fuzz cases, every row): every ``every``-th (the first, the (every+1)-th...)
    in the fast tier, the rest marked slow. The cases come from fixed seeds or in table order, so each tier always
    runs the same ones, and a sample of every kind stays in the fast tier."""
    sampled = []
    for i, case in enumerate(cases):
        given = case if hasattr(case, "marks") else pytest.param(*(case if isinstance(case, tuple) else (case,)))
        sampled.append(pytest.param(*given.values, id=given.id,
                                    marks=[*given.marks, *(() if i % every == 0 else (SLOW,))]))
    return sampled


SLOW = pytest.mark.slow


# The longest tests (about 20-100 s each on a 2-core machine) run first: pytest-xdist's worksteal hands each
# worker a contiguous share of the list and lets an idle one take half of another's queue, so a long test started
# last would run alone at the end. None of these shares a module-scoped fixture with its neighbours.
FIRST = ("tests/test_examples.py::test_the_readmes_small_real_subset_trains_on_fashion_mnist",
         "tests/test_robustness.py::test_sigkill_of_a_packed_worker_fails_its_run_only_and_it_resumes_next_time",
         "tests/test_robustness.py::test_sigkill_mid_run_resumes_from_checkpoint_and_matches_uninterrupted",
         "tests/test_variants.py::test_the_issues_table_4_sweep_runs_as_written",
         "tests/test_robustness.py::test_concurrent_commands_on_overlapping_rows_leave_every_run_in_each_csv_once",
         "tests/test_variants.py::test_a_variant_sweep_through_the_submitit_launcher",
         "tests/test_speed_paths.py::test_packed_runs_share_a_device_and_record_every_row_once",
         "tests/test_stacked.py::test_packed_stacked_groups_are_one_job_per_worker_slot")


def pytest_collection_modifyitems(config, items):
    rank = {nodeid: i for i, nodeid in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))  # stable: the rest keep their order
