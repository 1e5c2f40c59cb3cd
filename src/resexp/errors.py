"""The one exception type that the command line turns into a one-line error."""


class UsageError(Exception):
    """A problem with what the user asked for: bad value, missing data, wrong device.

    The command line prints its message on one line and exits with code 2; no
    traceback is shown unless HYDRA_FULL_ERROR=1 (or RESEXP_TRACEBACK=1) is set.
    """
