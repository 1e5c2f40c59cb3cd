"""``resexp status DIR``: where every run of a sweep stands, from the files alone.

The planned runs come from ``sweep.json`` (when the sweep has written it), the rest from
the run folders on disk, so the table also works for a sweep whose jobs run on other
machines that share the folder (a SLURM cluster) and for a single run's folder. Nothing
is written and no process is asked anything.

A run's state:
    queued       planned, but no run folder or no record of a start yet
    running      result.json says running; iteration and an ETA from the last metrics line
    stalled      result.json says running, but no new metrics for far longer than an
                 evaluation interval takes: its process was probably killed
    dead         result.json says running, but its run.lock names a process on this host
                 that no longer exists (killed): known at once, without waiting for a stall
    done, failed, diverged, interrupted    as result.json records it
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .files import (CONFIG, ENV, LOGGER_ERRORS, METRICS, RESULT, RUN_FILES, SWEEP_RECORD, holder_alive,
                    parse_folder_args, read_json, read_jsonl, read_lock, read_result)

# A running run counts as stalled once its last metrics line is older than this many
# evaluation intervals, and never sooner than STALLED_AFTER_MIN_S.
STALLED_AFTER_INTERVALS = 3
STALLED_AFTER_MIN_S = 15 * 60

USAGE = """\
usage: resexp status DIR

One line per run of the sweep in DIR (or for the run folder DIR): queued, running (iteration
and ETA), stalled, done, failed, diverged or interrupted, with the latest training and test
errors, the host and SLURM job. Only reads files, so it works on a folder that jobs on other
machines are writing to. It takes no options.

examples:
  resexp status outputs/depth20-56-110                  every run of the sweep
  resexp status outputs/depth20-56-110/resnet-20-s0     one run
"""


@dataclass
class RunStatus:
    name: str
    state: str
    iterations_done: int | None = None
    iterations: int | None = None
    train_error: float | None = None
    test_error: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    where: str = ""
    error: str | None = None
    logger_errors: dict = field(default_factory=dict)  # logger name -> how it failed (logger=...)


# --- reading one run ----------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return read_json(path) if path.exists() else None
    except (OSError, ValueError):
        return None  # being replaced at this moment, or torn: treat as absent


def _read_metrics(path: Path) -> list[dict]:
    """The metrics lines that have the numbers the table uses (others were not written by a run)."""
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError):
        return []

    def number(value) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    return [row for row in rows if isinstance(row, dict) and isinstance(row.get("iteration"), int)
            and all(number(row.get(key)) for key in ("train_error", "test_error", "time_s"))]


def _planned_iterations(run_dir: Path) -> int | None:
    import yaml

    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text())
        return int(config["schedule"]["iterations"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None


def _where(run_dir: Path, submitted_job_id: str | None) -> str:
    """The host the run last ran on and its job, as squeue shows it (ARRAYJOB_TASK for arrays)."""
    env = _read_json(run_dir / ENV) or {}
    if env.get("slurm_array_job_id") and env.get("slurm_array_task_id") is not None:
        job = f"{env['slurm_array_job_id']}_{env['slurm_array_task_id']}"
    else:
        # The id submitit reported at submission is already in squeue's form.
        job = submitted_job_id or env.get("slurm_job_id")
    return " ".join(part for part in (env.get("host") or "", f"job {job}" if job else "") if part)


def run_status(run_dir: Path, planned: dict | None = None, now: float | None = None) -> RunStatus:
    """The state of one run from its folder; ``planned`` is its entry in sweep.json, if any."""
    status = _run_state(run_dir, planned, now)
    status.logger_errors = _read_json(run_dir / LOGGER_ERRORS) or {}
    return status


def _run_state(run_dir: Path, planned: dict | None, now: float | None) -> RunStatus:
    planned = planned or {}
    now = time.time() if now is None else now
    name = planned.get("run") or run_dir.name
    metrics = _read_metrics(run_dir / METRICS)
    last = metrics[-1] if metrics else {}
    where = _where(run_dir, planned.get("job_id"))
    try:
        result = read_result(run_dir / RESULT) if (run_dir / RESULT).exists() else None
    except (OSError, ValueError) as error:  # written by hand, or by something else
        return RunStatus(name, "damaged", where=where, error=f"{run_dir / RESULT}: {error}")

    if result is None:
        # Nothing on disk yet; the sweep record may know why (a job that failed before training).
        recorded = planned.get("result") or {}
        if planned.get("outcome") == "failed" or recorded.get("status") == "failed":
            return RunStatus(name, "failed", where=where, error=recorded.get("error") or "failed before training")
        total = _planned_iterations(run_dir)
        return RunStatus(name, "queued", iterations_done=0 if total else None, iterations=total, where=where)

    status = RunStatus(
        name, result.get("status", "unknown"), iterations_done=result.get("iterations_done"),
        iterations=result.get("iterations") or _planned_iterations(run_dir),
        train_error=result.get("final_train_error"), test_error=result.get("final_test_error"),
        elapsed_s=result.get("wall_time_s"), where=where, error=result.get("error"),
    )
    if status.state == "diverged" and not status.error:
        status.error = f"loss not finite at iteration {result.get('diverged_at')}"
    if last and status.state not in ("done", "diverged") and (status.iterations_done or 0) < last["iteration"]:
        # result.json is rewritten at the start and the end: a run killed in between got further.
        status.iterations_done = last["iteration"]
        status.train_error, status.test_error = last.get("train_error"), last.get("test_error")
        status.elapsed_s = last.get("time_s")
    if status.state != "running":
        return status
    if planned.get("outcome") == "failed":
        # The sweep saw the job end without the run finishing (killed, cancelled, out of requeues).
        recorded = planned.get("result") or {}
        status.state = "failed"
        status.error = recorded.get("error") or "its job ended before the run finished"
        return status

    holder = read_lock(run_dir)
    if holder is not None and not holder_alive(holder):
        status.state = "dead"
        status.error = (f"its process {holder['pid']} on {holder['host']} is gone (killed?); "
                        "run the same command to resume")
        return status
    # Running: result.json is only rewritten at the start and the end, so progress comes
    # from the metrics the run appends at every evaluation.
    if last:
        status.iterations_done = last.get("iteration")
        status.train_error, status.test_error = last.get("train_error"), last.get("test_error")
        status.elapsed_s = last.get("time_s")
        seconds_per_iteration = _recent_speed(metrics)
        if seconds_per_iteration and status.iterations and status.iterations_done is not None:
            status.eta_s = seconds_per_iteration * max(0, status.iterations - status.iterations_done)
            interval_s = seconds_per_iteration * _iterations_between(metrics)
            quiet_s = now - (run_dir / METRICS).stat().st_mtime
            if quiet_s > max(STALLED_AFTER_MIN_S, STALLED_AFTER_INTERVALS * interval_s):
                status.state = "stalled"
                status.eta_s = None
                status.error = f"no new metrics for {format_duration(quiet_s)}; its job may have been killed"
    else:
        status.iterations_done = status.iterations_done or 0
    return status


def _recent_speed(metrics: list[dict]) -> float | None:
    """Seconds per iteration between the last two evaluations (or since the start)."""
    last = metrics[-1]
    before = metrics[-2] if len(metrics) > 1 else {"iteration": 0, "time_s": 0.0}
    try:
        iterations = last["iteration"] - before["iteration"]
        seconds = last["time_s"] - before["time_s"]
    except (KeyError, TypeError):
        return None
    return seconds / iterations if iterations > 0 and seconds >= 0 else None


def _iterations_between(metrics: list[dict]) -> int:
    if len(metrics) > 1:
        return max(1, metrics[-1]["iteration"] - metrics[-2]["iteration"])
    return max(1, metrics[-1]["iteration"])


# --- a sweep ------------------------------------------------------------------------------------

def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any((path / f).exists() for f in RUN_FILES)


def sweep_status(folder: Path, now: float | None = None) -> list[RunStatus]:
    """Every run of the sweep in ``folder``: the planned ones in order, then any others on disk."""
    if _is_run_folder(folder) and not (folder / SWEEP_RECORD).exists():
        return [run_status(folder, now=now)]
    record = _read_json(folder / SWEEP_RECORD)
    jobs = record.get("runs") if isinstance(record, dict) else None
    planned = [job for job in jobs if isinstance(job, dict) and isinstance(job.get("run"), str)] \
        if isinstance(jobs, list) else []
    planned_names = {job["run"] for job in planned}
    on_disk = sorted(p.name for p in folder.iterdir() if _is_run_folder(p) and p.name not in planned_names)
    return ([run_status(folder / job["run"], job, now) for job in planned]
            + [run_status(folder / name, None, now) for name in on_disk])


# --- the table ----------------------------------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    """'42s', '2m 30s', '3h 05m' (blank for None): the one format of every table and message."""
    if seconds is None:
        return ""
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def percent(value) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def aligned_table(rows: list[tuple]) -> list[str]:
    """Rows of cells as lines of left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def status_table(folder: Path, runs: list[RunStatus]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
    header = f"{folder}: {len(runs)} run(s): " + ", ".join(f"{n} {state}" for state, n in counts.items())
    rows = [("run", "state", "iterations", "train err", "test err", "time", "ETA", "where")]
    for run in runs:
        done = "" if run.iterations_done is None else str(run.iterations_done)
        total = "" if run.iterations is None else str(run.iterations)
        rows.append((run.name, run.state, f"{done}/{total}" if done or total else "",
                     percent(run.train_error), percent(run.test_error),
                     format_duration(run.elapsed_s) if run.elapsed_s else "",
                     format_duration(run.eta_s) if run.eta_s is not None else "", run.where))
    lines = aligned_table(rows)
    problems = [f"  {run.name}: {run.error.strip().splitlines()[0]}" for run in runs
                if run.error and run.state in ("failed", "diverged", "stalled", "dead", "damaged")]
    failed_loggers = [f"  {run.name}: logger {name} failed: {error}" for run in runs
                      for name, error in run.logger_errors.items()]
    return "\n".join([header, *lines, *(["", "errors:", *problems] if problems else []),
                      *(["", "loggers (the runs trained on; these loggers lack some of their metrics):", *failed_loggers]
                        if failed_loggers else [])])


def status_command(args: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE, end="")
        return 0
    folder = parse_folder_args("status", USAGE.splitlines()[0], args).folder
    runs = sweep_status(folder)
    if not runs:
        raise UsageError(f"{folder} holds no runs (no {SWEEP_RECORD} and no run folders)")
    print(status_table(folder, runs))
    sys.stdout.flush()
    return 0
