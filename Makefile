# simpnet: common jobs. `make smoke` on a fresh machine installs into .venv and runs a smoke table.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SIMPNET := $(BIN)/simpnet
# Everything the paper trained, in the order of the paper. Override on the command line, e.g.
#   make reproduce-all RUN_ARGS="seeds=3 jobs_per_device=4"
RUN_ARGS ?=

.PHONY: install smoke test test-fast report reproduce-all bench dry-run gpu-check clean-smoke

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
	$(SIMPNET) run table=all download=true $(RUN_ARGS)
	$(SIMPNET) report

# How long reproduce-all would take here, from a short measured warm-up of each distinct network.
dry-run: install
	$(SIMPNET) run table=all --dry-run $(RUN_ARGS)

bench: install
	$(SIMPNET) bench

# The GPU path end to end (under 10 minutes on one GPU): CPU proofs, SIGKILL-and-resume on CUDA, graphed vs
# eager, memory across lr changes, bench alone and packed; figures into results/benchmarks.md. On a machine
# without CUDA it runs the CPU proofs and says which GPU steps it skipped. It uses the machine's own torch (no
# venv if $(PY) imports everything; else .venv-gpu that sees $(PY)'s site-packages, venv or conda, and gets only
# what is missing) and needs no network with WHEELS=DIR, a folder of wheels (`pip wheel -w DIR ...` on a
# connected machine; simpnet_cli/tools/gpusetup.py says which).
gpu-check:
	$(PY) -m simpnet_cli.tools.gpusetup $(if $(WHEELS),--wheels $(WHEELS))

clean-smoke:
	rm -rf results/smoke experiments/smoke
