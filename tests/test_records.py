"""One hash, one figure; one row, one computation (issue 25, items 2-5).

Item 2: the report pools a row's seeds only within one computation (the run's identity apart from its seed);
item 3: the index and ``load_model`` trust only files that name their run; item 4: records survive a moved or
copied project; item 5: a sweep writes only under results_dir and runs_dir. Each has a test that failed before
its fix and a property or fuzz test over many cases.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TINY = ["profile.train.batch_size=2", "profile.data.train_size=16", "profile.data.test_size=2"]
SMOKE = ["profile=smoke", "quiet=true", *TINY]


def simpnet_process(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in a subprocess (Hydra's multirun owns sys.argv), one CPU thread."""
    env = {k: v for k, v in os.environ.items() if k != "SIMPNET_CONF_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "simpnet_cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- item 5: writes only where told

def test_a_sweep_writes_nothing_outside_results_dir_and_runs_dir(tmp_path):
    """Hydra's sweep folder (multirun.yaml, a folder per job) went to ./experiments/multirun/<date>/ whatever
    results_dir and runs_dir said; it goes under runs_dir."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    proc = simpnet_process("run", "-m", "table=5", "row=P5", "seeds=1,2", *SMOKE, f"results_dir={out}/results",
                           f"runs_dir={out}/runs", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(cwd.rglob("*")) == [], sorted(cwd.rglob("*"))
    assert sorted(p.name for p in out.iterdir()) == ["results", "runs"]
    (sweep,) = (out / "runs" / "multirun").iterdir()
    assert (sweep / "multirun.yaml").is_file()
