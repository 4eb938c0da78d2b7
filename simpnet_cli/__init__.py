"""simpnet: re-run the SimpNet paper's ablation tables.

``simpnet_cli.load_model(run_dir)`` rebuilds a finished run's network and loads its weights (runs/trained.py).
"""
import os

# Idle OpenMP threads sleep instead of spinning: CPU runs sharing cores (packed runs, a busy CI machine)
# otherwise slow each other down many times over. Set before torch is imported; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_model(run_dir, device="cpu"):
    """The trained network of a finished run's folder, in eval mode (see simpnet_cli.runs.trained)."""
    from simpnet_cli.runs.trained import load_model as load  # torch only when asked for

    return load(run_dir, device)
