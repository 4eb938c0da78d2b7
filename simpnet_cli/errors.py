"""Errors a user can fix. The CLI prints their message as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input: a config, a selector, a dataset, a path. ``str(err)`` is the one line shown to the user."""

    exit_code = 2
