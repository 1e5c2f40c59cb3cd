"""The names of the files a run and a sweep leave behind, crash-safe writing, and tolerant reading.

Every file that a later command relies on (checkpoints, result.json, summaries,
dataset caches) is written to a temporary file in the same folder, flushed to
disk and renamed over the target, so a crash leaves either the old or the new
file, never half of one.

Also the arguments of the commands that read a sweep or run folder (``resexp plot``,
``status``, ``analyze``): ``parse_folder_args`` checks them alike for all three.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UsageError

# The files of a run folder (see resexp.train) and of a sweep folder.
CONFIG = "config.yaml"  # the resolved config
ENV = "env.json"  # where and with what the run ran
METRICS = "metrics.jsonl"  # one line per evaluation
CHECKPOINT = "checkpoint.pt"  # the latest checkpoint
RESULT = "result.json"  # status and final numbers
LOCK = "run.lock"  # who is training the run now: process id and host
SWEEP_RECORD = "sweep.json"  # the planned runs of a sweep
MLFLOW_RUN = "mlflow_run.json"  # logger=mlflow: the id of the run's MLflow run, which a resumed run continues
LOGGER_ERRORS = "logger_errors.json"  # the loggers that failed in this run, and how (resexp status shows it)
# The command the user typed (JSON list of its words), set by the resexp command for the processes it
# starts: env.json records it, not the scheduler's internal command of a sweep's job process.
COMMAND_VARIABLE = "RESEXP_COMMAND"
# A folder holding any of these is a run folder, whatever state its run is in.
RUN_FILES = (CONFIG, RESULT, METRICS, CHECKPOINT)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(fileobj)`` on a temporary file, fsync it, and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only file system or folder
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a user's quota spent


def write_error_reason(error: OSError, folder: str | os.PathLike) -> str:
    """What a failed write into ``folder`` means, with what to do: space only helps a full disk."""
    if error.errno in FULL_ERRNOS:
        return f"the disk holding {folder} is full ({error.strerror}); free some space and run the same command"
    if error.errno in READ_ONLY_ERRNOS:
        return f"{folder} is read-only ({error.strerror}); make it writable, or copy it somewhere writable"
    return f"{error.filename or folder}: {error.strerror or error}"


NAME_MAX = 255  # bytes in one file or folder name (Linux, macOS and Windows file systems alike)


def folder_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one folder's name on a file system, or None."""
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        return "holds a control character (a newline, a tab, ...)"
    if len(os.fsencode(name)) > NAME_MAX:
        return f"is {len(os.fsencode(name))} bytes long; a folder name may have at most {NAME_MAX}"
    return None


def unusable_folder_reason(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder`` (made if need be), or None: a file where a folder must be,
    or a folder that cannot be written. Checked before long work whose results go there."""
    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            if not path.is_dir():
                return f"{path} is a file, not a folder"
            if not os.access(path, os.W_OK | os.X_OK):
                return f"{path} is not writable"
            return None
    return None


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at ``path``, or None."""
    path = Path(path)
    return f"{path} is a folder" if path.is_dir() else unusable_folder_reason(path.parent)


def typed_command() -> list[str]:
    """The command the user typed: the resexp command that started this process (or this one's own)."""
    import sys

    try:
        command = json.loads(os.environ.get(COMMAND_VARIABLE, ""))
    except ValueError:
        return list(sys.argv)
    return command if isinstance(command, list) and all(isinstance(w, str) for w in command) else list(sys.argv)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def read_lock(run_dir: str | os.PathLike) -> dict | None:
    """The run folder's lock (``{"pid", "host", "since"}``: who trains it), or None if it has none."""
    try:
        holder = read_json(Path(run_dir) / LOCK)
        holder["pid"], holder["host"] = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return holder


def holder_alive(holder: dict) -> bool:
    """Whether the process a lock names may still be training: on another host it cannot be told (True);
    on this one, whether it exists. A lock of this very process is left from an earlier run (False)."""
    import socket

    if holder["host"] != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():
        return False  # left by this process (an earlier run of an in-process sweep that crashed)
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


# The fields of a run's result.json that readers compute with, and their types (null is allowed).
RESULT_FIELD_TYPES = {"status": str, "arch": str, "run_name": str, "error": str, "depth": int, "seed": int,
                      "iterations": int, "iterations_done": int, "parameters": int, "diverged_at": int,
                      "final_train_error": float, "final_test_error": float, "final_train_loss": float,
                      "final_test_loss": float, "best_test_error": float, "wall_time_s": float,
                      "images_per_s": float}


def read_result(path: str | os.PathLike) -> dict:
    """A run's result.json, checked: a JSON object whose known fields have their types.

    Raises ValueError naming the first field that does not, so a hand-edited or foreign file
    is reported as damaged instead of breaking the table or the figures.
    """
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    for key, kind in RESULT_FIELD_TYPES.items():
        value = record.get(key)
        if value is None:
            continue
        if kind is str:
            fits = isinstance(value, str)
        else:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                (kind is float or float(value).is_integer())
        if not fits:
            raise ValueError(f"{key} is {value!r}, not {'a number' if kind is float else 'an integer' if kind is int else 'text'}")
    return record


def _jsonl_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and push it to disk (a run's metrics survive a crash).

    If the line cannot be written whole (a full disk), the file is cut back to what it held,
    so no torn line is left in it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        line = memoryview(_jsonl_line(record).encode())
        try:
            while line:
                line = line[os.write(fd, line):]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace a JSON-lines file atomically."""
    atomic_write_text(path, "".join(_jsonl_line(record) for record in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, ignoring a torn last line left by a crash."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a write cut short by a crash: drop it
                return
            raise ValueError(f"{path}: line {number} is not valid JSON")


# --- the arguments of the commands that read a folder: resexp plot, status, analyze --------------

@dataclass
class FolderArgs:
    """What a folder-reading command was given: ``[WORD] DIR [key=value ...]``."""

    folder: Path  # an existing folder
    words: list[str]  # what came before the folder (the analysis of resexp analyze)
    options: dict[str, str]  # key=value options as typed; the command checks the values


def existing_folder(path: str | os.PathLike) -> Path:
    """``path`` if it is a folder; else a one-line UsageError that names it."""
    folder = Path(path)
    try:
        if folder.is_dir():
            return folder
    except OSError as error:  # e.g. a name past the file system's length limit
        raise UsageError(f"{folder}: {error.strerror or error}") from None
    if folder.exists():
        raise UsageError(f"{folder} is a file, not a folder: give a sweep's or a run's folder")
    raise UsageError(f"folder {folder} does not exist")


def parse_folder_args(command: str, usage: str, args: list[str], options: dict[str, str] | None = None,
                      max_words: int = 0) -> FolderArgs:
    """The arguments of ``resexp COMMAND``: one folder (the last word), up to ``max_words`` words
    before it, and ``key=value`` options, as everywhere else in resexp.

    ``options`` maps each key the command takes to its values in words (``{"max_images": "N|all"}``);
    ``usage`` is the command's usage line, quoted when the words do not fit. Every mistake is
    one UsageError line.
    """
    options = options or {}
    takes = ", ".join(f"{key}={values}" for key, values in options.items()) or "no options"
    words, given = [], {}
    for arg in args:
        key, equals, value = arg.partition("=")
        if arg.startswith("-"):
            raise UsageError(f"unknown option {arg}; resexp {command} takes {takes}")
        if equals and key in options:
            if key in given:
                raise UsageError(f"{key} is given twice ({key}={given[key]} and {arg}); give it once")
            given[key] = value
        elif equals and not Path(arg).exists():  # a folder's name may hold an '=', an option's may not
            raise UsageError(f"unknown option {arg}; resexp {command} takes {takes}")
        else:
            words.append(arg)
    if not 1 <= len(words) <= max_words + 1:
        raise UsageError(f"resexp {command} takes one folder (a sweep's or a run's); "
                         f"got {' '.join(words) or 'no folder'}; {usage}")
    return FolderArgs(existing_folder(words[-1]), words[:-1], given)
