# simpnet: common jobs. `make smoke` on a fresh machine installs into .venv and runs a smoke table.
# `make install` (and every target that needs it) uses the machine's torch when $(PY) imports one (a system,
# venv or conda Python: .venv sees its site-packages) and installs only what is missing; with no torch, the CPU
# build on a machine without an NVIDIA driver (TORCH_INDEX=URL picks another wheel index). WHEELS=DIR: offline,
# from a folder of wheels. simpnet_cli/tools/gpusetup.py does it (README: Installing).
PY      ?= python3
WHEELS  ?=
TORCH_INDEX ?=
VENV    ?= .venv
BIN     := $(VENV)/bin
SIMPNET := $(BIN)/simpnet
# Everything the paper trained: every row, 3 seeds (the paper's rows are compared with a spread), the longest
# jobs first on every GPU, jobs per GPU as measured (jobs_per_device=auto: runs/schedule.py), a row's seeds in one
# step where that measures faster (stack=auto), TF32 (the closest to the authors' fp32). Override on the command
# line, e.g.  make reproduce-all SEEDS=1 JOBS_PER_DEVICE=4 RUN_ARGS="precision=bf16"
TABLES ?= all
SEEDS ?= 3
JOBS_PER_DEVICE ?= auto
RUN_ARGS ?=

.PHONY: install smoke test test-fast report reproduce-all reproduce-slurm bench dry-run gpu-check clean-smoke

$(BIN)/simpnet: pyproject.toml
	$(PY) -m simpnet_cli.tools.gpusetup --venv $(VENV) --project test $(if $(WHEELS),--wheels $(WHEELS)) \
	  $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX))
	touch $@

install: $(BIN)/simpnet

# Trains every row of Table 2 for a few iterations on synthetic CIFAR-shaped data (CPU, no download,
# about ten seconds), then renders its report: results/smoke/table2.csv and results/smoke/REPORT.md.
smoke: install
	$(SIMPNET) run table=2 profile=smoke results_dir=results/smoke runs_dir=experiments/smoke
	$(SIMPNET) report table=2 results_dir=results/smoke

# Everything, then the 15 slowest tests (CI prints them too). One pytest worker per core (pytest-xdist), each
# test on one torch thread: small CPU kernels gain little from a second thread, and two workers that each spin
# two OpenMP threads on two cores run many times slower.
TEST_ARGS ?= -n auto --dist worksteal
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(TEST_ARGS) --durations=15

# The inner loop: everything but the tests marked slow (tests/conftest.py lists them).
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(TEST_ARGS) -m "not slow" --durations=10

report: install
	$(SIMPNET) report

# The paper's schedules for every table, on every visible GPU, then the report. Finished runs are
# skipped and interrupted ones resume, so this can be re-run after a crash or preemption.
reproduce-all: install
	$(SIMPNET) run table=$(TABLES) download=true seeds=$(SEEDS) jobs_per_device=$(JOBS_PER_DEVICE) $(RUN_ARGS)
	$(SIMPNET) report

# The same on a SLURM cluster: one job per slice of the longest-first job list (SHARDS=52: about one job per row,
# its 3 seeds stacked or one after another as stack=auto measures on that job's GPU), through Hydra's submitit
# launcher, into the same runs_dir and results_dir (a shared file system) and so the same index. The datasets
# must be in data_dir first (e.g. make reproduce-all once on a login node, interrupted after the downloads).
# SLURM options: RUN_ARGS="hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=1440"
SHARDS ?= 52
LAUNCHER ?= submitit_slurm
reproduce-slurm: install
	$(SIMPNET) run -m table=$(TABLES) seeds=$(SEEDS) shards=$(SHARDS) 'shard=range(0,$(SHARDS))' hydra/launcher=$(LAUNCHER) quiet=true $(RUN_ARGS)
	$(SIMPNET) report

# How long reproduce-all would take here, from a short measured warm-up of each distinct network.
dry-run: install
	$(SIMPNET) run table=$(TABLES) seeds=$(SEEDS) --dry-run $(RUN_ARGS)

# Speed of the chosen rows into results/bench/benchmarks.md (git-ignored), beside the authors' own runs.
bench: install
	$(SIMPNET) bench

# The GPU path end to end (at most 5 minutes on one GPU; each step prints its time): CPU proofs,
# SIGKILL-and-resume on CUDA, graphed vs eager, memory across lr changes, a bench of what decides (8L and
# 5M-C10 alone and packed, k=1 vs k=3 in one step, the grouped-conv probe); figures into
# results/bench/gpu-check.md (git-ignored). On a machine without CUDA it runs the CPU proofs and says which GPU steps it skipped. It uses the machine's own torch (no
# venv if $(PY) imports everything; else .venv-gpu that sees $(PY)'s site-packages, venv or conda, and gets only
# what is missing) and needs no network with WHEELS=DIR, a folder of wheels (`pip wheel -w DIR ...` on a
# connected machine; simpnet_cli/tools/gpusetup.py says which).
gpu-check:
	$(PY) -m simpnet_cli.tools.gpusetup $(if $(WHEELS),--wheels $(WHEELS))

clean-smoke:
	rm -rf results/smoke experiments/smoke
