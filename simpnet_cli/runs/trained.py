"""A finished run as a PyTorch module: rebuild the network from the run folder's config and load its weights.

``model.pt`` is a bare state_dict; ``config.yaml`` holds the resolved run (its net, dataset, ...), so the module
that trained can be made again exactly, with no table file or command line:

    from simpnet_cli import load_model
    model = load_model("experiments/3f2a...")    # eval mode, on the CPU
    logits = model(images)                       # images normalised as the run's feed says (see train.data)

The weights must be the folder's run's: its result.json names the run (checked against config.yaml) and the
SHA-256 of the model.pt it wrote, so a model.pt copied in from another run's folder is refused. A folder written
before result.json held that digest (simpnet before issue 25) cannot be checked: its weights load if its
result.json names the folder's run and they fit the network, with a warning.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Callable

import torch
import yaml

from simpnet_cli.errors import UserError
from simpnet_cli.files import file_sha256
from simpnet_cli.nets import modules as M
from simpnet_cli.nets import specs as network

ONNX_PACKAGES = ("onnx", "onnxscript")  # the `onnx` extra of pyproject.toml


def check_weights(run_dir: Path, config: dict, warn: Callable[[str], None] | None = None) -> None:
    """A UserError unless ``run_dir/model.pt`` is the weights of the run of ``config`` (its config.yaml)."""
    from simpnet_cli.runs import index

    weights = run_dir / "model.pt"
    try:
        result = json.loads((run_dir / index.RESULT).read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} has no {index.RESULT}: its run is not finished, so its model.pt is not "
                        f"its final weights") from None
    except (OSError, UnicodeError, ValueError) as err:
        raise UserError(f"{run_dir / index.RESULT} is unreadable ({type(err).__name__}): the weights cannot be "
                        f"tied to the run") from None
    why = index.identity_problem(result, config) if isinstance(result, dict) else "it is not a result record"
    if why:
        raise UserError(f"{run_dir}: {why}; its model.pt is not loaded as this run's (`simpnet repair` names "
                        f"an older simpnet's result where the table's CSV vouches for it)")
    digest = result.get("model_sha256")
    if digest is None:
        say = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        say(f"{weights}: written before simpnet recorded the weights' digest, so they cannot be checked to be "
            f"this run's (they fit its network)")
    elif file_sha256(weights) != str(digest):
        raise UserError(f"{weights} is not the model.pt its run wrote (its SHA-256 is not the one in "
                        f"{index.RESULT}): another run's weights?")


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               warn: Callable[[str], None] | None = None) -> torch.nn.Module:
    """The trained network of ``run_dir`` in eval mode; a UserError names what is missing, does not fit or is
    another run's (``check_weights``; ``warn`` is told when the weights cannot be checked, by default as a
    Python warning)."""
    run_dir = Path(run_dir)
    config, weights = run_dir / "config.yaml", run_dir / "model.pt"
    for path in (config, weights):
        if not path.is_file():
            raise UserError(f"{run_dir} has no {path.name}: it is not a finished run's folder "
                            f"(runs_dir/<config hash>/ holds config.yaml and, once finished, model.pt)")
    try:
        run = yaml.safe_load(config.read_text())
        net, dataset = run["net"], run["dataset"]
        spec = network.build_spec(net, int(dataset["classes"]))
        shape = network.Shape(int(dataset["channels"]), int(dataset["size"]), int(dataset["size"]))
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{config} does not describe a run ({type(err).__name__}: {err})") from None
    check_weights(run_dir, run, warn)
    model = M.build_model(spec, shape, net)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: one line, never a traceback
        raise UserError(f"cannot load {weights} into the network of {config} ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]})") from None
    from simpnet_cli.runs.planning import pick_device  # device='cuda' without one: its one line, not torch's

    return model.to(pick_device(str(device))).eval()


def export(run_dir: str | Path, fmt: str = "torchscript", out: str | Path | None = None,
           warn: Callable[[str], None] | None = None) -> Path:
    """Write the trained network of ``run_dir`` as TorchScript (``model.ts``) or ONNX (``model.onnx``; needs the
    ``onnx`` extra: ``pip install -e '.[onnx]'`` in a clone); return the file written."""
    import io

    run_dir = Path(run_dir)
    if fmt not in ("torchscript", "onnx"):
        raise UserError(f"format={fmt!r}: use torchscript or onnx")
    if fmt == "onnx":
        # torch's exporter (torch.export, then onnxscript's translation) needs both packages of the extra
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise UserError(f"format=onnx needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: "
                            f"pip install -e '.[onnx]' (in a clone; pip install 'simpnet[onnx]' otherwise)")
    path = Path(out) if out else run_dir / ("model.ts" if fmt == "torchscript" else "model.onnx")
    model = load_model(run_dir, warn=warn)
    check_out(path)
    run = yaml.safe_load((run_dir / "config.yaml").read_text())
    d = run["dataset"]
    example = torch.zeros(1, int(d["channels"]), int(d["size"]), int(d["size"]))
    # Made in memory, then written by Python: torch's own writer, given a file name, aborts the process with a
    # C++ stack trace on a full disk, and says "Parent directory does not exist" as a RuntimeError.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notices: not this command's news
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), buffer)
        else:
            # a batch of 2 as the example: a batch of 1 would be specialised to 1 instead of left free
            example = example.expand(2, *example.shape[1:]).contiguous()
            torch.onnx.export(model, (example,), buffer, input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    write_out(path, buffer.getvalue())
    return path


def check_out(path: Path) -> None:
    """Where an export goes: a file in a folder that exists (checked before the network is traced)."""
    if path.is_dir():
        raise UserError(f"out={path} is a folder; give a file name (out={path / 'model.ts'})")
    if not path.parent.is_dir():
        raise UserError(f"out={path}: the folder {path.parent} does not exist; create it first")


def write_out(path: Path, data: bytes) -> None:
    """``data`` into ``path``: through a temporary file and a rename (a failed export leaves no half file), or
    straight into a device or pipe that is already there (out=/dev/stdout). A read-only folder or a full disk
    is one line."""
    from simpnet_cli import files

    if path.exists() and not path.is_file():
        try:
            with open(path, "wb") as fh:
                fh.write(data)
        except OSError as err:
            raise UserError(f"cannot write {path}: {files.why(err)}") from None
        return
    files.atomic_write(path, lambda tmp: tmp.write_bytes(data), kept="nothing else was changed")
