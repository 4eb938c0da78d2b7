"""A run's checkpoint: its whole training state, checksummed, tied to the run it belongs to, loaded on the CPU.

File layout: one header line, then the payload that ``torch.save`` wrote::

    SIMPNET-CHECKPOINT 1 {"config_hash": "...", "sha256": "...", "size": N}\\n<N bytes of torch.save output>

A checkpoint is trusted only if the header parses, the payload has its size and SHA-256, it belongs to this
run's config hash, and its tensors fit this run's model and optimizer. Anything else (random bytes written
into it, a file cut short, another run's checkpoint) is refused with one line and never trained from.

It always loads on the CPU: RNG states must be CPU ByteTensors (``torch.set_rng_state`` and
``torch.cuda.set_rng_state`` refuse anything else), and ``load_state_dict`` moves model and optimizer tensors
to the parameters' device itself.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from simpnet_cli.errors import UserError
from simpnet_cli.files import atomic_write
from simpnet_cli.train.solvers import Solver

MAGIC = b"SIMPNET-CHECKPOINT 1 "
KEYS = {"model", "optimizer", "iteration", "curve", "best", "train_time", "rng", "data_position", "loss_sum",
        "config_hash"}


class CheckpointError(UserError):
    """A checkpoint that must not be trained from."""


def unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is unreadable ({why}); move it away to restart this run from "
                           f"iteration 0")


def save(path: Path, state: dict, config_hash: str) -> None:
    """Write ``state`` atomically, with its checksum and the config hash of its run."""
    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)  # in memory first: the checksum covers exactly the bytes written
        payload = buf.getvalue()
        header = {"config_hash": config_hash, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
            fh.write(payload)
    atomic_write(path, write)


def read(path: Path, config_hash: str | None = None) -> dict:
    """The state saved in ``path``, on the CPU, after every integrity check; CheckpointError otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise unreadable(path, err.strerror or str(err)) from None
    if not raw.startswith(MAGIC) or b"\n" not in raw:
        raise unreadable(path, "not a simpnet checkpoint, or its header is damaged")
    header_line, payload = raw[len(MAGIC):].split(b"\n", 1)
    try:
        header = json.loads(header_line)
        size, digest, owner = int(header["size"]), str(header["sha256"]), str(header["config_hash"])
    except (ValueError, KeyError, TypeError):
        raise unreadable(path, "its header is damaged") from None
    if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
        raise unreadable(path, "checksum mismatch: the file was damaged after it was written")
    if config_hash is not None and owner != config_hash:
        raise unreadable(path, f"it belongs to run {owner}, not {config_hash}")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise unreadable(path, type(err).__name__) from None
    if not isinstance(state, dict) or not KEYS <= set(state):
        missing = sorted(KEYS - set(state)) if isinstance(state, dict) else ["everything"]
        raise unreadable(path, f"it lacks {', '.join(missing)}")
    return state


def iteration(path: Path) -> int | None:
    """The iteration a checkpoint was saved at, or None if there is no valid one (for tests and tools)."""
    try:
        return int(read(path)["iteration"])
    except (CheckpointError, FileNotFoundError):
        return None


def restore(path: Path, state: dict, model: torch.nn.Module, optimizer: Solver) -> None:
    """Load model and optimizer states; wrong keys or tensor shapes are the same 'unreadable' line."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise unreadable(path, f"it does not fit this run's network: {first[:160]}") from None


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the RNG states (dropout masks) from a checkpoint; both setters take CPU ByteTensors only."""
    torch.set_rng_state(state["cpu"].to("cpu", torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].to("cpu", torch.uint8), device)
