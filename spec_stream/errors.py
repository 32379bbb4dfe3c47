"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """Bad input from the user (unknown name, missing file, wrong column, ...).

    The message must say what is wrong *and* what to change. Command-line entry points
    wrapped in :func:`exit_on_user_error` print it as one line and exit with status 2
    (set ``SPEC_STREAM_DEBUG=1`` to see the traceback instead).
    """


def exit_on_user_error(main: F) -> F:
    """Decorator for CLI entry points: a `UserError` becomes ``error: <message>`` on stderr
    and exit code 2; Ctrl-C becomes exit code 130. Every other exception is a bug and keeps
    its traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            if os.environ.get("SPEC_STREAM_DEBUG"):
                raise
            message = " ".join(str(error).split())
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


def require_at_least_one(args, names) -> None:
    """A `UserError` for the first of the command-line values ``names`` (attributes of
    ``args``) that is below 1: ``--num-samples must be at least 1, got 0``."""
    for name in names:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
