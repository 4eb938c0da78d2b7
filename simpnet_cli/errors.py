"""Errors a user can fix, and how any failure of a command is said: as one line on stderr and an exit code
(``guarded``), without a traceback unless --debug."""
from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Bad input: a config, a selector, a dataset, a path. ``str(err)`` is the one line shown to the user."""

    exit_code = 2


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def guarded(fn, debug: bool) -> int:
    """Run ``fn``; a UserError or an unexpected failure becomes one line on stderr and an exit code."""
    try:
        return fn()
    except UserError as err:
        if debug:
            raise
        print(f"simpnet: error: {one_line(err)}", file=sys.stderr)
        code = err.exit_code
    except BrokenPipeError:  # `simpnet show | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:
        print("simpnet: interrupted; finished runs are recorded and unfinished ones resume from their "
              "last checkpoint", file=sys.stderr)
        code = 130
    except Exception as err:  # a bug, not bad input: still one line unless --debug
        if debug:
            raise
        print(f"simpnet: internal error: {type(err).__name__}: {one_line(err)} (run with --debug for the traceback)",
              file=sys.stderr)
        code = 1
    return code
