"""The CUDA-graph path, proven on the CPU (issue 9).

``captured_step.Step`` makes every device call of a capture through a ``GraphBackend``. These tests pass stand-ins: a
graph whose capture records the step body without running it (as CUDA capture records kernels without
executing them) and whose replay runs that body again on the same static buffers. The training loop, the
warm-up, the re-capture on an lr change, the evaluation between replays, the epoch wrap, checkpoints and
resume all run unchanged, and must equal the eager run.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from simpnet_cli.train import checkpoint
from simpnet_cli.train import captured_step
from simpnet_cli.train import solvers
from simpnet_cli.tools import gpucheck
from simpnet_cli.runs import results
from simpnet_cli.config import tables
from simpnet_cli.train import loop as train
from simpnet_cli.config import compose as composition
from simpnet_cli.train import data as D
from simpnet_cli.nets import modules as M
from simpnet_cli.errors import UserError

from conftest import fast_sample

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- stand-ins for the CUDA API

class StandInStream:
    def __init__(self, device):
        self.device = device

    def wait_stream(self, other) -> None:
        pass


class StandInGraph:
    """Capture records the body; replay runs it ``times`` times (1: a correct graph; 0: an empty one;
    2: a double-applied one). With ``skip_optimizer`` the replay runs without the optimizer's update (a graph
    whose update kernels went missing; its update counter still counts). ``baked``: (dict, key, value) of the
    Python numbers the body read at capture; a real graph holds them as constants, so replay puts them back."""

    def __init__(self, times: int = 1, skip_optimizer: bool = False):
        self.body, self.times, self.replays, self.skip_optimizer, self.baked = None, times, 0, skip_optimizer, []

    def replay(self) -> None:
        self.replays += 1
        for where, key, value in self.baked:
            where[key] = value
        with contextlib.ExitStack() as stack:
            if self.skip_optimizer:
                for cls in (solvers.AdaDelta, solvers.Nesterov):
                    stack.enter_context(mock.patch.object(cls, "step", lambda self, closure=None: None))
            for _ in range(self.times):
                self.body()


def stand_in(calls: list | None = None, times: int = 1, fail_at: str | None = None, skip_optimizer: bool = False,
             bake: solvers.Solver | None = None) -> captured_step.GraphBackend:
    """A backend that logs its calls in ``calls``; ``fail_at`` makes that call raise, as a broken driver would.
    ``bake``: the optimizer whose group lrs a capture turns into constants if they are numbers."""
    calls = calls if calls is not None else []

    def log(name, *args):
        calls.append((name, *args))
        if name == fail_at:
            raise RuntimeError(f"{name} failed: operation not permitted when stream is capturing")

    @contextlib.contextmanager
    def scope(name, arg):
        log(name, arg)
        yield

    def new_stream(dev):
        log("new_stream", dev)
        return StandInStream(dev)

    def capture(graph, body, stream):
        log("capture", stream, torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
        graph.body = body  # recorded, not run: the warm-up already trained this iteration
        if bake is not None:
            graph.baked = [(g, "lr", g["lr"]) for g in bake.param_groups if not torch.is_tensor(g["lr"])]

    return captured_step.GraphBackend(
        new_graph=lambda: (log("new_graph"), StandInGraph(times, skip_optimizer))[1],
        new_stream=new_stream,
        device_scope=lambda dev: scope("device_scope", dev),
        stream_scope=lambda stream: scope("stream_scope", stream),
        current_stream=lambda dev: StandInStream(dev),
        capture=capture,
    )


# --------------------------------------------------------------------------- runs of every family

def run_spec(arch: str, solver: str, precision: str, *net: str, dataset: str = "cifar10") -> tables.RunSpec:
    """A small network of each family, with the lr dropping at iteration 5 (a re-capture), 20 training images
    in batches of 8 (an epoch wraps inside a batch), evaluations every 3 and a checkpoint every 4."""
    over = composition.overrides_of([f"solver={solver}", "solver.schedule.kind=multistep",
                                                     "solver.schedule.gamma=0.1", "solver.schedule.steps=[5]",
                                                     f"dataset={dataset}", *net])
    table = tables.custom_table("gpu-test", arch, {})
    profile = {"train": {"iterations": 10, "batch_size": 8, "eval_every": 3, "checkpoint_every": 4,
                         "precision": precision},
               "data": {"source": "synthetic", "train_size": 20, "test_size": 16}}
    return tables.resolve(table, table.rows[0], 0, profile, overrides=over)


FAMILIES = {
    "plain": ("arch1", ["net.widths=C8, C12{2}, C16{3}", "net.pools_after=[3,6]"]),
    "plain-dropout": ("arch1", ["net.widths=C8, C12{2}, C16{3}", "net.pools_after=[3,6]",
                                "net.dropout.conv={1-5: 0.2}", "net.dropout.pool={1-2: 0.3}",
                                "net.dropout.head=0.3"]),
    # The residual and fire families at a quarter of their widths (the same blocks, shortcuts and conv count, so
    # the recipe's conv indices still hold): every kind of layer, at a sixteenth of the arithmetic.
    "resnet32": ("resnet32", ["net.stages=[{width:4,blocks:5},{width:8,blocks:5,shortcut:conv_k2_then_pool},"
                              "{width:16,blocks:5,shortcut:conv_k2s2}]"]),
    "squeezenet": ("squeezenet11", ["net.saf_dropout=0.2", "net.stem.out=16",
                                    "net.fires=[[4,16],[4,16],pool,[8,32],[8,32],pool,[12,48],[12,48],[16,64],[16,64]]"]),
}
CASES = [pytest.param(f, s, "fp32", id=f"{f}-{s}-fp32") for f in FAMILIES for s in ("adadelta_30k", "nesterov_80k")]
CASES += [pytest.param(f, s, "bf16", id=f"{f}-{s}-bf16")
          for f, s in (("plain-dropout", "adadelta_30k"), ("resnet32", "nesterov_80k"), ("squeezenet", "adadelta_30k"))]


def curve(run_dir: Path) -> list[dict]:
    with open(run_dir / "curve.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def assert_same_run(a: Path, b: Path, tol: float = 1e-6) -> None:
    ca, cb = curve(a), curve(b)
    assert [c["iter"] for c in ca] == [c["iter"] for c in cb] == [3, 6, 9, 10]
    for x, y in zip(ca, cb):
        for key in ("test_acc", "test_loss", "train_loss", "lr"):
            assert abs(x[key] - y[key]) <= tol * max(1.0, abs(y[key])), (key, x, y)
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    for name in wb:
        assert torch.allclose(wa[name].float(), wb[name].float(), rtol=tol, atol=tol), name


@pytest.mark.parametrize("family, solver, precision", CASES)
@pytest.mark.slow
def test_graphed_run_with_recapture_eval_wrap_and_resume_equals_the_eager_run(tmp_path, monkeypatch, one_thread,
                                                                              family, solver, precision):
    arch, net = FAMILIES[family]
    run = run_spec(arch, solver, precision, *net)
    eager = train.train_run(run, tmp_path / "eager", CPU, tmp_path, False)
    assert eager["step_mode"] == "eager"

    calls: list = []
    real_write = checkpoint.atomic_write

    def die_after_first_checkpoint(path, write):
        real_write(path, write)
        raise KeyboardInterrupt  # the process dies right after iteration 4's checkpoint

    monkeypatch.setattr(checkpoint, "atomic_write", die_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, tmp_path / "graphed", CPU, tmp_path, False, backend=stand_in(calls))
    monkeypatch.undo()
    graphed = train.train_run(run, tmp_path / "graphed", CPU, tmp_path, False, backend=stand_in(calls))
    assert graphed["step_mode"] == "cuda-graph" and graphed["iterations"] == 10
    # Captures: at iteration 0 before the kill at 4 and at 4 in the resumed process; the lr drop at 5 needs none.
    assert sum(1 for c in calls if c[0] == "capture") == 2
    assert_same_run(tmp_path / "graphed", tmp_path / "eager")
    for key in ("final_acc", "best_acc", "best_iter"):
        assert graphed[key] == pytest.approx(eager[key], abs=1e-6), key


def test_one_update_per_iteration_and_one_capture_for_the_whole_schedule(one_thread):
    run = run_spec("arch1", "adadelta_30k", "fp32", *FAMILIES["plain"][1])
    model, optimizer, data, autocast = setup(run)
    graphs: list[StandInGraph] = []
    backend = stand_in()
    backend = captured_step.GraphBackend(**{**backend.__dict__, "new_graph": lambda: graphs.append(StandInGraph()) or graphs[-1]})
    step = captured_step.Step(model, optimizer, data, autocast, True, backend=backend)
    for it in range(8):
        step(it, solvers.lr_at(run.solver, it))
        assert int(step.updates) == it + 1
    assert len(graphs) == 1 and graphs[0].replays == 7  # captured at 0; the lr drop at 5 is a fill, not a capture


# Caffe's lr/decay multipliers: the classifier and two conv biases in groups of their own (solvers.param_groups).
MULTS = {"classifier": {"weight": {"lr": 1, "decay": 0}, "bias": {"lr": 2, "decay": 0}},
         "convs": {"indices": [5, 6], "bias": {"lr": 2, "decay": 0}}}


def with_mults(run: tables.RunSpec) -> tables.RunSpec:
    return dataclasses.replace(run, net={**run.net, "param_mults": MULTS})


@pytest.mark.parametrize("solver", ["adadelta_30k", "nesterov_80k"])
def test_several_param_groups_graphed_with_recapture_and_resume_equal_the_eager_run(tmp_path, monkeypatch,
                                                                                   one_thread, solver):
    run = with_mults(run_spec("arch1", solver, "fp32", *FAMILIES["plain"][1]))
    eager = train.train_run(run, tmp_path / "eager", CPU, tmp_path, False)
    real_write = checkpoint.atomic_write

    def die_after_first_checkpoint(path, write):
        real_write(path, write)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_write", die_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(run, tmp_path / "graphed", CPU, tmp_path, False, backend=stand_in())
    assert len(checkpoint.read(tmp_path / "graphed" / "checkpoint.pt")["optimizer"]["param_groups"]) == 3
    monkeypatch.undo()
    graphed = train.train_run(run, tmp_path / "graphed", CPU, tmp_path, False, backend=stand_in())
    assert graphed["step_mode"] == "cuda-graph" and eager["step_mode"] == "eager"
    assert_same_run(tmp_path / "graphed", tmp_path / "eager")


@pytest.mark.parametrize("solver", ["adadelta_30k", "nesterov_80k"])
def test_group_multipliers_hold_in_every_update_across_a_recapture(one_thread, solver):
    """Each update, captured or replayed, before and after the re-capture at the lr drop (iteration 5), runs
    every group at schedule lr * lr_mult and solver weight_decay * decay_mult; and the weights equal eager's."""
    run = with_mults(run_spec("arch1", solver, "fp32", *FAMILIES["plain"][1]))
    weights = {}
    for graphs in (False, True):
        model, optimizer, data, autocast = setup(run)
        assert len(optimizer.param_groups) == 3
        seen: list[list[tuple]] = []
        real_step = optimizer.step

        def recording_step(*args, **kwargs):
            seen.append([(float(g["lr"]), g["weight_decay"], g["lr_mult"], g["decay_mult"])
                         for g in optimizer.param_groups])
            return real_step(*args, **kwargs)

        optimizer.step = recording_step  # the captured body calls self.optimizer.step() on every replay
        step = captured_step.Step(model, optimizer, data, autocast, graphs, backend=stand_in() if graphs else None)
        lrs = [solvers.lr_at(run.solver, it) for it in range(8)]
        for it, lr in enumerate(lrs):
            step(it, lr)
        assert step.step_mode == ("cuda-graph" if graphs else "eager") and int(step.updates) == 8
        assert len(seen) == 8  # one per update: the stand-in's capture records the body without running it
        for lr, groups in zip(lrs, seen):
            # a graph's rates are float32 tensors on the device: equal to lr * lr_mult to float32's precision
            assert [(g_lr, g_wd) for g_lr, g_wd, _, _ in groups] == \
                [(pytest.approx(lr * m, rel=1e-7), run.solver["weight_decay"] * d) for _, _, m, d in groups]
        assert [(m, d) for _, _, m, d in seen[-1]] == [(1, 1), (2, 0), (1, 0)]
        weights[graphs] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in weights[False].items():
        assert torch.allclose(weights[True][name].float(), value.float(), rtol=1e-6, atol=1e-6), name


def setup(run: tables.RunSpec, batch: int | None = None):
    torch.manual_seed(0)
    data = D.load(run.dataset, Path("."), False, CPU, batch or run.train["batch_size"], 0)
    model = M.build_model(run.spec, run.in_shape, run.net)
    # as train_run builds it; capturable is for CUDA only
    optimizer = solvers.make_optimizer(run.solver, solvers.param_groups(model, run.param_mults))
    return model, optimizer, data, solvers.autocast_for(run.train["precision"], CPU)


# --------------------------------------------------------------------------- capture failures and the canary

@pytest.mark.parametrize("fail_at", ["capture", "new_stream", "new_graph"])
def test_a_failed_capture_continues_eagerly_with_the_same_figures(tmp_path, one_thread, fail_at):
    run = run_spec("arch1", "nesterov_80k", "fp32", *FAMILIES["plain-dropout"][1])
    train.train_run(run, tmp_path / "eager", CPU, tmp_path, False)
    with pytest.warns(RuntimeWarning, match="continues eagerly"):
        fell_back = train.train_run(run, tmp_path / "fallback", CPU, tmp_path, False,
                                    backend=stand_in(fail_at=fail_at))
    assert fell_back["step_mode"].startswith("eager (capture failed: RuntimeError: ")
    assert fell_back["iterations"] == 10
    assert_same_run(tmp_path / "fallback", tmp_path / "eager")


def test_step_mode_and_precision_reach_the_csv(tmp_path, one_thread):
    from simpnet_cli.runs import index

    run = run_spec("arch1", "adadelta_30k", "bf16", *FAMILIES["plain"][1])
    with pytest.warns(RuntimeWarning, match="capture failed"):  # said once, and the run goes on
        result = train.train_run(run, tmp_path / "run", CPU, tmp_path, False, backend=stand_in(fail_at="capture"))
    line = index.line_of(index.record_of(run, tmp_path / "run", "smoke"), result, "2025-01-01T00:00:00Z")
    results.write(results.csv_path(tmp_path / "results", run.table), [results.format_line(line)])
    (row,), bad = results.read(results.csv_path(tmp_path / "results", run.table))
    assert not bad and row["precision"] == "bf16" and row["step_mode"].startswith("eager (capture failed")


@pytest.mark.parametrize("times", [0, 2], ids=["empty-graph", "double-applied-graph"])
def test_the_canary_stops_a_run_whose_graph_does_nothing_or_too_much(tmp_path, one_thread, times):
    run = run_spec("arch1", "adadelta_30k", "fp32", *FAMILIES["plain"][1])
    with pytest.raises(UserError, match=r"applied \d+ updates in 3 iterations .*graphs=false"):
        train.train_run(run, tmp_path / "run", CPU, tmp_path, False, backend=stand_in(times=times))
    assert not (tmp_path / "run" / "result.json").exists()


def test_tf32_is_named_in_the_effective_precision(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default for convolutions
    assert not torch.backends.cuda.matmul.allow_tf32  # ... and for matmuls ("highest" fp32 matmul precision)
    assert solvers.effective_precision("fp32", torch.device("cuda")) == "fp32 (TF32 convolutions)"
    assert solvers.effective_precision("bf16", torch.device("cuda")) == "bf16"
    assert solvers.effective_precision("fp32", CPU) == "fp32"


def test_fp16_is_refused_with_one_clear_line():
    with pytest.raises(UserError, match="fp16 is not supported.*bf16"):
        solvers.autocast_for("fp16", CPU)


# --------------------------------------------------------------------------- streams, devices, storage

def test_one_capture_stream_per_run_made_on_the_runs_device(one_thread):
    run = run_spec("arch1", "adadelta_30k", "fp32", *FAMILIES["plain"][1])
    model, optimizer, data, autocast = setup(run)
    calls: list = []
    step = captured_step.Step(model, optimizer, data, autocast, True, backend=stand_in(calls))
    for it in range(8):
        step(it, solvers.lr_at(run.solver, it))
    streams = [c for c in calls if c[0] == "new_stream"]
    assert streams == [("new_stream", data.device)], "one stream, made on the run's device, reused by re-captures"
    # Each capture: inside device_scope(run's device), warm-up and capture in stream_scope(that stream).
    names = [c[0] for c in calls]
    assert names[:5] == ["device_scope", "new_stream", "stream_scope", "new_graph", "capture"]
    assert all(c[1] == data.device for c in calls if c[0] == "device_scope")
    stream = step._stream
    assert all(c[1] is stream for c in calls if c[0] in ("stream_scope", "capture"))
    assert names.count("capture") == 1, "the lr drop at 5 is read from a tensor: no re-capture, no pool to share"


def test_in_place_mutated_tensors_keep_their_storage_between_replays(one_thread):
    run = run_spec("arch1", "nesterov_80k", "fp32", *FAMILIES["plain-dropout"][1])
    model, optimizer, data, autocast = setup(run)
    step = captured_step.Step(model, optimizer, data, autocast, True, backend=stand_in())

    def pointers() -> dict:
        ptrs = {f"param {n}": p.data_ptr() for n, p in model.named_parameters()}
        ptrs.update({f"buffer {n}": b.data_ptr() for n, b in model.named_buffers()})
        for i, state in enumerate(optimizer.state.values()):
            ptrs.update({f"optimizer {i} {k}": v.data_ptr() for k, v in state.items() if torch.is_tensor(v)})
        ptrs.update({"loss_sum": step.loss_sum.data_ptr(), "bad": step.bad.data_ptr(),
                     "updates": step.updates.data_ptr()})
        ptrs.update({f"static input {i}": t.data_ptr() for i, t in enumerate(step._static)})
        return ptrs

    step(0, 0.1)   # warm-up + capture
    step(1, 0.1)   # replay
    before = pointers()
    step(2, 0.1)   # replay
    step(3, 0.1)   # replay across the epoch end (20 images, batches of 8)
    assert pointers() == before


# --------------------------------------------------------------------------- no host sync inside the step

HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                 "unique_consecutive", "unique_dim", "equal", "is_nonzero", "allclose"}


class HostSyncCheck(TorchDispatchMode):
    """Records every op of a body that would wait for the GPU or give a data-dependent shape: a scalar read
    (``.item()``, ``bool(t)``), ``nonzero``, masked selection, ``unique``, boolean-mask indexing, a copy to the CPU."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    @staticmethod
    def _device_to_cpu(name: str, args, kwargs) -> bool:
        """A copy from a device tensor into host memory (never true on a CPU-only machine, where all is host)."""
        if name == "_to_copy":
            src, dst = args[0], kwargs.get("device")
        else:
            dst, src = args[0].device, args[1] if len(args) > 1 else None
        return (torch.is_tensor(src) and src.device.type != "cpu" and dst is not None
                and torch.device(dst).type == "cpu")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_SYNC_OPS:
            self.found.append(name)
        elif name == "index" and any(t is not None and torch.is_tensor(t) and t.dtype == torch.bool
                                     for t in (args[1] if len(args) > 1 else [])):
            self.found.append("index with a boolean mask")
        elif name in ("_to_copy", "copy_") and self._device_to_cpu(name, args, kwargs):
            self.found.append(f"{name} to the CPU")
        return func(*args, **(kwargs or {}))


def captured_body(run: tables.RunSpec, batch: int = 2):
    """The body ``captured_step.Step`` captures for ``run`` (recorded by the stand-in), on a batch of ``batch``."""
    model, optimizer, data, autocast = setup(run, batch)
    graphs: list[StandInGraph] = []
    backend = captured_step.GraphBackend(**{**stand_in().__dict__,
                                   "new_graph": lambda: graphs.append(StandInGraph()) or graphs[-1]})
    step = captured_step.Step(model, optimizer, data, autocast, True, backend=backend)
    step(0, solvers.lr_at(run.solver, 0))
    return graphs[0].body, step


TRAINED_ROWS = [pytest.param(t.name, r["id"], id=f"{t.name}:{r['id']}")
                for t in tables.load_tables("all") for r in t.rows]


@pytest.mark.parametrize("table, row", fast_sample(TRAINED_ROWS))
def test_the_captured_step_of_every_row_has_no_host_sync(table, row, one_thread):
    t = tables.load_table(table)
    run = tables.resolve(t, t.row(row), 0, {"train": {"batch_size": 2, "precision": "fp32"},
                                            "data": {"source": "synthetic", "train_size": 4, "test_size": 2}})
    body, _ = captured_body(run)
    with HostSyncCheck() as check:
        body()
    assert check.found == [], f"host-synchronising ops in the captured step: {check.found}"


def test_the_sync_check_fails_on_a_body_that_reads_a_scalar(one_thread):
    run = run_spec("arch1", "adadelta_30k", "bf16", *FAMILIES["plain"][1])
    body, step = captured_body(run)

    def with_item():
        body()
        step.loss_sum.item()  # what a careless "if loss > x" or a log line in the step would do

    def with_mask():
        body()
        step.loss_sum.reshape(1)[step.bad.reshape(1)]  # a data-dependent shape

    for bad_body, ops in ((with_item, {"_local_scalar_dense"}), (with_mask, {"index with a boolean mask", "nonzero"})):
        with HostSyncCheck() as check:
            bad_body()
        assert ops & set(check.found), check.found


# --------------------------------------------------------------------------- the lr in a tensor (issue 17, item 4)

@pytest.mark.parametrize("solver", ["adadelta_30k", "nesterov_80k"])
def test_an_lr_change_reaches_every_group_of_the_one_graph_without_a_recapture(one_thread, solver):
    """The stand-in turns the numbers a body reads at capture into constants, as CUDA does; the rate still
    follows the schedule (a drop at 5), at lr * lr_mult in each group, from one capture."""
    run = with_mults(run_spec("arch1", solver, "fp32", *FAMILIES["plain"][1]))
    weights = {}
    for graphs in (False, True):
        model, optimizer, data, autocast = setup(run)
        made: list[StandInGraph] = []
        base = stand_in(bake=optimizer)
        backend = dataclasses.replace(base, new_graph=lambda: made.append(base.new_graph()) or made[-1])
        step = captured_step.Step(model, optimizer, data, autocast, graphs, backend=backend if graphs else None)
        for it in range(8):
            step(it, solvers.lr_at(run.solver, it))
        if graphs:
            assert len(made) == 1 and made[0].replays == 7 and made[0].baked == []
            assert [float(g["lr"]) for g in optimizer.param_groups] == \
                [pytest.approx(solvers.lr_at(run.solver, 7) * g["lr_mult"], rel=1e-7) for g in optimizer.param_groups]
        weights[graphs] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in weights[False].items():
        assert torch.equal(weights[True][name], value), name


def test_the_solvers_read_a_tensor_lr_without_a_host_sync(one_thread):
    for kind in ("adadelta_30k", "nesterov_80k"):
        run = run_spec("arch1", kind, "fp32", *FAMILIES["plain"][1])
        model, optimizer, data, autocast = setup(run)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(0.1)
        for _ in range(2):  # the first step makes the state; the second is what a replay runs
            optimizer.zero_grad()
            model(data.batch(0)[0]).sum().backward()
            with HostSyncCheck() as check:
                optimizer.step()
        assert check.found == [], (kind, check.found)


# --------------------------------------------------------------------------- a warm-up that fails midway (item 5)

@pytest.mark.parametrize("solver", ["adadelta_30k", "nesterov_80k"])
def test_a_warm_up_that_fails_after_updating_is_undone_before_the_eager_step(one_thread, solver):
    """The warm-up's optimizer step updates every parameter (and makes its state), then the driver fails: the
    eager fallback must start from the state before it, dropout's RNG included, and apply the update once."""
    run = run_spec("arch1", solver, "fp32", *FAMILIES["plain-dropout"][1])
    weights = {}
    for graphs in (False, True):
        model, optimizer, data, autocast = setup(run)
        real_step, calls = optimizer.step, []

        def failing_midway(*args, **kwargs):
            real_step(*args, **kwargs)
            calls.append(1)
            if graphs and len(calls) == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        optimizer.step = failing_midway
        step = captured_step.Step(model, optimizer, data, autocast, graphs, backend=stand_in() if graphs else None)
        with pytest.warns(RuntimeWarning, match="continues eagerly") if graphs else contextlib.nullcontext():
            for it in range(4):
                step(it, 0.1)
        assert int(step.updates) == 4
        assert step.step_mode.startswith("eager (capture failed: RuntimeError: CUDA error") if graphs else True
        weights[graphs] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in weights[False].items():
        assert torch.equal(weights[True][name], value), name


# --------------------------------------------------------------------------- gpucheck's own logic (items 2, 3)

def tiny_check_run(family: str = "plain", solver: str = "adadelta_30k") -> tables.RunSpec:
    """gpucheck.check_run's recipe on a network of the test's size: lr drop at 5, an epoch every 2.5 steps."""
    return run_spec("arch1", solver, "fp32", *FAMILIES[family][1])


@pytest.mark.parametrize("family, solver", [("plain", "adadelta_30k"), ("plain-dropout", "nesterov_80k")])
def test_graphed_vs_eager_passes_for_a_sound_graph_on_deterministic_kernels(one_thread, family, solver):
    calls: list = []
    before = (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    verdict = gpucheck.graphed_vs_eager(tiny_check_run(family, solver), CPU, stand_in(calls), steps=6, eval_every=3)
    assert verdict.startswith("first 3 steps within")
    (capture,) = [c for c in calls if c[0] == "capture"]
    assert capture[2:] == (True, True), "captured with cudnn.deterministic and deterministic algorithms"
    assert (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == before


@pytest.mark.parametrize("broken, match", [
    (dict(fail_at="capture"), "ran as 'eager \\(capture failed.*compare eager with eager"),
    (dict(skip_optimizer=True), "first 3 steps differ from eager"),
    (dict(times=2), "first 3 steps differ from eager"),
], ids=["fell-back-to-eager", "skips-the-optimizer", "applies-twice"])
def test_graphed_vs_eager_fails_for_a_graph_that_is_not_sound(one_thread, broken, match):
    """A capture that fell back, a graph whose update kernels are missing (its update counter still counts, so
    the run's own canary cannot see it) and a double-applied one: each fails the check."""
    with pytest.raises(AssertionError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gpucheck.graphed_vs_eager(tiny_check_run(), CPU, stand_in(**broken), steps=6, eval_every=3)


def trace(losses, early=0.0, final=0.0, mode="eager") -> "gpucheck.Trace":
    """A made-up Trace: one weight tensor at 1 + ``early`` after the tight steps and 1 + ``final`` at the end."""
    return gpucheck.Trace(list(losses), {"w": torch.tensor([1.0 + early])}, {"w": torch.tensor([1.0 + final])}, mode)


def test_judge_compares_the_first_steps_tightly_and_the_horizon_against_backend_noise():
    eager = trace([2.0] * 10)
    noise = trace([2.0] * 3 + [2.0 * (1 + 1e-3)] * 7, final=1e-3)  # another conv backend: 0.1% after 10 steps
    ok = gpucheck.judge(trace([2.0] * 3 + [2.0 * (1 + 2e-3)] * 7, final=2e-3, mode="cuda-graph"), eager, noise)
    assert "10 steps within 2.0e-03 (another conv backend: 1.0e-03, limit 3.0e-03)" in ok
    with pytest.raises(AssertionError, match=r"beyond 3 x the 1.00e-03"):  # drifts more than the noise allows
        gpucheck.judge(trace([2.0] * 3 + [2.0 * 1.01] * 7, final=1e-2, mode="cuda-graph"), eager, noise)
    with pytest.raises(AssertionError, match="first 3 steps differ from eager by 1.00e-04"):  # early, however noisy
        gpucheck.judge(trace([2.0, 2.0, 2.0 * (1 + 1e-4)] + [2.0] * 7, mode="cuda-graph"), eager,
                       trace([2.0] * 10, final=0.5))
    with pytest.raises(AssertionError, match="compare eager with eager"):
        gpucheck.judge(trace([2.0] * 10), eager, noise)


def test_memory_check_wants_one_capture_in_the_graph_mode(one_thread):
    run = tiny_check_run()
    verdict = gpucheck.memory_across_lr_changes(run, CPU, stand_in(), reserved=lambda dev: 2**20)
    assert verdict.startswith("one capture for 11 rates")
    with pytest.raises(AssertionError, match="not as a CUDA graph"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gpucheck.memory_across_lr_changes(run, CPU, stand_in(fail_at="new_graph"), reserved=lambda dev: 2**20)


def test_backend_noise_is_measured_on_the_cpu(one_thread):
    noise = gpucheck.backend_noise(tiny_check_run(), CPU)
    assert 0 < noise < 1e-2  # the same math in oneDNN's kernels and torch's own: rounding, not a bug


# --------------------------------------------------------------------------- make gpu-check's set-up (item 1)

def test_gpu_check_setup_uses_what_is_here_and_installs_only_what_is_missing(tmp_path):
    from simpnet_cli.tools import gpusetup

    reqs = gpusetup.requirements()
    assert any(r.startswith("torch") for r in reqs) and any(r.startswith("pytest") for r in reqs)
    assert not any(r.startswith(("tensorboard", "hydra-submitit")) for r in reqs)  # the check's tests skip them
    # this interpreter (the test's) has everything: no venv, no pip
    assert gpusetup.unmet(reqs) == []
    here = gpusetup.plan([], "2.14.1+cu130", None, tmp_path / "v", python="/usr/bin/python3")
    assert (here.python, here.make_venv, here.install) == ("/usr/bin/python3", False, [])
    # a machine's CUDA torch and nothing else: a venv that sees it, only the rest installed, torch pinned
    missing = gpusetup.unmet(["torch>=2.4", "surely-not-a-package-of-this-machine>=1", "pytest>=999"])
    assert missing == ["surely-not-a-package-of-this-machine>=1", "pytest>=999"]
    bare = gpusetup.plan(missing, "2.14.1+cu130", tmp_path / "wheels", tmp_path / "v")
    assert bare.python == str(tmp_path / "v" / "bin" / "python") and bare.make_venv and bare.install == missing
    assert bare.pip_args == ["--no-index", "--find-links", str(tmp_path / "wheels"), "--constraint", "{constraints}"]
    # no torch at all: pip brings one, from the index when no wheels are given
    none = gpusetup.plan(["torch>=2.4"], None, None, tmp_path / "v")
    assert none.install == ["torch>=2.4"] and none.pip_args == []
    assert gpusetup.main(["--wheels", str(tmp_path / "absent")]) == 2  # a wrong WHEELS: one line, exit 2
