"""Several runs in one training step (issue 20), proven on the CPU in float64.

k runs of one network, trained together (grouped: one stacked network; branched: k networks as k branches of
one step) for 20 steps across an lr change, must end where each run ends trained alone: weights, BatchNorm
running statistics, solver state and every step's loss within 1e-10, for every network family, each with
its row's real solver.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from simpnet_cli.config import tables
from simpnet_cli.config import compose as composition
from simpnet_cli.errors import UserError
from simpnet_cli.nets import modules as M
from simpnet_cli.nets import stacked as S
from simpnet_cli.runs import planning, runner
from simpnet_cli.train import checkpoint
from simpnet_cli.train import data as D
from simpnet_cli.train import callbacks as C
from simpnet_cli.train import loop as train
from simpnet_cli.train import state as run_state
from simpnet_cli.train import solvers
from simpnet_cli.train import together
from simpnet_cli.train import captured_step
from simpnet_cli.train import stacked_step

CPU = torch.device("cpu")
TOL = 1e-10
STEPS = 20
SEEDS = (0, 1, 2)


def tiny(arch: str, solver: str, *net: str):
    """(table, profile, overrides) of a tiny network of ``arch`` on 12x12 synthetic images in batches of 8
    (20 images: an epoch wraps inside a batch), its solver's rate dropping tenfold at iteration 5, evaluated
    every 5 iterations and checkpointed every 10."""
    over = composition.overrides_of([
        f"solver={solver}", "solver.schedule.kind=multistep", "solver.schedule.gamma=0.1",
        "solver.schedule.steps=[5]", "dataset=cifar10", "dataset.size=12", *net])
    table = tables.custom_table("stack-test", arch, {})
    profile = {"train": {"iterations": STEPS, "batch_size": 8, "eval_every": 5, "checkpoint_every": 10,
                         "precision": "fp32"},
               "data": {"source": "synthetic", "train_size": 20, "test_size": 16}}
    return table, profile, over


def tiny_run(arch: str, solver: str, *net: str, seed: int = 0) -> tables.RunSpec:
    table, profile, over = tiny(arch, solver, *net)
    return tables.resolve(table, table.rows[0], seed, profile, overrides=over)


# Widths that are no multiple of 8, so every family trains with ghost channels.
FAMILIES = {
    "plain": ("arch1", "adadelta_30k", ["net.widths=C5, C6{2}, C7", "net.pools_after=[2,4]"]),
    "strided": ("arch1", "nesterov_80k", ["net.widths=C5, C6{2}, C7", "net.pools_after=[2,4]",
                                          "net.downsample=strided_conv"]),
    "saf-dropout": ("arch1", "adadelta_30k", ["net.widths=C5, C6{2}, C7", "net.pools_after=[2,4]",
                                              "net.dropout.conv={1-3: 0.2}", "net.dropout.pool={1-2: 0.3}",
                                              "net.dropout.head=0.3"]),
    "residual": ("resnet32", "nesterov_80k", ["net.stages=[{width: 4, blocks: 2}, {width: 6, blocks: 1, "
                                              "shortcut: conv_k2_then_pool}, {width: 5, blocks: 1, "
                                              "shortcut: conv_k2s2}]"]),
    "fire": ("squeezenet11", "adadelta_30k", ["net.stem={out: 6, k: 3, p: 0}", "net.fires=[[3, 5], pool, [4, 6]]",
                                             "net.saf_dropout=0.2", "net.init.on_convs=[-1]"]),
    # Table 10's form: conv -> pool -> BN, convs without BatchNorm, no global pooling (the classifier reads a
    # 2x2 map), and lr/decay multipliers on the last two convs' biases and on the classifier
    "multipliers": ("arch2", "adadelta_30k", ["net.widths=C5, C6{2}, C7", "net.pools_after=[2,4]",
                                              "net.bn_after_pool=[2]", "net.conv_suffix={4: nobn}",
                                              "net.global_pool=none",
                                              "net.param_mults={convs: {indices: [-2, -1], bias: {lr: 2, decay: 0}},"
                                              " classifier: {weight: {lr: 1, decay: 1}, bias: {lr: 2, decay: 0}}}"]),
}


@pytest.fixture
def float64(monkeypatch, one_thread):
    """Images normalised in float64 (the models are made float64 by the tests): differences are then the
    order of summation, not rounding to float32."""
    monkeypatch.setattr(D.DeviceData, "normalize", lambda self, x: (x.double() - self.shift) * self.scale)


def family_run(family: str, seed: int = 0) -> tables.RunSpec:
    arch, solver, net = FAMILIES[family]
    return tiny_run(arch, solver, *net, seed=seed)


def alone(run: tables.RunSpec, tmp_path, seed: int) -> tuple[run_state.TrainState, list[float]]:
    """Run ``seed`` of ``run`` trained by itself, as train_run builds it; with its loss at every step."""
    state = run_state.build(dataclasses.replace(run, seed=seed), tmp_path / f"alone{seed}", CPU, tmp_path, False,
                        print, None)
    state.model.double()
    losses = []
    for it in range(STEPS):
        state.step.reset_loss()
        state.step(it, solvers.lr_at(run.solver, it))
        losses.append(state.step.loss_sum.item())
    return state, losses


def in_one_step(run: tables.RunSpec, tmp_path, how: str, seeds=SEEDS, backend=None, runs=None, made=None):
    """The seeds of ``run`` (or ``runs``) trained in one step (``how``: grouped or branched); the runs'
    ordinary models and optimizers handed back at the end. Returns (states, losses per run, the shared step).
    ``made``: called with the shared step before it trains."""
    runs = runs or [dataclasses.replace(run, seed=seed) for seed in seeds]
    states, generators = [], []
    for one in runs:
        state = run_state.build(one, tmp_path / f"{how}{one.seed}", CPU, tmp_path, False, print, None)
        state.model.double()
        states.append(state)
        generators.append(stacked_step.generator_now(CPU))  # where this run's dropout would draw from now
    net = S.build_stacked(run.spec, run.in_shape, len(runs), run.net).double() if how == "grouped" else None
    step = stacked_step.shared_step(
        how, [s.model for s in states], [s.optimizer for s in states], [s.data for s in states],
        states[0].autocast, backend is not None, generators,
        make_optimizer=lambda n: solvers.make_optimizer(run.solver, solvers.param_groups(n, run.param_mults)),
        net=net, backend=backend)
    if made is not None:
        made(step)
    losses = [[] for _ in runs]
    for it in range(STEPS):
        for member in step.members:
            member.reset_loss()
        step(it, [solvers.lr_at(one.solver, it) for one in runs])
        for i, member in enumerate(step.members):
            losses[i].append(member.loss_sum.item())
    for i, state in enumerate(states):
        step.hand_back(i, state.model, state.optimizer)
    return states, losses, step


def assert_close(a, b, what: str) -> None:
    if torch.is_tensor(a):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=TOL), \
            f"{what}: differs by {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            if key == "lr" and torch.is_tensor(a[key]) != torch.is_tensor(b[key]):
                # a graphed step's groups read their rate from a 0-dim tensor, an eager one's is a number
                assert_close(float(a[key]), float(b[key]), f"{what}.{key}")
                continue
            assert_close(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for n, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{what}[{n}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=0, abs=TOL), what
    else:
        assert a == b, what


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_and_branched_runs_equal_their_separate_twins(family, tmp_path, float64):
    run = family_run(family)
    twins = [alone(run, tmp_path, seed) for seed in SEEDS]
    assert len({tuple(losses) for _, losses in twins}) == len(SEEDS), "the seeds trained alike: proves nothing"
    for how in ("grouped", "branched"):
        states, losses, step = in_one_step(run, tmp_path / how, how)
        for i, (twin, twin_losses) in enumerate(twins):
            assert_close(losses[i], twin_losses, f"{how}, seed {SEEDS[i]}: losses")
            assert_close(states[i].model.state_dict(), twin.model.state_dict(), f"{how}, seed {SEEDS[i]}: model")
            assert_close(states[i].optimizer.state_dict(), twin.optimizer.state_dict(),
                         f"{how}, seed {SEEDS[i]}: solver")
        assert [m.step_mode for m in step.members] == [f"eager, stacked 3 ({how})"] * 3


@pytest.mark.parametrize("how", ["grouped", "branched"])
@pytest.mark.parametrize("family", ["multipliers"])
def test_runs_on_different_rates_and_schedules_in_one_step_equal_their_separate_twins(family, how, tmp_path,
                                                                                     float64):
    run = family_run(family)
    schedules = [{"lr": run.solver["lr"]}, {"lr": run.solver["lr"] * 0.5},
                 {"lr": run.solver["lr"] * 2, "schedule": {**run.solver["schedule"], "steps": [3, 12]}}]
    runs = [dataclasses.replace(run, seed=seed, solver={**run.solver, **change})
            for seed, change in zip(SEEDS, schedules)]
    states, losses, _ = in_one_step(run, tmp_path, how, runs=runs)
    for one, state, run_losses in zip(runs, states, losses):
        twin, twin_losses = alone(one, tmp_path / f"alone-lr{one.solver['lr']}", one.seed)
        assert_close(run_losses, twin_losses, f"lr {one.solver['lr']}: losses")
        assert_close(state.model.state_dict(), twin.model.state_dict(), f"lr {one.solver['lr']}: model")
        assert_close(state.optimizer.state_dict(), twin.optimizer.state_dict(), f"lr {one.solver['lr']}: solver")


@pytest.mark.parametrize("family", ["plain", "fire", "multipliers"])
def test_ghost_channels_stay_zero_and_real_blocks_are_first(family, tmp_path, float64):
    run = family_run(family)
    states, _, step = in_one_step(run, tmp_path, "grouped")
    net = step.model
    assert net.align == 8
    ghosts = 0
    for name, param in net.named_parameters():
        ghost = torch.ones_like(param, dtype=torch.bool)
        for i in range(net.k):
            ghost[net.slots[name].at(i)] = False
        ghosts += int(ghost.sum())
        assert not param[ghost].any(), f"{name}: a ghost weight moved"
        for key, value in step.optimizer.state[param].items():
            if torch.is_tensor(value) and value.shape == param.shape:
                assert not value[ghost].any(), f"{name}: the solver's {key} of a ghost moved"
    assert ghosts > 0, "no ghost channels: the widths were meant to need padding"
    # every conv but the first (it reads the images) reads blocks of a multiple of 8 channels per model
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.in_channels % (8 * net.k) == 0 for c in convs[1:]), "conv inputs not aligned to 8 per model"


def test_stacked_forward_equals_each_model_and_unstacks_exactly():
    run = family_run("residual")
    models = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        models.append(M.build_model(run.spec, run.in_shape, run.net).double().eval())
    net = S.build_stacked(run.spec, run.in_shape, len(models), run.net).double().eval()
    S.stack_weights(net, [m.state_dict() for m in models])
    x = [torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in SEEDS]
    out = net(torch.cat(x, 1))
    assert out.shape == (len(models), 4, 10)
    for i, model in enumerate(models):
        assert torch.allclose(out[i], model(x[i]), rtol=0, atol=TOL)
        back = S.unstack_weights(net, i)
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_stacking_models_whose_batch_counters_differ_is_refused():
    run = family_run("plain")
    a, b = (M.build_model(run.spec, run.in_shape, run.net) for _ in range(2))
    b[0][1].num_batches_tracked += 1
    net = S.build_stacked(run.spec, run.in_shape, 2, run.net)
    with pytest.raises(ValueError, match="num_batches_tracked differs"):
        S.stack_weights(net, [a.state_dict(), b.state_dict()])


# --------------------------------------------------------------------------- the CUDA-graph path, with stand-ins

from test_gpu_path import HostSyncCheck, StandInGraph, stand_in  # noqa: E402 - the stand-ins live there


def baking(calls: list) -> tuple[captured_step.GraphBackend, Callable]:
    """The stand-in backend, whose capture turns every number lr the shared step's optimizers hold (the grouped
    one's, or each branch's) into a constant of the graph, as a real capture does; and the ``made`` hook of
    ``in_one_step`` that tells it the step."""
    base, held = stand_in(calls), {}

    def capture(graph, body, stream):
        base.capture(graph, body, stream)
        step = held["step"]
        optimizers = [b.optimizer for b in step.branches] if step.how == "branched" else [step.optimizer]
        graph.baked = [(g, "lr", g["lr"]) for o in optimizers for g in o.param_groups if not torch.is_tensor(g["lr"])]

    return captured_step.GraphBackend(**{**base.__dict__, "capture": capture}), lambda step: held.update(step=step)


@pytest.mark.parametrize("how", ["grouped", "branched"])
def test_a_graphed_shared_step_across_an_lr_change_equals_the_eager_one_with_one_capture(how, tmp_path, float64):
    """The lr drops inside the run: the one graph must read each run's new rate (a rate baked into the graph as
    a number would stay the old one at replay, which the stand-in reproduces)."""
    run = family_run("saf-dropout")
    assert len({solvers.lr_at(run.solver, it) for it in range(STEPS)}) > 1, "no lr change: proves nothing"
    calls: list = []
    backend, made = baking(calls)
    graphed, graphed_losses, step = in_one_step(run, tmp_path / "graphed", how, backend=backend, made=made)
    eager, eager_losses, _ = in_one_step(run, tmp_path / "eager", how)
    assert_close(graphed_losses, eager_losses, "losses")
    for i in range(len(SEEDS)):
        assert_close(graphed[i].model.state_dict(), eager[i].model.state_dict(), f"run {i}: model")
        assert_close(graphed[i].optimizer.state_dict(), eager[i].optimizer.state_dict(), f"run {i}: solver")
    # both keep the rates on the device (grouped: its rate tensors; branched: each branch's lr tensors): one capture
    assert [c[0] for c in calls].count("capture") == 1
    assert step.updates.tolist() == [STEPS] * len(SEEDS), "one update per run per iteration"
    assert [m.step_mode for m in step.members] == [f"cuda-graph, stacked 3 ({how})"] * 3


@pytest.mark.parametrize("how", ["grouped", "branched"])
def test_a_shared_warm_up_that_fails_after_updating_is_undone_before_the_eager_step(how, tmp_path, float64):
    """The warm-up's update is applied (grouped: the stacked solver's; branched: every branch's but the last, so
    it stops midway), then the driver fails: the eager fallback starts from the state before it, each run's
    dropout generator included, and every run equals its eager twin with one update per iteration."""
    run = family_run("saf-dropout")

    def fail_once(step):
        optimizer = step.branches[-1].optimizer if how == "branched" else step.optimizer
        real, calls = optimizer.step, []

        def failing_midway(*args, **kwargs):
            real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        optimizer.step = failing_midway

    with pytest.warns(RuntimeWarning, match="continues eagerly"):
        failed, failed_losses, step = in_one_step(run, tmp_path / "failed", how, backend=stand_in(), made=fail_once)
    eager, eager_losses, _ = in_one_step(run, tmp_path / "eager", how)
    assert [m.step_mode for m in step.members] == \
        [f"eager (capture failed: RuntimeError: CUDA error: an illegal memory access was encountered), stacked 3 "
         f"({how})"] * 3
    assert step.updates.tolist() == [STEPS] * len(SEEDS), "one update per run per iteration"
    assert_close(failed_losses, eager_losses, "losses")
    for i in range(len(SEEDS)):
        assert_close(failed[i].model.state_dict(), eager[i].model.state_dict(), f"run {i}: model")
        assert_close(failed[i].optimizer.state_dict(), eager[i].optimizer.state_dict(), f"run {i}: solver")


def test_branched_capture_forks_each_run_onto_its_own_stream_once(tmp_path, float64):
    run = family_run("plain")
    calls: list = []
    in_one_step(run, tmp_path, "branched", backend=stand_in(calls))
    streams = [c for c in calls if c[0] == "new_stream"]
    assert len(streams) == 1 + len(SEEDS), "the capture stream and one stream per branch, made once"
    scopes = [c[1] for c in calls if c[0] == "stream_scope"]
    branch_streams = set(map(id, scopes)) - {id(scopes[0])}
    assert len(branch_streams) == len(SEEDS)


@pytest.mark.parametrize("times", [0, 2])
def test_the_update_counts_show_a_graph_that_does_nothing_or_too_much_for_every_run(times, tmp_path, float64):
    run = family_run("plain")
    backend = captured_step.GraphBackend(**{**stand_in().__dict__, "new_graph": lambda: StandInGraph(times)})
    _, _, step = in_one_step(run, tmp_path, "grouped", backend=backend)
    # one warm-up (the rates live on the device: no re-capture at the lr change), 19 replays ``times`` times
    assert step.updates.tolist() == [1 + 19 * times] * len(SEEDS)


@pytest.mark.parametrize("how", ["grouped", "branched"])
@pytest.mark.parametrize("times", [0, 2])
def test_the_canary_stops_stacked_runs_whose_graph_does_nothing_or_too_much(how, times, tmp_path, one_thread):
    runs = family_plan("plain")
    backend = captured_step.GraphBackend(**{**stand_in().__dict__, "new_graph": lambda: StandInGraph(times)})
    with pytest.raises(UserError, match=r"applied \d+ updates in 5 iterations \(cuda-graph, stacked 3 "
                                        + f"\\({how}\\)\\)"):
        train.train(runs, [tmp_path / r.config_hash for r in runs], CPU, tmp_path, False, how, backend=backend)
    assert not any((tmp_path / r.config_hash / "result.json").exists() for r in runs)


@pytest.mark.parametrize("family", ["saf-dropout", "residual", "fire", "multipliers"])
@pytest.mark.parametrize("how", ["grouped", "branched"])
def test_the_captured_shared_step_has_no_host_sync(family, how, tmp_path, float64):
    run = family_run(family)
    graphs: list[StandInGraph] = []
    backend = captured_step.GraphBackend(**{**stand_in().__dict__,
                                            "new_graph": lambda: graphs.append(StandInGraph()) or graphs[-1]})
    in_one_step(run, tmp_path, how, backend=backend)
    with HostSyncCheck() as check:
        graphs[-1].body()
    assert check.found == [], f"host-synchronising ops in the captured step: {check.found}"


# --------------------------------------------------------------------------- runs trained together by the runner

def family_plan(family: str, seeds=3) -> list[tables.RunSpec]:
    arch, solver, net = FAMILIES[family]
    table, profile, over = tiny(arch, solver, *net)
    return planning.plan([table], None, seeds, profile, overrides=over)


def planned(runs: list[tables.RunSpec], opts: planning.Options) -> list[tables.RunSpec]:
    """The runs as the runner trains them (a stacked run's hash names its shared step), in the order given."""
    stepped = {r.in_step("").config_hash: r for g, _ in planning.plan_groups(runs, opts, CPU) for r in g}
    return [stepped[r.config_hash] for r in runs]


def options(root, stack="off", **over) -> planning.Options:
    return planning.Options(**{"data_dir": root / "data", "download": False, "results_dir": root / "results",
                             "runs_dir": root / "runs", "device": "cpu", "jobs_per_device": 1, "profile": "test",
                             "quiet": True, "stack": stack, **over})


def test_stack_groups_take_the_runs_of_one_network_n_at_a_time():
    a, b = family_plan("saf-dropout"), family_plan("plain", seeds=2)
    assert planning.stack_groups(a + b, 2) == [a[:2], [a[2]], b]
    assert planning.stack_groups(a + b, 1) == [[r] for r in a + b]
    assert planning.stack_groups(a + b, 4) == [a, b]
    # a variant on another rate or schedule shares the step (each run's rate is its own); another solver not
    slower = [dataclasses.replace(r, solver={**r.solver, "lr": r.solver["lr"] / 2}) for r in b]
    decayed = [dataclasses.replace(r, solver={**r.solver, "weight_decay": 0.0}) for r in b]
    assert planning.stack_groups(b + slower + decayed, 4) == [b + slower, decayed]
    cpu = torch.device("cpu")
    assert [planning.stack_size(v, cpu) for v in ("auto", "off", 3, "2")] == [1, 1, 3, 2]


def fake_timer(rates: dict, calls: list):
    """A stand-in for together.time_steps: ``rates[how]`` img/s, each call logged."""
    def timer(run, device, how, k, iters, warmup, seen=None):
        calls.append((run.seed, how, k))
        return rates[how]
    return timer


@pytest.mark.parametrize("rates, expected", [
    ({"separate": 900.0, "grouped": 2500.0, "branched": 1800.0}, (3, "grouped")),
    ({"separate": 900.0, "grouped": 700.0, "branched": 1800.0}, (3, "branched")),
    ({"separate": 900.0, "grouped": 700.0, "branched": 850.0}, (1, "separate")),  # never slower than separate
])
def test_stack_auto_on_a_gpu_keeps_the_fastest_way_measured_once_per_device_and_network(rates, expected):
    runs, cache, calls = family_plan("plain"), {}, []
    gpu = torch.device("cuda")  # (a device name only: nothing runs on it)
    assert planning.auto_choice(runs, gpu, "H100", cache, fake_timer(rates, calls)) == expected
    n = planning.AUTO_WINDOWS
    assert sorted(c[1] for c in calls) == sorted(["branched", "grouped", "separate"] * n) and {c[2] for c in calls} == {3}
    assert planning.auto_choice(runs, gpu, "H100", cache, fake_timer(rates, calls)) == expected
    assert len(calls) == 3 * n, "measured once per device and network"
    planning.auto_choice(runs, gpu, "H200", cache, fake_timer(rates, calls))
    planning.auto_choice(family_plan("strided"), gpu, "H100", cache, fake_timer(rates, calls))
    assert len(calls) == 9 * n, "another device or another network is measured again"


def test_stack_auto_trains_separately_on_the_cpu_without_measuring(tmp_path):
    calls: list = []
    groups = planning.plan_groups(family_plan("plain"), options(tmp_path, stack="auto"), CPU,
                                fake_timer({"separate": 1.0, "grouped": 9.0, "branched": 9.0}, calls))
    assert [(len(g), how) for g, how in groups] == [(1, "separate")] * 3 and calls == []


def test_stack_auto_plans_each_network_as_measured_and_keeps_the_measurements(tmp_path, monkeypatch):
    monkeypatch.setattr(run_state, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    runs = family_plan("plain", seeds=5) + family_plan("strided", seeds=2)
    timer = fake_timer({"separate": 900.0, "grouped": 2500.0, "branched": 1800.0}, [])
    groups = planning.plan_groups(runs, options(tmp_path, stack="auto"), torch.device("cuda"), timer)
    assert [(len(g), how) for g, how in groups] == [(4, "grouped"), (1, "separate"), (2, "grouped")]
    kept = json.loads((tmp_path / "runs" / planning.STACK_CHOICES).read_text())
    assert len(kept) == 2 and all(k.startswith("NVIDIA H100 80GB HBM3 | ") for k in kept)
    assert {v["fastest"] for v in kept.values()} == {"grouped"}


@pytest.mark.parametrize("value", [0, -1, "many", True, 2.5, "2x"])
def test_a_bad_stack_is_one_line_before_anything_trains(value, tmp_path):
    with pytest.raises(UserError, match=r"^stack=.*: use auto, off, or the number of runs"):
        runner.execute(family_plan("plain"), options(tmp_path, stack=value))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_bad_stack_mode_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^stack_mode='sideways': use grouped or branched$"):
        runner.execute(family_plan("plain"), options(tmp_path, stack=3, stack_mode="sideways"))


def read_curve(run_dir) -> list[dict]:
    with open(run_dir / "curve.csv") as fh:
        return [{k: float(v) for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(fh)]


def assert_same_record(a, b, tol: float) -> None:
    """Two run folders hold the same training (curves and weights within ``tol``; float32 here)."""
    ca, cb = read_curve(a), read_curve(b)
    assert [c["iter"] for c in ca] == [c["iter"] for c in cb] == [5, 10, 15, 20]
    for x, y in zip(ca, cb):
        assert x == pytest.approx(y, rel=tol, abs=tol)
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert wa.keys() == wb.keys()
    for name in wb:
        assert torch.allclose(wa[name].double(), wb[name].double(), rtol=tol, atol=tol), name


@pytest.mark.parametrize("how", ["grouped", "branched"])
def test_stacked_runs_write_exactly_what_single_runs_write(how, tmp_path, one_thread):
    runs = family_plan("saf-dropout")
    stacked_opts = options(tmp_path / "stacked", stack=3, stack_mode=how)
    counts = runner.execute(runs, stacked_opts)
    assert counts == {"ok": 3}
    runner.execute(runs, options(tmp_path / "single", stack="auto"))  # auto: separately on the CPU
    for run, in_step in zip(runs, planned(runs, stacked_opts)):
        assert in_step.config_hash != run.config_hash, "a stacked run is a computation of its own"
        stacked, single = (tmp_path / "stacked" / "runs" / in_step.config_hash, tmp_path / "single" / "runs" / run.config_hash)
        assert sorted(p.name for p in stacked.iterdir()) == sorted(p.name for p in single.iterdir())
        rs, r1 = (json.loads((d / "result.json").read_text()) for d in (stacked, single))
        assert rs.keys() == r1.keys() and rs["iterations"] == r1["iterations"] == STEPS
        assert (rs["step_mode"], r1["step_mode"]) == (f"eager, stacked 3 ({how})", "eager")
        assert_same_record(stacked, single, 1e-4 if how == "grouped" else 0)
    lines = {kind: (tmp_path / kind / "results" / "tablestack-test.csv").read_text().splitlines()
             for kind in ("stacked", "single")}
    assert len(lines["stacked"]) == len(lines["single"]) == 4, "a header and one line per run"
    assert lines["stacked"][0] == lines["single"][0]
    # finished runs are recorded: running the command again trains nothing
    assert runner.execute(runs, options(tmp_path / "stacked", stack=3, stack_mode=how)) == {"skipped": 3}


def test_packed_stacked_groups_are_planned_one_job_per_worker_slot(tmp_path):
    """jobs_per_device=2 with stack=2: the groups of two and the lone leftover run, each a job for one worker
    (the plan alone: the fast tier's part of the test below, which trains them in the worker pool)."""
    saf, plain = family_plan("saf-dropout"), family_plan("plain", seeds=2)
    opts = options(tmp_path, stack=2, jobs_per_device=2)
    assert [len(g) for g, _ in planning.plan_groups(saf + plain, opts, CPU)] == [2, 1, 2]


@pytest.mark.slow
def test_packed_stacked_groups_are_one_job_per_worker_slot(tmp_path, one_thread):
    """jobs_per_device=2 with stack=2: each group trains together in one worker (its runs' step is shared, so
    they were in one process), a lone leftover run alone; every run is recorded once, and again is skipped."""
    saf, plain = family_plan("saf-dropout"), family_plan("plain", seeds=2)
    opts = options(tmp_path, stack=2, jobs_per_device=2)
    assert [len(g) for g, _ in planning.plan_groups(saf + plain, opts, CPU)] == [2, 1, 2]
    assert runner.execute(saf + plain, opts) == {"ok": 5}
    modes = [json.loads((tmp_path / "runs" / r.config_hash / "result.json").read_text())["step_mode"]
             for r in planned(saf + plain, opts)]
    assert modes == ["eager, stacked 2 (grouped)"] * 2 + ["eager"] + ["eager, stacked 2 (grouped)"] * 2
    assert runner.execute(saf + plain, opts) == {"skipped": 5}


def stacked_accuracies(net: S.StackedNet, data: D.DeviceData) -> list[float]:
    """Each model's test accuracy (%) evaluated inside the stack (the test images given to every model)."""
    net.eval()
    correct = torch.zeros(net.k)
    with torch.no_grad():
        for x, y in data.test_batches():
            logits = net(x.repeat(1, net.k, 1, 1))
            correct += (logits.argmax(2) == y).sum(1)
    return (100.0 * correct / len(data.test_y)).tolist()


def test_an_unstacked_model_loads_and_scores_what_it_scored_inside_the_stack(tmp_path, one_thread):
    from simpnet_cli import load_model

    runs = family_plan("residual")
    dirs = [tmp_path / r.config_hash for r in runs]
    for run, run_dir in zip(runs, dirs):
        run_state.write_config(run, run_dir)
    states, step = together.build_together(runs, dirs, CPU, tmp_path, False, "grouped", print)
    results = train.fit(states, step, [[] for _ in runs])
    inside = stacked_accuracies(step.model, states[0].data)
    for state, result, acc in zip(states, results, inside):
        run_state.write_outcome(state, result)
        model = load_model(state.run_dir)
        assert not model.training
        alone_acc, _ = run_state.evaluate(model, state.data, state.autocast)
        assert alone_acc == pytest.approx(acc, abs=1e-9) == pytest.approx(result["final_acc"], abs=1e-3)


KILL_AFTER_CHECKPOINTS = """
import os, pickle, signal, sys
import torch
torch.set_num_threads(1)
from simpnet_cli.runs import planning, runner
from simpnet_cli.train import callbacks

runs, opts, after = pickle.load(open(sys.argv[1], "rb"))
real, written = callbacks.Checkpoints.on_checkpoint, []

def on_checkpoint(self, state):
    real(self, state)
    written.append(state.run.seed)
    if len(written) == after:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would: no clean-up at all

callbacks.Checkpoints.on_checkpoint = on_checkpoint
runner.execute(runs, opts)
"""


def kill_after_checkpoints(tmp_path, runs, opts, after: int) -> None:
    """Train ``runs`` in a child process that is SIGKILLed right after its ``after``-th checkpoint write."""
    plan = tmp_path / "plan.pkl"
    plan.write_bytes(pickle.dumps((runs, opts, after)))
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_CHECKPOINTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(plan)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The seeds of saf-dropout trained together by the runner, uninterrupted: (runs, options)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    runs, opts = family_plan("saf-dropout"), options(tmp_path_factory.mktemp("straight"), stack=3)
    runner.execute(runs, opts)
    torch.set_num_threads(before)
    return runs, opts


def assert_resumed_equals_straight(runs, resumed: planning.Options, straight: planning.Options, mode: str, tol: float):
    for run in planned(runs, resumed):
        run_dir = resumed.runs_dir / run.config_hash
        assert json.loads((run_dir / "result.json").read_text())["step_mode"] == mode
        assert_same_record(run_dir, straight.runs_dir / run.config_hash, tol)
        assert not (run_dir / "checkpoint.pt").exists()


def test_an_interrupted_stacked_run_resumes_together_to_the_same_record(straight, tmp_path, one_thread,
                                                                        crash_at):
    runs, straight_opts = straight

    opts = options(tmp_path, stack=3)
    crash_at(13)
    with pytest.raises(KeyboardInterrupt):
        runner.execute(runs, opts)
    crash_at(None)
    assert [checkpoint.iteration(opts.runs_dir / r.config_hash / "checkpoint.pt") for r in planned(runs, opts)] == [10] * 3
    assert runner.execute(runs, opts) == {"ok": 3}
    assert_resumed_equals_straight(runs, opts, straight_opts, "eager, stacked 3 (grouped)", 0)


@pytest.mark.parametrize("after", [3, 2], ids=["after-the-groups-checkpoints", "between-two-runs-checkpoints"])
@pytest.mark.slow
def test_a_stacked_run_killed_and_resumed_equals_the_uninterrupted_one(after, straight, tmp_path, one_thread):
    """Killed after the group's checkpoints, or between two of them (runs 0 and 1 at iteration 10, run 2 with
    none): the group resumes together either way (the second from iteration 0: a run resumed alone would be
    another computation than its hash), to the very records of the uninterrupted runs."""
    runs, straight_opts = straight
    killed = options(tmp_path, stack=3)
    kill_after_checkpoints(tmp_path, runs, killed, after)
    dirs = [killed.runs_dir / r.config_hash for r in planned(runs, killed)]
    assert [checkpoint.iteration(d / "checkpoint.pt") for d in dirs] == [10, 10, 10][:after] + [None] * (3 - after)
    assert not any((d / "result.json").exists() for d in dirs)
    assert runner.execute(runs, killed) == {"ok": 3}
    assert_resumed_equals_straight(runs, killed, straight_opts, "eager, stacked 3 (grouped)", 0)
    assert not any((d / "checkpoint.previous.pt").exists() for d in dirs)


def test_a_passenger_trains_in_its_place_and_logs_shows_and_judges_nothing(tmp_path, one_thread):
    """loop.train's last ``passengers`` runs fill places of the step: the real runs' callbacks, loggers and progress
    see only the real runs."""
    runs = family_plan("plain")[:2]
    dirs = [tmp_path / r.config_hash for r in runs] + [tmp_path / "rider"]
    seen, events = [], []

    class Evals:
        def on_eval(self, state, acc, loss):
            seen.append(state.run_dir.name)

    train.train(runs + runs[:1], dirs, CPU, tmp_path, False, "grouped", progress=[events.append] * 2 + [None],
                callbacks=[Evals()], passengers=1)
    assert set(seen) == {d.name for d in dirs[:2]} and len(seen) == 2 * 4  # (evaluated at 5, 10, 15, 20)
    assert (dirs[0] / "curve.csv").exists() and not (dirs[2] / "curve.csv").exists()
    assert {ev.kind for ev in events} and (dirs[2] / "result.json").exists()


def test_a_group_a_checkpoint_apart_goes_back_to_the_previous_checkpoint(tmp_path):
    """The ahead runs of a group killed between two checkpoint writes return to the one they kept."""
    dirs = [tmp_path / str(i) for i in range(3)]
    for d in dirs:
        d.mkdir()
    def write(path, it):
        checkpoint.save(path, {key: it for key in checkpoint.KEYS} | {"iteration": it}, "h")
    for d, (now, before) in zip(dirs, [(20, 10), (10, None), (10, None)]):
        write(d / "checkpoint.pt", now)
        if before is not None:
            write(d / "checkpoint.previous.pt", before)
    notes = []
    runner.align_checkpoints(dirs, notes.append)
    assert [checkpoint.iteration(d / "checkpoint.pt") for d in dirs] == [10, 10, 10]
    assert notes == ["the runs trained together resume from iteration 10 (a process was killed between two of "
                     "their checkpoint writes)"]
    write(dirs[0] / "checkpoint.pt", 30)  # two apart: no checkpoint of run 0 at 10 is left, the group starts over
    runner.align_checkpoints(dirs, notes.append)
    assert not any((d / "checkpoint.pt").exists() for d in dirs) and "start over" in notes[-1]


@pytest.mark.slow
def test_a_stacked_run_whose_group_mates_are_recorded_trains_in_a_step_of_its_size(straight, tmp_path, one_thread):
    """Seed 1 of a group of three already recorded (its folder copied in): seeds 0 and 2 train with a passenger
    in its place, so their arithmetic is the hash's (a step of three), and their records equal the straight ones;
    the passenger leaves nothing behind."""
    import shutil

    runs, straight_opts = straight
    opts = options(tmp_path, stack=3)
    mine = planned(runs, opts)
    shutil.copytree(straight_opts.runs_dir / mine[1].config_hash, opts.runs_dir / mine[1].config_hash)
    for name in list((opts.runs_dir / mine[1].config_hash / "records").glob("*.json")):
        name.unlink()
    from simpnet_cli.runs import index
    index.write_record(opts.runs_dir / mine[1].config_hash, opts.results_dir,
                       index.record_of(mine[1], opts.runs_dir / mine[1].config_hash, opts.profile))
    index.rebuild_tables(opts.results_dir, opts.runs_dir, {mine[1].table}, lambda m: None)
    assert runner.execute(runs, opts) == {"skipped": 1, "ok": 2}
    assert_resumed_equals_straight(runs, opts, straight_opts, "eager, stacked 3 (grouped)", 0)
    assert sorted(p.name for p in opts.runs_dir.iterdir() if p.is_dir()) == sorted(r.config_hash for r in mine)


# --------------------------------------------------------------------------- the benchmark

@pytest.mark.slow
def test_bench_reports_separate_grouped_and_branched_at_each_k_on_a_labelled_device(tmp_path, capsys, one_thread):
    from simpnet_cli.cli import main

    out = tmp_path / "bench.md"
    code = main(["bench", "bench.rows=[5/P5]", "bench.iters=1", "bench.warmup=1", "bench.s1=false",
                 "bench.batch_size=4", "bench.pack=[1]", "bench.stack=[1,2]", f"bench.out={out}", "device=cpu"])
    assert code == 0
    text = out.read_text()
    assert run_state.device_name(CPU) in text and "eager, CPU" in text
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| 5/P5 | 1 |") or line.startswith("| 5/P5 | 2 |")]
    assert [(r[1], r[2]) for r in rows] == [(k, how) for k in ("1", "2") for how in ("separate", "grouped", "branched")]
    for _, k, _, step_mode, per_run, total, *_ in rows:
        assert step_mode.startswith("eager")
        assert float(total.replace(",", "")) == pytest.approx(int(k) * float(per_run.replace(",", "")), rel=0.01, abs=1)
        assert float(total.replace(",", "")) > 0


def test_dry_run_times_the_runs_as_they_would_be_stacked(tmp_path, capsys, one_thread):
    from simpnet_cli.cli import main

    code = main(["run", "table=5", "row=P5", "seeds=2", "stack=2", "stack_mode=branched", "--dry-run",
                 "dry_run.iters=1", "dry_run.batch_size=2", f"results_dir={tmp_path}/r", f"runs_dir={tmp_path}/e"])
    assert code == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("dry-run: timing")] == [
        "dry-run: timing network 1/1 (table 5, row P5, 53,370 params, 2 runs in one step, branched)"]
    assert "up to 2 runs in one step (branched) per device" in captured.out
    assert "| 5 | 2 |" in captured.out
    assert not (tmp_path / "e").exists()


def test_a_run_that_diverges_stops_alone_and_the_others_train_on_undisturbed(tmp_path, one_thread):
    runs = family_plan("plain")

    class Poison:
        """Run 1 starts from NaN weights: its loss is NaN from the first step."""

        def on_start(self, state):
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))

    dirs = [tmp_path / "together" / r.config_hash for r in runs]
    for run, run_dir in zip(runs, dirs):
        run_state.write_config(run, run_dir)
    states, step = together.build_together(runs, dirs, CPU, tmp_path, False, "grouped", print)
    per_run = [train.run_callbacks(C.loggers_for("csv"), None, [Poison()] if i == 1 else []) for i in range(len(runs))]
    results = train.fit(states, step, per_run)
    assert [r["status"] for r in results] == ["ok", "diverged", "ok"]
    assert results[1]["iterations"] == 5 and results[0]["iterations"] == results[2]["iterations"] == STEPS
    for i in (0, 2):
        run_state.write_outcome(states[i], results[i])
        single = train.train_run(runs[i], tmp_path / "single" / str(i), CPU, tmp_path, False)
        assert single["final_acc"] == results[i]["final_acc"]
        assert_same_record(dirs[i], tmp_path / "single" / str(i), 1e-4)
