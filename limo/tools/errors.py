"""Errors in what a user gave us (a config key, a data file, a model folder, a path), as opposed
to bugs of ours. Every command line prints a UserError as one line, `error: ...` (once, on rank
0 of a distributed run), and exits with USAGE_EXIT; a traceback means a bug of ours."""

from __future__ import annotations

import sys

USAGE_EXIT = 2  # argparse's own code for a bad command line; ours for every bad input


class UserError(ValueError):
    """Bad input, named in the message: the file and line, the key, the tensor or the path."""


def refuse(error: BaseException, prog: str | None = None, show: bool = True) -> int:
    """Print `error` as the one line a user reads (when `show`: rank 0 only) and return the exit code."""
    if show:
        print(f"{prog + ': ' if prog else ''}error: {error}", file=sys.stderr, flush=True)
    return USAGE_EXIT
