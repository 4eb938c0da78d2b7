"""One run: the authors' solver and schedule, test evaluation at a fixed interval, checkpoints, resume.

A run directory holds ``config.yaml`` (the resolved run), ``checkpoint.pt`` (written atomically every
``checkpoint_every`` iterations), ``curve.csv`` (one line per evaluation), ``model.pt`` (final weights) and,
last of all, ``result.json``: a run is finished exactly when that file exists. Re-running the same run
continues from its checkpoint; the data order, augmentation and learning rate are functions of the
iteration, and the RNG states (dropout) are restored, so a resumed CPU run equals an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from omegaconf import OmegaConf

from simpnet_cli.train import checkpoint
from simpnet_cli.train import data as D
from simpnet_cli.train import captured_step
from simpnet_cli.nets import modules as M
from simpnet_cli.nets import specs as network
from simpnet_cli.errors import UserError
from simpnet_cli.runs.progress import Event
from simpnet_cli.files import atomic_write, read_json, save_pt, write_json  # noqa: F401 - (re-exported)
from simpnet_cli.config.tables import RunSpec

CURVE_COLUMNS = ["iter", "test_acc", "test_loss", "train_loss", "lr", "wall_s"]


# --------------------------------------------------------------------------- solver

def lr_at(solver: dict, iteration: int) -> float:
    """The learning rate Caffe uses at ``iteration``: multistep walks its step list in order (as Caffe does,
    even when the list is unsorted); piecewise reads {iteration: lr} points, and from ``poly.from_iter`` on
    follows Caffe's poly policy (a run the authors resumed with another lr_policy)."""
    sched = solver["schedule"]
    if sched["kind"] == "multistep":
        # Caffe's counter moves at most one step per iteration: the k-th step takes effect at
        # max(steps[k], iteration of the (k-1)-th + 1).
        n, last = 0, -1
        for step in sched["steps"]:
            last = max(step, last + 1)
            if iteration < last:
                break
            n += 1
        return solver["lr"] * sched["gamma"] ** n
    if sched["kind"] == "piecewise":
        poly = sched.get("poly")
        if poly is not None:
            try:
                start, base, power, max_iter = (int(poly["from_iter"]), float(poly["base_lr"]),
                                                float(poly["power"]), int(poly["max_iter"]))
            except (KeyError, TypeError, ValueError) as err:
                raise UserError(f"schedule.poly needs from_iter, base_lr, power and max_iter (numbers); "
                                f"got {poly!r} ({type(err).__name__}: {err})") from None
            if iteration >= start:
                # Caffe: base_lr * (1 - iter/max_iter)^power; Caffe stops at max_iter, so clamp past it at 0
                return base * max(0.0, 1.0 - iteration / max_iter) ** power
        lr = solver["lr"]
        for start, value in sorted((int(k), float(v)) for k, v in sched["points"].items()):
            if iteration >= start:
                lr = value
        return lr
    raise UserError(f"unknown schedule kind {sched['kind']!r} (multistep or piecewise)")


def _mults(part, where: str) -> tuple[float, float]:
    """(lr_mult, decay_mult) of one ``{lr: .., decay: ..}`` entry; an absent key is 1, as in Caffe."""
    if not isinstance(part, Mapping) or set(part) - {"lr", "decay"}:
        raise UserError(f"param_mults.{where} must be {{lr: <number>, decay: <number>}}, got {part!r}")
    out = []
    for key in ("lr", "decay"):
        value = part.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise UserError(f"param_mults.{where}.{key} must be a number >= 0, got {value!r}")
        out.append(float(value))
    return out[0], out[1]


def param_groups(model: torch.nn.Module, param_mults: Mapping | None) -> list[dict]:
    """Torch param groups carrying Caffe's lr_mult / decay_mult (``run.net["param_mults"]``).

    Parameters with equal multipliers share a group; groups come in the order their first parameter appears
    in ``model.parameters()``, so the optimizer state_dict (checkpoints) has a fixed layout. Everything not
    named in ``param_mults`` (conv weights, other conv biases, BatchNorm gamma/beta) is lr 1 / decay 1. Convs
    are found by their ``caffe_conv_index`` (1-based, network order) and the classifier by
    ``caffe_classifier``, both set by model.build_model."""
    mults = param_mults or {}
    if not isinstance(mults, Mapping) or set(mults) - {"classifier", "convs"}:
        raise UserError(f"param_mults takes the keys classifier and convs, got {param_mults!r}")
    own: dict[int, tuple[float, float]] = {}  # id(parameter) -> (lr_mult, decay_mult)

    classifier = mults.get("classifier")
    if classifier is not None:
        if not isinstance(classifier, Mapping) or set(classifier) - {"weight", "bias"}:
            raise UserError(f"param_mults.classifier takes the keys weight and bias, got {classifier!r}")
        fcs = [m for m in model.modules() if getattr(m, "caffe_classifier", False)]
        if not fcs:
            raise UserError("param_mults.classifier is given but this network has no fc classifier "
                            "(write classifier: null)")
        for fc in fcs:
            for name in ("weight", "bias"):
                param = getattr(fc, name, None)
                if classifier.get(name) is not None and param is not None:
                    own[id(param)] = _mults(classifier[name], f"classifier.{name}")

    convs = mults.get("convs") or {}
    if not isinstance(convs, Mapping) or set(convs) - {"indices", "bias"}:
        raise UserError(f"param_mults.convs takes the keys indices and bias, got {convs!r}")
    indices = list(convs.get("indices") or [])
    if indices:
        if convs.get("bias") is None:
            raise UserError(f"param_mults.convs.bias is null but convs {indices} are listed")
        bias = _mults(convs["bias"], "convs.bias")
        by_index = {m.caffe_conv_index: m for m in model.modules()
                    if getattr(m, "caffe_conv_index", None) is not None}
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i not in by_index]
        if bad:
            raise UserError(f"param_mults.convs.indices {bad} name no conv of this network "
                            f"(it has convs 1-{len(by_index)}, numbered from 1 in network order)")
        for i in indices:
            if by_index[i].bias is None:
                raise UserError(f"param_mults.convs.indices: conv {i} has no bias")
            own[id(by_index[i].bias)] = bias

    groups: dict[tuple[float, float], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(own.get(id(param), (1.0, 1.0)), []).append(param)
    return [{"params": params, "lr_mult": lr, "decay_mult": decay} for (lr, decay), params in groups.items()]


def make_optimizer(solver: dict, groups_or_params, capturable: bool = False) -> torch.optim.Optimizer:
    """The run's solver over ``param_groups(...)`` (or plain parameters: one group at lr 1 / decay 1). Each
    group's lr is solver lr * lr_mult and its weight_decay solver weight_decay * decay_mult, as Caffe's
    local_rate and local_decay; ``captured_step.Step`` keeps lr_mult when the schedule changes the rate."""
    groups = list(groups_or_params)
    if not all(isinstance(g, Mapping) for g in groups):
        groups = [{"params": groups}]
    lr, decay = solver["lr"], solver["weight_decay"]
    groups = [{**g, "lr_mult": g.get("lr_mult", 1.0), "decay_mult": g.get("decay_mult", 1.0),
               "lr": lr * g.get("lr_mult", 1.0), "weight_decay": decay * g.get("decay_mult", 1.0)}
              for g in groups]
    kind = solver["type"]
    if kind == "adadelta":
        # Caffe's AdaDelta (rho = momentum, eps = delta) adds the decay to the gradient, keeps its histories
        # of the unscaled update and scales the step by lr * lr_mult: torch's Adadelta exactly.
        return torch.optim.Adadelta(groups, lr=lr, rho=solver["rho"], eps=solver["eps"],
                                    weight_decay=decay, capturable=capturable)
    if kind == "nesterov":
        return torch.optim.SGD(groups, lr=lr, momentum=solver["momentum"], nesterov=True, weight_decay=decay)
    raise UserError(f"unknown solver type {kind!r} (adadelta or nesterov)")


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for the forward pass: fp32 (none), or bf16 autocast (mixed precision).

    fp16 is refused: it needs loss scaling, whose overflow check (``found_inf.item()``) is a host sync that
    cannot live inside a captured CUDA graph; bf16 has fp32's exponent range and needs none."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    if precision == "fp16":
        raise UserError("precision=fp16 is not supported (it needs loss scaling, which cannot run inside a CUDA "
                        "graph); use precision=bf16 for mixed precision")
    if precision not in dtypes:
        raise UserError(f"precision must be one of {', '.join(dtypes)}, got {precision!r}")
    dtype = dtypes[precision]
    # No cast cache: a cached bf16 copy of a weight must not outlive one step inside a captured CUDA graph.
    return (lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)) if dtype \
        else contextlib.nullcontext


def effective_precision(precision: str, device: torch.device) -> str:
    """What the arithmetic really is: "fp32" convolutions on an NVIDIA GPU run as TF32 unless turned off."""
    if precision != "fp32" or device.type != "cuda":
        return precision
    tf32 = [name for name, on in (("convolutions", torch.backends.cudnn.allow_tf32),
                                  ("matmuls", torch.backends.cuda.matmul.allow_tf32)) if on]
    return f"fp32 (TF32 {' and '.join(tf32)})" if tf32 else "fp32"


# --------------------------------------------------------------------------- files

def write_curve(path: Path, curve: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, CURVE_COLUMNS)
            w.writeheader()
            w.writerows(curve)
    atomic_write(path, write)


def read_result(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / "result.json")


# --------------------------------------------------------------------------- evaluation

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


# --------------------------------------------------------------------------- the run

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def train_run(run: RunSpec, run_dir: Path, device: torch.device, data_dir: Path, download: bool,
              log: Callable[[str], None] = lambda s: None, backend: captured_step.GraphBackend | None = None,
              progress: Callable[[Event], None] | None = None) -> dict:
    """Train ``run`` to its last iteration (resuming from ``run_dir/checkpoint.pt`` if present); return its result.

    ``log`` gets messages (resumed, diverged); ``progress`` gets an ``Event`` before the first step, every few
    iterations and at each evaluation (rendering is progress.Reporter's business)."""
    run_dir = Path(run_dir)
    done = read_result(run_dir)
    if done:
        return done
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run.to_dict())))
    except OSError as err:
        raise UserError(f"cannot write the run directory {run_dir}: {err.strerror or err}") from None
    tr = run.train
    iterations, batch_size = int(tr["iterations"]), int(tr["batch_size"])
    eval_every = int(tr.get("eval_every", 500))
    ckpt_every = int(tr.get("checkpoint_every", 5000))
    precision = tr.get("precision", "fp32")

    torch.manual_seed(run.seed)
    data = D.load(run.dataset, data_dir, download, device, batch_size, run.seed)
    model = M.build_model(run.spec, run.in_shape, run.net).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    paper_params, total_params = network.count_params(run.spec, run.in_shape)
    assert total_params == M.count_trainable(model), "spec and module disagree on parameter count"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes (one batch size, one image size): tune once
    # CUDA graphs on a GPU; a test's stand-in backend runs the same capture logic on the CPU.
    graphs = bool(tr.get("graphs", True)) and (device.type == "cuda" or backend is not None)
    # capturable: the optimizer keeps its step counts on the GPU, as a captured graph needs (CUDA only)
    capturable = graphs and device.type == "cuda"
    optimizer = make_optimizer(run.solver, param_groups(model, run.param_mults), capturable=capturable)
    autocast = autocast_for(precision, device)

    start, curve, best, train_time, ckpt = 0, [], (-1.0, 0), 0.0, None
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = checkpoint.read(ckpt_path, run.config_hash)  # on the CPU, checksummed; refused if damaged
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        checkpoint.restore(ckpt_path, ckpt, model, optimizer)
        # load_state_dict also replaces each group's settings with the saved ones; the run's own are the truth
        # (the checkpoint may come from a run with(out) CUDA graphs, or predate the lr/decay multipliers).
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        if capturable:  # capturable optimizers keep their step counts on the parameters' device
            for param, state in optimizer.state.items():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(param.device, torch.float32)
        start, curve, train_time = ckpt["iteration"], ckpt["curve"], ckpt["train_time"]
        best = tuple(ckpt["best"])
        checkpoint.set_rng_state(ckpt["rng"], device)
        log(f"resuming {run_dir.name} at iteration {start}")

    def save_checkpoint(it: int, train_time: float) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                 "curve": curve, "best": best, "train_time": train_time, "rng": checkpoint.rng_state(device),
                 "data_position": {"epoch": it * batch_size // data.epoch_len,
                                   "offset": it * batch_size % data.epoch_len},
                 "loss_sum": step.loss_sum.item(), "config_hash": run.config_hash}
        checkpoint.save(ckpt_path, state, run.config_hash)

    model.train()
    step = captured_step.Step(model, optimizer, data, autocast, graphs, backend=backend, updates=start)
    if ckpt:  # the partial training-loss sum since the last evaluation, for an equal curve
        step.loss_sum.fill_(ckpt.get("loss_sum", 0.0))
    status, loss_n, it = "ok", (start % eval_every), start
    check_every = min(eval_every, 50)
    session = (time.perf_counter(), train_time)  # this session's start: rates exclude what came before a resume

    def report(kind: str, train_s: float) -> None:
        if progress is not None:
            last = curve[-1]["test_acc"] if curve else None
            progress(Event(kind, it, iterations, start, batch_size, train_s, time.perf_counter() - session[0],
                           last, best[0] if best[0] >= 0 else None, best[1] if best[0] >= 0 else None))

    report("start", 0.0)
    t0 = time.perf_counter()
    while it < iterations:
        lr = lr_at(run.solver, it)
        step(it, lr)
        loss_n += 1
        it += 1
        if it % check_every == 0 or it == iterations:
            if step.bad.item():
                if start and it <= start + check_every:
                    # A finite run that turns non-finite at once after a resume is far likelier a damaged
                    # checkpoint than a divergence: never record it as one.
                    raise checkpoint.unreadable(ckpt_path, f"the loss is NaN or infinite right after resuming at "
                                                           f"iteration {start}, so it is probably corrupt")
                status = "diverged"
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_time += time.perf_counter() - t0  # a diverged run records its real time and speed
                log(f"loss became NaN or infinite by iteration {it}; stopping this run")
                break
            if it % eval_every and it != iterations:  # (bad.item() above has waited for the device)
                report("step", train_time - session[1] + time.perf_counter() - t0)
        if it % eval_every == 0 or it == iterations:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t0
            applied = int(step.updates.item())
            if applied != it:
                # An empty graph (replays that do nothing) or a double-applied one: never record its figures.
                raise UserError(f"{run_dir.name}: the training step applied {applied} updates in {it} iterations "
                                f"({step.step_mode}); stopping before a wrong figure is recorded. Re-run with "
                                f"profile.train.graphs=false to train without CUDA graphs")
            acc, test_loss = evaluate(model, data, autocast)
            curve.append({"iter": it, "test_acc": round(acc, 4), "test_loss": round(test_loss, 6),
                          "train_loss": round(step.loss_sum.item() / max(loss_n, 1), 6), "lr": lr,
                          "wall_s": round(train_time, 3)})
            if acc > best[0]:
                best = (acc, it)
            step.reset_loss()
            loss_n = 0
            report("eval", train_time - session[1])
            t0 = time.perf_counter()
        if it % ckpt_every == 0 and it < iterations:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t0  # the steps so far count; writing the checkpoint does not
            save_checkpoint(it, train_time)
            t0 = time.perf_counter()
    if status == "ok" and not curve:
        raise UserError("the run has no evaluation; iterations must be at least 1")
    images = it * batch_size
    result = {
        "status": status,
        "final_acc": curve[-1]["test_acc"] if curve and status == "ok" else float("nan"),
        "best_acc": round(best[0], 4) if best[0] >= 0 else float("nan"),
        "best_iter": best[1],
        "iterations": it,
        "epochs": round(images / data.epoch_len, 3),
        "wall_s": round(train_time, 2),
        "img_per_s": round(images / max(train_time, 1e-9), 1),  # training steps only, evaluation excluded
        "device": device_name(device),
        "precision": effective_precision(precision, device),
        "step_mode": step.step_mode,
        "params_paper": paper_params,
        "params_total": total_params,
    }
    write_curve(run_dir / "curve.csv", curve)
    atomic_write(run_dir / "model.pt", lambda tmp: save_pt(model.state_dict(), tmp))
    write_json(run_dir / "result.json", result)
    ckpt_path.unlink(missing_ok=True)
    return result
