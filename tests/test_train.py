"""train.py: Caffe's learning-rate schedules, short CPU runs (files, determinism, resume) and one real-data
run on Fashion-MNIST that must learn."""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from simpnet_cli.train import data as D
from simpnet_cli.nets import modules as M
from simpnet_cli.train import checkpoint
from simpnet_cli.train import loop as train
from simpnet_cli.train import solvers
from simpnet_cli.train import state as run_state
from simpnet_cli.nets import specs as N
from simpnet_cli.errors import UserError

from conftest import resolve_row

CPU = torch.device("cpu")

# --------------------------------------------------------------------------- learning-rate schedules

T10_STEPS = [50000, 95000, 220000, 295000, 320000, 270000]  # Table 10's solver, unsorted as the authors wrote it


def _multistep(steps, lr=0.1, gamma=0.1) -> dict:
    return {"lr": lr, "schedule": {"kind": "multistep", "gamma": gamma, "steps": steps}}


def caffe_multistep(solver: dict, last: int) -> list[float]:
    """Caffe's SGDSolver::GetLearningRate("multistep") called once per iteration 0..last: the step counter
    moves on (by at most one per iteration) while ``iter >= stepvalue(current_step)``."""
    steps, gamma, base = solver["schedule"]["steps"], solver["schedule"]["gamma"], solver["lr"]
    step, out = 0, []
    for it in range(last + 1):
        if step < len(steps) and it >= steps[step]:
            step += 1
        out.append(base * gamma ** step)
    return out


@pytest.mark.parametrize("iteration,n_steps", [
    (0, 0), (49999, 0), (50000, 1), (94999, 1), (95000, 2), (219999, 2), (220000, 3),
    (269999, 3), (270000, 3),  # 270000 is listed after 320000: not reached yet
    (294999, 3), (295000, 4),
    (300000, 4),               # 50000, 95000, 220000 and 295000 passed; 320000 is next and not passed
    (319999, 4), (330000, 6),  # past 320000 the counter moves on to the (already passed) 270000
    (400000, 6),
])
def test_multistep_unsorted_steps_follow_caffe(iteration, n_steps):
    assert solvers.lr_at(_multistep(T10_STEPS), iteration) == pytest.approx(0.1 * 0.1 ** n_steps, rel=1e-12)


def test_multistep_at_300000_is_four_steps_down():
    # The brief's first guess was 0.1 * 0.1**3; by Caffe's rule 295000 has also been passed at 300000.
    assert solvers.lr_at(_multistep(T10_STEPS), 300000) == pytest.approx(1e-5)


def test_multistep_sorted_steps():
    solver = _multistep([5000, 10000, 15000, 25000], lr=0.01)
    assert [solvers.lr_at(solver, i) for i in (0, 4999, 5000, 10000, 14999, 15000, 25000, 10 ** 6)] == \
        pytest.approx([0.01, 0.01, 1e-3, 1e-4, 1e-4, 1e-5, 1e-6, 1e-6])


def test_multistep_matches_caffe_step_by_step():
    """lr_at is a pure function of the iteration; Caffe's counter is state that moves at most one step per
    iteration. Compared at every iteration of the windows around each step of the Table 10 list (and the
    whole of a short run), the two must agree."""
    solver = _multistep(T10_STEPS)
    caffe = caffe_multistep(solver, 330_100)
    windows = [range(0, 1000)] + [range(s - 50, s + 50) for s in sorted(T10_STEPS)] + [range(329_900, 330_100)]
    bad = [(it, solvers.lr_at(solver, it), caffe[it]) for w in windows for it in w
           if not math.isclose(solvers.lr_at(solver, it), caffe[it], rel_tol=1e-12)]
    assert not bad, f"lr_at differs from Caffe at (iteration, lr_at, caffe): {bad[:5]}"


def test_piecewise_points_unsorted():
    solver = {"lr": 0.1, "schedule": {"kind": "piecewise",
                                      "points": {22000: 1e-4, 0: 0.1, 9500: 1e-3, 29600: 1e-5, 5000: 0.01}}}
    got = [solvers.lr_at(solver, i) for i in (0, 4999, 5000, 9499, 9500, 21999, 22000, 29599, 29600, 10 ** 6)]
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


def test_piecewise_string_keys_and_no_zero_point():
    solver = {"lr": 0.5, "schedule": {"kind": "piecewise", "points": {"100": 0.05, "20": "0.25"}}}
    assert [solvers.lr_at(solver, i) for i in (0, 19, 20, 99, 100)] == pytest.approx([0.5, 0.5, 0.25, 0.25, 0.05])


def test_unknown_schedule_is_a_user_error():
    from simpnet_cli.errors import UserError
    with pytest.raises(UserError, match="schedule kind"):
        solvers.lr_at({"lr": 0.1, "schedule": {"kind": "cosine"}}, 0)


def test_table_solvers_resolve_to_their_schedules():
    t10 = resolve_row("10", "5x5-start").solver
    assert t10["schedule"]["steps"] == T10_STEPS
    assert solvers.lr_at(t10, 60000) == pytest.approx(0.01) and solvers.lr_at(t10, 111_499) == pytest.approx(1e-3)
    t13 = resolve_row("13", "SimpNet").solver
    assert [solvers.lr_at(t13, i) for i in (0, 5000, 9500, 22000, 29400)] == pytest.approx([0.1, 0.01, 1e-3, 1e-4, 1e-4])


# --------------------------------------------------------------------------- short CPU runs on synthetic data

SHORT = {"train": {"iterations": 30, "batch_size": 16, "eval_every": 10, "checkpoint_every": 1000},
         "data": {"source": "synthetic", "train_size": 256, "test_size": 32}}
RESULT_KEYS = {"status", "final_acc", "best_acc", "best_iter", "iterations", "epochs", "wall_s", "img_per_s",
               "device", "precision", "params_paper", "params_total"}


def _short_run(tmp: Path, seed: int = 0, profile: dict = SHORT, name: str | None = None):
    run = resolve_row("5", "P5", profile, seed=seed)
    run_dir = tmp / (name or f"seed{seed}")
    result = train.train_run(run, run_dir, CPU, tmp / "data", False)
    return run, run_dir, result


def _curve(run_dir: Path) -> list[dict]:
    with open(run_dir / "curve.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _without_wall(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in curve]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """Table 5's 53K network for 30 iterations on synthetic CIFAR-shaped data: seed 0 twice, seed 1 once."""
    tmp = tmp_path_factory.mktemp("short_runs")
    return {name: _short_run(tmp, seed, name=name) for name, seed in (("a", 0), ("b", 0), ("c", 1))}


@pytest.mark.slow
def test_short_run_writes_its_files(short_runs):
    run, run_dir, result = short_runs["a"]
    assert {p.name for p in run_dir.iterdir() if not p.name.startswith(".")} == \
        {"config.yaml", "curve.csv", "model.pt", "result.json"}
    assert not (run_dir / "checkpoint.pt").exists()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["config_hash"] == run.config_hash and cfg["row_id"] == "P5" and cfg["train"]["iterations"] == 30
    assert (run_dir / "curve.csv").read_text().splitlines()[0] == "iter,test_acc,test_loss,train_loss,lr,wall_s"
    curve = _curve(run_dir)
    assert [int(r["iter"]) for r in curve] == [10, 20, 30]
    assert all(float(r["lr"]) == pytest.approx(0.01) for r in curve)
    saved = json.loads((run_dir / "result.json").read_text())
    assert set(saved) >= RESULT_KEYS and saved == json.loads(json.dumps(result))
    assert result["status"] == "ok" and result["iterations"] == 30
    assert result["final_acc"] == pytest.approx(float(curve[-1]["test_acc"]))
    assert result["best_acc"] == pytest.approx(max(float(r["test_acc"]) for r in curve), abs=1e-3)
    assert result["epochs"] == pytest.approx(30 * 16 / 256)
    assert (result["params_paper"], result["params_total"]) == (53_370, 53_912)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model = M.build_model(run.spec, run.in_shape, run.net)
    model.load_state_dict(state)


@pytest.mark.slow
def test_short_run_lowers_the_training_loss(short_runs):
    for name in ("a", "c"):
        curve = _curve(short_runs[name][1])
        first, last = float(curve[0]["train_loss"]), float(curve[-1]["train_loss"])
        assert last < 0.8 * first, f"run {name}: train loss {first} -> {last}"
        assert all(math.isfinite(float(r["test_loss"])) for r in curve)


@pytest.mark.slow
def test_same_seed_same_curve_on_cpu(short_runs):
    a, b = _curve(short_runs["a"][1]), _curve(short_runs["b"][1])
    assert _without_wall(a) == _without_wall(b)
    sa = torch.load(short_runs["a"][1] / "model.pt", weights_only=True)
    sb = torch.load(short_runs["b"][1] / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_other_seed_other_curve(short_runs):
    assert _without_wall(_curve(short_runs["a"][1])) != _without_wall(_curve(short_runs["c"][1]))
    assert short_runs["a"][0].config_hash != short_runs["c"][0].config_hash


@pytest.mark.slow
def test_finished_run_is_not_trained_again(short_runs, monkeypatch):
    run, run_dir, result = short_runs["a"]
    monkeypatch.setattr(D, "load", lambda *a, **k: pytest.fail("a finished run loaded its data again"))
    assert train.train_run(run, run_dir, CPU, run_dir / "data", False) == json.loads(json.dumps(result))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_curve(short_runs, tmp_path, monkeypatch, crash_at):
    """Checkpoint every 5 iterations (evaluate every 10), crash at iteration 27, re-run: it resumes at 25,
    mid-way between evaluations, and its curve and weights equal the uninterrupted run's."""
    profile = {**SHORT, "train": {**SHORT["train"], "checkpoint_every": 5}}
    crash_at(27)
    with pytest.raises(KeyboardInterrupt):
        _short_run(tmp_path, name="resumed", profile=profile)
    run_dir = tmp_path / "resumed"
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "result.json").exists()
    assert checkpoint.read(run_dir / "checkpoint.pt")["iteration"] == 25
    crash_at(None)
    _, _, result = _short_run(tmp_path, name="resumed", profile=profile)
    assert result["iterations"] == 30
    assert not (run_dir / "checkpoint.pt").exists()
    assert _without_wall(_curve(run_dir)) == _without_wall(_curve(short_runs["a"][1]))
    resumed = torch.load(run_dir / "model.pt", weights_only=True)
    straight = torch.load(short_runs["a"][1] / "model.pt", weights_only=True)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


# --------------------------------------------------------------------------- real data: Fashion-MNIST on the CPU


# --------------------------------------------------------------------------- Caffe's poly phase of a piecewise schedule

def test_piecewise_poly_phase_follows_caffe():
    """The authors' resumed run (experiments.yaml lr_poly): points up to 162500, then Caffe's poly policy
    base_lr * (1 - iter/max_iter)^power; the lrs are the ones its log prints."""
    solver = {"lr": 0.1, "schedule": {"kind": "piecewise", "points": {0: 0.1, 50000: 0.01, 100000: 1e-3},
                                      "poly": {"from_iter": 162500, "base_lr": 0.00012, "power": 1,
                                               "max_iter": 400000}}}
    assert [solvers.lr_at(solver, i) for i in (0, 49999, 50000, 100000, 162499)] == \
        pytest.approx([0.1, 0.1, 0.01, 1e-3, 1e-3], rel=1e-12)
    for iteration, lr in ((162500, 7.125e-05), (172500, 6.825e-05), (193600, 6.192e-05)):
        assert solvers.lr_at(solver, iteration) == pytest.approx(lr, rel=1e-6), iteration


def test_piecewise_poly_without_its_keys_is_a_user_error():
    solver = {"lr": 0.1, "schedule": {"kind": "piecewise", "points": {0: 0.1}, "poly": {"from_iter": 10}}}
    with pytest.raises(UserError, match="schedule.poly needs"):
        solvers.lr_at(solver, 0)


# --------------------------------------------------------------------------- Caffe's lr_mult / decay_mult

# conv, conv, pool, conv, global pool, fc: parameter names "0.0.weight" (conv 1), "0.1.weight" (its BN gamma)...
# Conv 2 has no BatchNorm (as Table 10's multiplied convs): behind BatchNorm a conv bias has no gradient.
TINY = (N.Conv(4), N.Conv(5, act="relu"), N.Pool(), N.Conv(6), N.GlobalPool("avg"), N.Linear(3))
TINY_SHAPE = N.Shape(2, 6, 6)
MULTS = {"classifier": {"weight": {"lr": 1, "decay": 0}, "bias": {"lr": 2, "decay": 0}},
         "convs": {"indices": [2], "bias": {"lr": 2, "decay": 0}}}
# The same multipliers written by hand, by parameter name (everything else lr 1 / decay 1).
MULTS_BY_NAME = {"1.0.bias": (2, 0), "5.fc.weight": (1, 0), "5.fc.bias": (2, 0)}
SOLVERS = {
    # eps and rho chosen so AdaDelta's step is roughly linear in the gradient: with the authors' tiny eps
    # it is nearly sign(g') and a wrong decay would hardly show.
    "adadelta": {"type": "adadelta", "lr": 0.3, "rho": 0.9, "eps": 0.5, "weight_decay": 0.3},
    "nesterov": {"type": "nesterov", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.3},
}


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = M.build_model(TINY, TINY_SHAPE).double()
    with torch.no_grad():  # biases, gammas and betas away from 0 and 1, so their decay (or its absence) shows
        for p in model.parameters():
            if p.dim() == 1:  # conv and fc biases, BatchNorm gamma and beta
                p.copy_(torch.rand_like(p) + 0.5)
    assert set(MULTS_BY_NAME) <= dict(model.named_parameters()).keys()
    return model


def _loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, TINY_SHAPE.c, TINY_SHAPE.h, TINY_SHAPE.w, generator=g, dtype=torch.float64)
    return torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 1]))


def caffe_steps(model: torch.nn.Module, solver: dict, mults: dict, n: int) -> None:
    """``n`` updates as Caffe's solvers compute them (sgd_solver.cpp Regularize, then
    adadelta_solver.cpp / nesterov_solver.cpp ComputeUpdateValue), written out per parameter."""
    hist = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    upd_hist = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for step in range(n):
        model.zero_grad()
        _loss(model, step).backward()
        with torch.no_grad():
            for name, w in model.named_parameters():
                lr_mult, decay_mult = mults.get(name, (1, 1))
                g = w.grad + solver["weight_decay"] * decay_mult * w  # Regularize: local_decay * w
                rate = solver["lr"] * lr_mult  # local_rate
                if solver["type"] == "adadelta":
                    rho, eps = solver["rho"], solver["eps"]
                    hist[name] = rho * hist[name] + (1 - rho) * g * g
                    upd = torch.sqrt(upd_hist[name] + eps) / torch.sqrt(hist[name] + eps) * g
                    upd_hist[name] = rho * upd_hist[name] + (1 - rho) * upd * upd
                    w -= rate * upd
                else:
                    m, before = solver["momentum"], hist[name]
                    hist[name] = m * before + rate * g
                    w -= (1 + m) * hist[name] - m * before


def torch_steps(model: torch.nn.Module, solver: dict, param_mults, n: int) -> None:
    optimizer = solvers.make_optimizer(solver, solvers.param_groups(model, param_mults))
    for step in range(n):
        optimizer.zero_grad()
        _loss(model, step).backward()
        optimizer.step()


@pytest.mark.parametrize("kind", SOLVERS)
def test_optimizer_matches_caffe_with_lr_and_decay_multipliers(kind):
    """Two updates (the first from zero history, the second using it) against Caffe's arithmetic in float64:
    the fc weight gets no decay, the fc bias and conv 2's bias move at twice the rate with no decay, the other
    biases, the conv weights and BatchNorm's gamma/beta get lr 1 / decay 1."""
    solver = SOLVERS[kind]
    start = _tiny_model()
    ours, caffe, plain = (copy.deepcopy(start) for _ in range(3))
    torch_steps(ours, solver, MULTS, 2)
    caffe_steps(caffe, solver, MULTS_BY_NAME, 2)
    caffe_steps(plain, solver, {}, 2)  # what every-parameter-1/1 would give
    got, want, flat = (dict(m.named_parameters()) for m in (ours, caffe, plain))
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-10, atol=1e-12), name
        assert not torch.equal(want[name], start.state_dict()[name]), f"{name} did not move"
    # The check can fail: each multiplied parameter ends far from where 1/1 would put it.
    for name in MULTS_BY_NAME:
        assert (want[name] - flat[name]).abs().max() > 1e-3, name


def test_param_groups_cover_every_parameter_once_in_a_fixed_order():
    model = _tiny_model()
    groups = solvers.param_groups(model, MULTS)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(g["lr_mult"], g["decay_mult"]) for g in groups] == [(1, 1), (2, 0), (1, 0)]  # by first appearance
    assert [names[id(p)] for p in groups[1]["params"]] == ["1.0.bias", "5.fc.bias"]
    assert [names[id(p)] for p in groups[2]["params"]] == ["5.fc.weight"]
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(names) and len(listed) == len(set(listed))
    for mults in (None, {}, {"classifier": None, "convs": {"indices": [], "bias": None}}):
        (only,) = solvers.param_groups(model, mults)
        assert (only["lr_mult"], only["decay_mult"]) == (1, 1) and len(only["params"]) == len(names)


def test_make_optimizer_sets_each_groups_rate_and_decay_and_takes_plain_parameters():
    model = _tiny_model()
    for kind, solver in SOLVERS.items():
        opt = solvers.make_optimizer(solver, solvers.param_groups(model, MULTS))
        assert [x for g in opt.param_groups for x in (g["lr"], g["weight_decay"])] == \
            pytest.approx([0.3, 0.3, 0.6, 0.0, 0.3, 0.0]), kind
        (plain,) = solvers.make_optimizer(solver, model.parameters()).param_groups
        assert (plain["lr"], plain["weight_decay"], plain["lr_mult"], plain["decay_mult"]) == (0.3, 0.3, 1, 1)


@pytest.mark.parametrize("mults, match", [
    ("{convs: {indices: [9], bias: {lr: 2, decay: 0}}}", r"conv 9 does not exist \(the network has 8 convs"),
    ("{convs: {indices: [0, 2], bias: {lr: 2, decay: 0}}}", r"indices\[0\]: convs are numbered 1, 2"),
    ("{convs: {indices: [2], bias: null}}", "the listed convs need their bias multipliers"),
    ("{convs: {indices: [2], bias: {lr: -1}}}", "param_mults.*lr: a learning-rate multiplier must be .* >= 0"),
    ("{classifer: {}}", r"net.param_mults.classifer: unknown key"),
])
def test_bad_param_mults_are_user_errors(mults, match):
    """Checked once, when the run is composed (schemas and the network's convs), before a model is built."""
    from simpnet_cli.config import compose, tables

    table = tables.load_table("2")
    with pytest.raises(UserError, match=match):
        tables.resolve(table, table.row("8L"), 0, {}, overrides=compose.overrides_of([f"net.param_mults={mults}"]))


def test_classifier_mults_on_a_network_without_fc_is_a_user_error():
    with pytest.raises(UserError, match="no fc classifier"):
        N.check_recipe(TINY[:-1], {"param_mults": {"classifier": MULTS["classifier"]}})
    model = M.build_model(TINY[:-1], TINY_SHAPE)
    assert len(solvers.param_groups(model, {"classifier": None, "convs": MULTS["convs"]})) == 2


@pytest.mark.slow
def test_interrupted_run_with_multipliers_resumes_to_the_same_curve(tmp_path, monkeypatch, crash_at):
    """Several param groups in the checkpointed optimizer: crash after the checkpoint at 25, resume, equal."""
    run = resolve_row("5", "P5", {**SHORT, "train": {**SHORT["train"], "checkpoint_every": 5}})
    run = dataclasses.replace(run, net={**run.net, "param_mults": {
        "classifier": MULTS["classifier"], "convs": {"indices": [1, 3], "bias": {"lr": 2, "decay": 0}}}})
    straight = train.train_run(run, tmp_path / "straight", CPU, tmp_path / "data", False)
    crash_at(27)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, tmp_path / "resumed", CPU, tmp_path / "data", False)
    assert len(checkpoint.read(tmp_path / "resumed" / "checkpoint.pt")["optimizer"]["param_groups"]) == 3
    crash_at(None)
    resumed = train.train_run(run, tmp_path / "resumed", CPU, tmp_path / "data", False)
    assert resumed["iterations"] == straight["iterations"] == 30
    assert _without_wall(_curve(tmp_path / "resumed")) == _without_wall(_curve(tmp_path / "straight"))
    a = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_load_model_rebuilds_a_finished_run_and_export_writes_torchscript(short_runs, tmp_path):
    """simpnet_cli.load_model(run_dir) gives the module that trained (its weights, eval mode): it evaluates to the
    run's recorded final accuracy on the same test set; `simpnet export` writes TorchScript that agrees with it."""
    import simpnet_cli
    from simpnet_cli import cli

    run, run_dir = short_runs["a"][0], short_runs["a"][1]
    model = simpnet_cli.load_model(run_dir)
    assert not model.training
    data = D.load(run.dataset, tmp_path, False, torch.device("cpu"), int(run.train["batch_size"]), run.seed)
    acc, _ = run_state.evaluate(model, data, contextlib.nullcontext)
    result = json.loads((run_dir / "result.json").read_text())
    assert acc == pytest.approx(result["final_acc"], abs=1e-3)
    assert cli.main(["export", f"run_dir={run_dir}", "format=torchscript", f"out={tmp_path}/m.ts"]) == 0
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    x = data.normalize(data.test_x[:4])
    torch.testing.assert_close(scripted(x), simpnet_cli.load_model(run_dir)(x))


def test_load_model_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    import simpnet_cli

    with pytest.raises(UserError) as info:
        simpnet_cli.load_model(tmp_path)
    assert "config.yaml" in str(info.value) and "\n" not in str(info.value)


def test_every_solver_type_has_one_schema_one_optimizer_and_its_files_name_a_registered_type():
    """The registries agree: each solver ``type`` a schema accepts has an optimizer, and the reverse; each
    network builder has a schema; every conf/solver file names a registered type."""
    from simpnet_cli.config import schemas, tables
    from simpnet_cli.train import solvers

    assert set(solvers.OPTIMIZERS) == set(schemas.SOLVERS)
    assert set(N.BUILDERS) == set(schemas.NETWORKS)
    for name in tables.known_names("solver"):
        assert tables.load_named("solver", name)["type"] in solvers.OPTIMIZERS, name
    with pytest.raises(UserError, match="unknown solver type 'adam' \\(adadelta or nesterov\\)"):
        solvers.make_optimizer({"type": "adam", "lr": 0.1, "weight_decay": 0}, _tiny_model().parameters())


@pytest.mark.parametrize("kind", SOLVERS)
def test_solver_state_dicts_are_torchs_and_load_torchs(kind):
    """The solvers keep torch's optimizer layout (checkpoints written when they subclassed torch.optim.Optimizer
    load): after the same steps, torch's Adadelta / SGD(nesterov) state_dict has the same groups, indices and
    state names and values, and loading it into a fresh solver gives the same next step."""
    solver = SOLVERS[kind]
    ours, theirs = _tiny_model(), _tiny_model()
    opt = solvers.make_optimizer(solver, ours.parameters())
    if kind == "adadelta":
        ref = torch.optim.Adadelta(theirs.parameters(), lr=solver["lr"], rho=solver["rho"], eps=solver["eps"],
                                   weight_decay=solver["weight_decay"])
    else:
        ref = torch.optim.SGD(theirs.parameters(), lr=solver["lr"], momentum=solver["momentum"], nesterov=True,
                              weight_decay=solver["weight_decay"])
    for model, optimizer in ((ours, opt), (theirs, ref)):
        for step in range(2):
            optimizer.zero_grad()
            _loss(model, step).backward()
            optimizer.step()
    mine, torchs = opt.state_dict(), ref.state_dict()
    assert [g["params"] for g in mine["param_groups"]] == [g["params"] for g in torchs["param_groups"]]
    assert mine["state"].keys() == torchs["state"].keys()
    for i, st in mine["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(value, torchs["state"][i][name], rtol=1e-12, atol=1e-14)
    fresh_model = _tiny_model()
    fresh_model.load_state_dict(theirs.state_dict())
    fresh = solvers.make_optimizer(solver, fresh_model.parameters())
    fresh.load_state_dict(torchs)
    for model, optimizer in ((fresh_model, fresh), (ours, opt)):
        optimizer.zero_grad()
        _loss(model, 2).backward()
        optimizer.step()
    for a, b in zip(fresh_model.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
