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
# `make test` runs everything; `make test-fast` (pytest -m "not slow") skips the tests below, which train real
# networks or drive whole commands in subprocesses, for an inner loop of about two minutes. A test is listed here
# by file and name prefix, so the tiers are declared in one place.
SLOW = {
    "test_variants.py": ("test_the_issues_table_4_sweep", "test_sweep_", "test_a_variant_sweep",
                         "test_a_network_in_no_table"),
    # (every test on the module's short_runs fixture, three trained runs: the fast tier builds none of them)
    "test_train.py": ("test_slim_300k_learns", "test_short_run", "test_load_model_rebuilds", "test_same_seed",
                      "test_other_seed", "test_finished_run_is_not", "test_interrupted_run"),
    "test_smoke_tables.py": ("test_smoke_run_records", "test_rerun_adds_no_lines", "test_twin_rows_share"),
    "test_gpu_path.py": ("test_graphed_run_with_recapture",),
    "test_gpu_route.py": ("test_make_install_uses_the_present_torch_offline", "test_the_cluster_command",
                          "test_gpu_check_set_up_with_a_venv_python"),
    "test_robustness.py": ("test_sigkill", "test_concurrent", "test_nan_loss", "test_resume_restores",
                           "test_corrupt_dataset", "test_missing_dataset", "test_report_lists_a_torn_line"),
    # (the fast tier keeps one damaged CSV rebuilt by `repair`, junk, and the killed run indexed by `run`)
    "test_index.py": tuple(f"test_a_damaged_csv_is_rebuilt_by_the_next_run_or_repair[repair-{damage}"
                           for damage in ("bom", "duplicated", "lines", "reordered", "truncated")) + (
                     "test_a_run_killed_between_its_result_and_the_rebuild_is_indexed_once_by_the_next_command[repair]",),
    "test_speed_paths.py": ("test_packed_runs", "test_bench_precision"),
    "test_integrity.py": ("test_fuzz_malformed_command_lines", "test_at_most_one_line_per_run"),
    "test_progress.py": ("test_a_terminal_gets_bars", "test_redirected_stderr"),
    "test_report.py": ("test_networks_of_ones_own", "test_empty_results_render"),
    "test_one_hash_one_figure.py": tuple(f"test_stacked_and_separate_training_never_record_two_figures_under_one_"
                                         f"hash[{row}]" for row in ("SN-SAF", "RN32-max")),
    # (a sweep in a subprocess, and a TorchScript export: the fast tier keeps item 5's property of the sweep folder)
    "test_records.py": ("test_a_sweep_writes_nothing", "test_weights_written_before"),
    "test_stacked.py": ("test_a_stacked_run_killed_and_resumed", "test_a_stacked_run_whose_group_mates",
                        "test_packed_stacked_groups_are_one_job",
                        "test_bench_reports_separate_grouped_and_branched"),
}
# Tests of many cases of which the fast tier runs every k-th (the first, the (k+1)-th...) and the slow tier the
# rest: the fuzz cases are generated from fixed seeds and the rows come in table order, so each tier always runs
# the same ones, and a sample of every table's rows stays in the fast tier.
FAST_EVERY = {
    "test_integrity.py": {"test_fuzz_malformed_table_files": 3, "test_fuzz_every_key_with_values_of_every_type": 3,
                          "test_fuzz_every_conf_dir_field_with_values_of_every_type": 3},
    "test_gpu_path.py": {"test_the_captured_step_of_every_row_has_no_host_sync": 3},
}


# The longest tests (about 20-100 s each on a 2-core machine) run first: pytest-xdist's worksteal hands each
# worker a contiguous share of the list and lets an idle one take half of another's queue, so a long test started
# last would run alone at the end. None of these shares a module-scoped fixture with its neighbours.
FIRST = ("tests/test_train.py::test_slim_300k_learns_fashion_mnist",
         "tests/test_robustness.py::test_sigkill_of_a_packed_worker_fails_its_run_only_and_it_resumes_next_time",
         "tests/test_robustness.py::test_sigkill_mid_run_resumes_from_checkpoint_and_matches_uninterrupted",
         "tests/test_variants.py::test_the_issues_table_4_sweep_runs_as_written",
         "tests/test_robustness.py::test_concurrent_commands_on_overlapping_rows_leave_every_run_in_each_csv_once",
         "tests/test_variants.py::test_a_variant_sweep_through_the_submitit_launcher",
         "tests/test_speed_paths.py::test_packed_runs_share_a_device_and_record_every_row_once",
         "tests/test_stacked.py::test_packed_stacked_groups_are_one_job_per_worker_slot")


def pytest_collection_modifyitems(config, items):
    seen: dict[tuple[str, str], int] = {}
    for item in items:
        prefixes = SLOW.get(item.path.name, ())
        every = FAST_EVERY.get(item.path.name, {}).get(item.originalname)
        if every is not None:
            key = (item.path.name, item.originalname)
            seen[key] = seen.get(key, 0) + 1
        if item.name.startswith(prefixes) or (every is not None and (seen[key] - 1) % every):
            item.add_marker(pytest.mark.slow)
    rank = {nodeid: i for i, nodeid in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))  # stable: the rest keep their order
