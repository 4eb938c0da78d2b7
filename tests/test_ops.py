"""Fewer kernels per training step (issue 26, item 3): the ATen ops of one captured step body, counted as
``simpnet bench bench.ops=true`` counts them (tools/ops.py), within each target; and the arithmetic that made
them fewer (bf16 weights cast once per step, the grouped step's per-parameter rates) equal to what it replaced."""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from simpnet_cli import cli
from simpnet_cli.cli import main
from simpnet_cli.config import compose as composition
from simpnet_cli.config import tables
from simpnet_cli.nets import stacked as S
from simpnet_cli.tools import ops
from simpnet_cli.train import state as run_state
from simpnet_cli.train import solvers
from simpnet_cli.train import stacked_step
from simpnet_cli.train import together

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def row(ref: str) -> tables.RunSpec:
    table, _, row_id = ref.partition("/")
    t = tables.load_table(table)
    return tables.resolve(t, t.row(row_id), 0, {"train": {"batch_size": 4}})


# (row, mode, k, most ops per step). Before issue 26: 139, 178, 264 and 359.
TARGETS = [("2/8L", "single", 1, 139), ("2/8L", "bf16", 1, 150), ("4/WE13", "single", 1, 160),
           ("2/8L", "grouped", 3, 220)]


@pytest.mark.parametrize("ref, mode, k, most", TARGETS, ids=[f"{r}-{m}-{k}" for r, m, k, _ in TARGETS])
def test_the_step_launches_no_more_ops_than_its_target(ref, mode, k, most, one_thread):
    run = row(ref)
    assert ref != "4/WE13" or run.solver["type"] == "nesterov", "WE13's target is Nesterov's update"
    counted = ops.count_step(run, mode, k)
    assert sum(counted.values()) <= most, f"{ref} {mode} k={k}: {sum(counted.values())} ops > {most}: {counted}"


def test_the_counter_counts_every_kernel_and_no_view(one_thread):
    x = torch.ones(4, 3)
    with ops.OpCounter() as counter:
        y = x.view(-1).unsqueeze(0).t().detach()  # headers over the same memory: no kernel
        (y + 1).mul_(2).sum()
    assert dict(counter.ops) == {"add": 1, "mul_": 1, "sum": 1}


def test_bench_ops_json_gives_row_mode_k_and_ops_per_step_and_writes_an_ignored_file(tmp_path, capsys, one_thread):
    """The example `simpnet bench --help` shows, as a shell would split it."""
    example = next(line for line in cli.HELP["bench"][1].splitlines() if "e.g. simpnet bench" in line)
    argv = shlex.split(example.split("e.g. simpnet ", 1)[1])
    assert "bench.ops=true" in argv and "--json" in argv
    out = tmp_path / "ops.md"
    code = main(argv + [f"bench.ops_out={out}", f"bench.out={tmp_path}/bench.md", "device=cpu"])
    assert code == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["row"], r["mode"], r["k"]) for r in records] == [
        ("2/8L", "single", 1), ("2/8L", "bf16", 1), ("2/8L", "grouped", 3), ("2/8L", "branched", 3)]
    assert all(set(r) == {"row", "mode", "k", "ops_per_step"} and r["ops_per_step"] > 0 for r in records)
    by_mode = {r["mode"]: r["ops_per_step"] for r in records}
    assert by_mode["single"] == ops.ops_per_step(row("2/8L"), "single")  # the same count as the tests'
    assert by_mode["grouped"] < 3 * by_mode["single"] <= by_mode["branched"]
    text = out.read_text()
    assert "| 2/8L | grouped | 3 |" in text and not (tmp_path / "bench.md").exists()  # counts, no timing


def test_the_default_ops_file_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    default = composition.compose([])[0].bench.ops_out
    ignored = subprocess.run(["git", "check-ignore", "-q", default], cwd=REPO)
    assert ignored.returncode == 0, f"{default} would be a tracked file"


def tiny(solver: str, precision: str = "fp32") -> tables.RunSpec:
    """A small Arch2 network with ghost channels (widths no multiple of 8) and Caffe's lr/decay multipliers."""
    over = composition.overrides_of([
        f"solver={solver}", "dataset=cifar10", "dataset.size=12", "net.widths=C5, C6{2}, C7",
        "net.pools_after=[2,4]", "net.param_mults={convs: {indices: [-2, -1], bias: {lr: 2, decay: 0}},"
        " classifier: {weight: {lr: 1, decay: 1}, bias: {lr: 2, decay: 0}}}"])
    table = tables.custom_table("ops-test", "arch2", {})
    profile = {"train": {"iterations": 4, "batch_size": 4, "precision": precision},
               "data": {"source": "synthetic", "train_size": 16, "test_size": 4}}
    return tables.resolve(table, table.rows[0], 0, profile, overrides=over)


@pytest.mark.parametrize("solver", ["adadelta_30k", "nesterov_80k"])
def test_the_grouped_update_is_each_runs_own_update_bit_for_bit(solver, tmp_path, one_thread):
    """Given the same gradients, the stacked solver stepping each block at its run's rate (the per-parameter
    rate tensors) leaves every run's weights exactly where the run's own solver at its own rate does, in fp32,
    across rate changes and the solver's first step (which makes its state)."""
    run = tiny(solver)
    runs = [dataclasses.replace(run, seed=seed) for seed in (0, 1, 2)]
    states, step = together.build_together(runs, [tmp_path] * 3, CPU, tmp_path, False, "grouped", print)
    gen = torch.Generator().manual_seed(0)
    for lrs in ([0.1, 0.05, 0.3], [0.1, 0.05, 0.3], [0.01, 0.5, 0.03]):
        grads = [{name: torch.randn(p.shape, generator=gen) for name, p in s.model.named_parameters()}
                 for s in states]
        for state, lr, own in zip(states, lrs, grads):
            for name, p in state.model.named_parameters():
                p.grad = own[name].clone()
            for group in state.optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            state.optimizer.step()
        for name, p in step.model.named_parameters():
            p.grad = torch.zeros_like(p)
            for i, own in enumerate(grads):
                p.grad[step.model.slots[name].at(i)] = own[name]
        step._fill_rates(lrs)
        step._set_lr(stacked_step.RATES_ON_DEVICE)
        step.optimizer.step()
    for i, state in enumerate(states):
        mine = S.unstack_weights(step.model, i)
        for name, p in state.model.named_parameters():
            assert torch.equal(mine[name], p.detach()), f"run {i}: {name}"


def test_bf16_weights_cast_once_per_step_train_bit_for_bit_as_autocast_casting_each_use(tmp_path, one_thread):
    run = tiny("nesterov_80k", "bf16")
    weights = []
    for cast_once in (True, False):
        state = run_state.build(run, tmp_path, CPU, tmp_path, False, print, None)
        if not cast_once:  # autocast alone: each weight cast where it is used
            state.step.forward.names = []
        for it in range(3):
            state.step(it, solvers.lr_at(run.solver, it))
        weights.append(state.model.state_dict())
        assert bool(state.step.forward.copies) == cast_once
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
