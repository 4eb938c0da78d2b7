"""A run in training: its ``TrainState`` (what it trains with and where it stands), how one is built at
iteration 0, its evaluation on the test set, and its files (``config.yaml`` before it trains; ``model.pt`` then
``result.json`` when it ends: a run is finished exactly when that file exists).

The loop that moves a state is ``loop.fit``; what happens at its moments beyond the arithmetic is a callback's
(train/callbacks.py). Both read this module; it reads neither.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from simpnet_cli.config.tables import RunSpec
from simpnet_cli.errors import UserError
from simpnet_cli.files import atomic_write, file_sha256, read_json, save_pt, write_json
from simpnet_cli.nets import modules as M
from simpnet_cli.nets import specs as network
from simpnet_cli.train import captured_step
from simpnet_cli.train import data as D
from simpnet_cli.train import solvers
from simpnet_cli.train.solvers import Solver, autocast_for, effective_precision

CHECKPOINT = "checkpoint.pt"
# The one before it, kept by runs trained together (runner.align_checkpoints: a kill between the group's writes).
PREVIOUS_CHECKPOINT = "checkpoint.previous.pt"


@dataclass(eq=False)
class TrainState:
    """A run in training: what it trains with (fixed once built) and where it stands (what moves)."""
    run: RunSpec
    run_dir: Path
    device: torch.device
    model: torch.nn.Module
    optimizer: Solver
    data: D.DeviceData
    step: captured_step.Step  # keeps the running loss sum, the non-finite flag and the update count on the device
    autocast: Callable
    log: Callable[[str], None]
    iterations: int
    batch_size: int
    eval_every: int
    checkpoint_every: int
    check_every: int          # iterations between two reads of the device's non-finite flag
    precision: str
    params: tuple[int, int]   # (the paper's count: conv + fc, all trainable ones)

    iteration: int = 0        # steps taken
    start: int = 0            # where this session began (a resumed run: its checkpoint's iteration)
    lr: float = 0.0           # of the last step
    curve: list[dict] = field(default_factory=list)
    best: tuple[float, int] = (-1.0, 0)  # (test accuracy, iteration); -1 before the first evaluation
    train_time: float = 0.0   # seconds of training steps, evaluations and checkpoints excluded
    loss_n: int = 0           # steps summed in step.loss_sum (since the last evaluation)
    loss_finite: bool = True  # as of the last check
    status: str = "ok"        # "diverged" stops the run
    _clock: float | None = None

    @property
    def eval_due(self) -> bool:
        return self.iteration % self.eval_every == 0 or self.iteration == self.iterations

    def start_clock(self) -> None:
        self._clock = time.perf_counter()

    def stop_clock(self) -> None:
        """Add the steps since start_clock to train_time, once the device has run them."""
        if self._clock is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_time += time.perf_counter() - self._clock
            self._clock = None

    def trained_s(self) -> float:
        """train_time with the running stretch (its steps may still be queued on the device)."""
        return self.train_time + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def record_eval(self, acc: float, test_loss: float) -> None:
        self.curve.append({"iter": self.iteration, "test_acc": round(acc, 4), "test_loss": round(test_loss, 6),
                           "train_loss": round(self.step.loss_sum.item() / max(self.loss_n, 1), 6),
                           "lr": self.lr, "wall_s": round(self.train_time, 3)})
        if acc > self.best[0]:
            self.best = (acc, self.iteration)
        self.step.reset_loss()
        self.loss_n = 0


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: D.DeviceData, autocast) -> tuple[float, float]:
    """(accuracy %, mean loss) on the whole test set."""
    model.eval()
    correct = torch.zeros((), device=data.device)
    loss = torch.zeros((), device=data.device)
    for x, y in data.test_batches():
        with autocast():
            out = model(x).float()
        correct += (out.argmax(1) == y).sum()
        loss += torch.nn.functional.cross_entropy(out, y, reduction="sum")
    model.train()
    n = len(data.test_y)
    return 100.0 * correct.item() / n, loss.item() / n


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def result_of(state: TrainState) -> dict:
    if state.status == "ok" and not state.curve:
        raise UserError("the run has no evaluation; iterations must be at least 1")
    images = state.iteration * state.batch_size
    return {
        "status": state.status,
        "final_acc": state.curve[-1]["test_acc"] if state.curve and state.status == "ok" else float("nan"),
        "best_acc": round(state.best[0], 4) if state.best[0] >= 0 else float("nan"),
        "best_iter": state.best[1],
        "iterations": state.iteration,
        "epochs": round(images / state.data.epoch_len, 3),
        "wall_s": round(state.train_time, 2),
        "img_per_s": round(images / max(state.train_time, 1e-9), 1),  # training steps only, evaluation excluded
        "device": device_name(state.device),
        "precision": effective_precision(state.precision, state.device),
        "step_mode": state.step.step_mode,
        "params_paper": state.params[0],
        "params_total": state.params[1],
    }


def run_identity(run: RunSpec) -> dict:
    """What a result.json says about whose it is: checked against the folder's name and its config.yaml."""
    return {"config_hash": run.config_hash, "table": run.table, "row_id": run.row_id, "seed": run.seed}


def read_result(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / "result.json")


def build(run: RunSpec, run_dir: Path, device: torch.device, data_dir: Path, download: bool,
          log: Callable[[str], None], backend: captured_step.GraphBackend | None,
          data: D.DeviceData | None = None) -> TrainState:
    """The run's data, network, optimizer and step, at iteration 0. ``data``: the run's dataset already on
    the device (another seed's: runs trained together share the images, each with its own order)."""
    tr = run.training
    iterations, batch_size, eval_every, precision = tr.iterations, tr.batch_size, tr.eval_every, tr.precision

    torch.manual_seed(run.seed)
    data = (D.load(run.dataset, data_dir, download, device, batch_size, run.seed) if data is None
            else dataclasses.replace(data, seed=run.seed))
    model = M.build_model(run.spec, run.in_shape, run.net).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    paper_params, total_params = network.count_params(run.spec, run.in_shape)
    assert total_params == M.count_trainable(model), "spec and module disagree on parameter count"
    if device.type == "cuda":
        # Fixed shapes (one batch size, one image size): tune once. Not when cuDNN is asked to be deterministic
        # (gpucheck's comparisons): autotuning picks kernels by their timing, so two runs could differ.
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic
    # CUDA graphs on a GPU; a test's stand-in backend runs the same capture logic on the CPU.
    graphs = tr.graphs and (device.type == "cuda" or backend is not None)
    optimizer = solvers.make_optimizer(run.solver, solvers.param_groups(model, run.param_mults))
    autocast = autocast_for(precision, device)
    model.train()
    step = captured_step.Step(model, optimizer, data, autocast, graphs, backend=backend)
    return TrainState(run=run, run_dir=run_dir, device=device, model=model, optimizer=optimizer, data=data,
                      step=step, autocast=autocast, log=log, iterations=iterations, batch_size=batch_size,
                      eval_every=eval_every, checkpoint_every=tr.checkpoint_every,
                      check_every=min(eval_every, 50), precision=precision, params=(paper_params, total_params))


def write_config(run: RunSpec, run_dir: Path) -> None:
    """The run folder with its ``config.yaml`` (the resolved run), before it trains."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run.to_dict())))
    except OSError as err:
        raise UserError(f"cannot write the run directory {run_dir}: {err.strerror or err}") from None


def write_outcome(state: TrainState, result: dict) -> None:
    """A finished run's weights, then its result.json (a run is finished exactly when that file exists).

    ``result`` gains the run's identity (``run_identity``) and the digest of the weights: a result.json or a
    model.pt copied into another run's folder then names another run, and is refused (runs/index.py)."""
    weights = state.run_dir / "model.pt"
    atomic_write(weights, lambda tmp: save_pt(state.model.state_dict(), tmp))
    result.update(run_identity(state.run), finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  model_sha256=file_sha256(weights))
    write_json(state.run_dir / "result.json", result)
    (state.run_dir / CHECKPOINT).unlink(missing_ok=True)  # only now: until result.json exists, it is the run
    (state.run_dir / PREVIOUS_CHECKPOINT).unlink(missing_ok=True)
