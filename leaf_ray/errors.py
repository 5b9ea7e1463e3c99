"""The base of every error a user can cause, and how a job reports one: a single line, not a traceback.

Each module's error (ConfigError, DataError, CacheMismatchError, ...) derives from `LeafRayError` and from the
builtin it always was (ValueError, FileNotFoundError, ...), so callers that caught the builtin still do. A job's
`if __name__ == "__main__"` block calls `run_job(main)`: a LeafRayError ends the process with `error: <message>`
on stderr and exit status 2; `--debug` or LEAF_DEBUG=1 lets the traceback through instead. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

USAGE_ERROR = 2  # the exit status of a run the user can fix (argparse uses it for bad arguments too)


class LeafRayError(Exception):
    """An error the user can cause and fix (config, data, models, caches, storage); its message says how."""


def user_error(exc: BaseException) -> LeafRayError | None:
    """The LeafRayError behind `exc`: the remote error of a Ray task or actor (Ray re-raises it on the driver as
    a RayTaskError whose `cause` it is, and whose own text is the remote traceback), `exc` itself, or its cause."""
    for candidate in (getattr(exc, "cause", None), exc, exc.__cause__):
        if isinstance(candidate, LeafRayError):
            return candidate
    return None


def run_job(main: Callable[[list[str]], object], argv: list[str] | None = None) -> object | NoReturn:
    """Run a job's `main(argv)`; a user error becomes one line on stderr (a message of several lines is
    joined) and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LEAF_DEBUG", "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except Exception as exc:  # noqa: BLE001 - only user errors are turned into a line; the rest re-raise
        found = user_error(exc)
        if found is None or debug:
            raise
        message = " ".join(line.strip() for line in str(found).splitlines() if line.strip())
        print(f"error: {message or type(found).__name__}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
