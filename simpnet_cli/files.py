"""Writing a run's files so a crash or a full disk never leaves a half-written one in place.

Every file of a run folder (checkpoint, curve, weights, result) goes through ``atomic_write``: a temporary
file in the same folder, fsync, rename. Readers see the old file or the new one, never a mix.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from simpnet_cli.errors import UserError


def why(err: BaseException) -> str:
    if isinstance(err, OSError):
        return "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    # torch's C++ writer reports a full disk as "unexpected pos N vs M" (PytorchStreamWriter)
    return "the disk is full" if "unexpected pos" in str(err) else str(err).splitlines()[0]


def atomic_write(path: Path, write: Callable[[Path], None],
                 kept: str = "the previous checkpoint and all recorded results are kept") -> None:
    """Write via a temporary file in the same folder, fsync, rename: readers see the old or the new file. A
    failure is a UserError saying why and ``kept``, what is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and "unexpected pos" not in str(err):
            raise
        raise UserError(f"cannot write {path}: {why(err)}; {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_pt(obj, path: Path) -> None:
    """torch.save through a Python file object: a full disk then raises OSError(ENOSPC), which atomic_write
    reports, where torch's own writer (given a file name) raises an opaque RuntimeError."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (a run's weights, named in its result.json)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=str)))


def write_json_unless_same(path: Path, obj: dict) -> Path:
    """``write_json(path, obj)``, creating its folder, unless ``path`` already holds ``obj`` (as JSON reads it
    back): a command run again writes nothing."""
    path = Path(path)
    try:
        if json.loads(path.read_text()) == json.loads(json.dumps(obj, default=str)):
            return path
    except (OSError, ValueError):
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    write_json(path, obj)
    return path


def read_json(path: Path) -> dict | None:
    """A JSON file written by ``write_json``, or None if absent; a damaged one is a clear error."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}); move it away to train this run again") \
            from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a result record; move it away to train this run again")
    return value
