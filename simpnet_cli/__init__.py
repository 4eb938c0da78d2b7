"""simpnet: re-run the SimpNet paper's ablation tables.

``simpnet_cli.load_model(run_dir)`` rebuilds a finished run's network and loads its weights (runs/trained.py);
``simpnet_cli.build_model(table=4, row="WE10", **overrides)`` builds a row's network untrained and
``simpnet_cli.read_runs(table=4)`` reads a table's recorded runs as a pandas DataFrame (api.py).
"""
import os

# Idle OpenMP threads sleep instead of spinning: CPU runs sharing cores (packed runs, a busy CI machine)
# otherwise slow each other down many times over. Set before torch is imported; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_model(run_dir, device="cpu"):
    """The trained network of a finished run's folder, in eval mode (see simpnet_cli.runs.trained)."""
    from simpnet_cli.runs.trained import load_model as load  # torch only when asked for

    return load(run_dir, device)


def build_model(table, row, seed=0, device="cpu", **overrides):
    """A row's network, untrained, with command-line overrides as keywords (see simpnet_cli.api)."""
    from simpnet_cli.api import build_model as build

    return build(table, row, seed, device, **overrides)


def read_runs(table, results_dir="results"):
    """The runs recorded in results_dir/table<N>.csv as a pandas DataFrame (see simpnet_cli.api)."""
    from simpnet_cli.api import read_runs as read

    return read(table, results_dir)
