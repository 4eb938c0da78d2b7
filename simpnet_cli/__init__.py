"""simpnet: re-run the SimpNet paper's ablation tables."""
import os

# Idle OpenMP threads sleep instead of spinning: CPU runs sharing cores (packed runs, a busy CI machine)
# otherwise slow each other down many times over. Set before torch is imported; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
