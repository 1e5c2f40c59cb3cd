"""The one exception type that the command line turns into a one-line error."""


class UsageError(Exception):
    """A problem with what the user asked for: bad value, missing data, wrong device.

    The command line prints its message on one line and exits with code 2; no
    traceback is shown unless HYDRA_FULL_ERROR=1 (or RESEXP_TRACEBACK=1) is set.
    """


def wants_traceback() -> bool:
    """The user asked for full tracebacks (Hydra's own switch, or ours)."""
    import os

    return any(os.environ.get(name, "") not in ("", "0") for name in ("HYDRA_FULL_ERROR", "RESEXP_TRACEBACK"))


def exit_with(error: UsageError) -> None:
    """Print a usage error as one line and leave with exit code 2 (or re-raise on request).

    SystemExit passes through Hydra's own error reporting, which would otherwise print
    its hint and exit with 1.
    """
    import sys

    if wants_traceback():
        raise error
    print(f"resexp: error: {error}", file=sys.stderr)
    raise SystemExit(2)
