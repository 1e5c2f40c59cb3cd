"""The runs of a sweep on this machine, each in a process of its own (one run = one process).

The sweeper hands its planned jobs here unless Hydra's submitit launcher submits them
(``launcher=slurm`` or ``submitit_local``). Each job trains in a process of its own
(``python -m resexp.slots``, the end of this module), which composes the job's config from
its overrides and calls ``resexp.sweep.run_job``: the run folders, checks and
skip/resume/retry rules are those of every sweep. It writes run_job's record (the run's
result and what this call did with it) to a file the scheduler reads. A job process that
ends without that record (killed, crashed) is a failed run.

Without ``gpus`` there is one slot: the runs train one after another, their output in the
terminal. With ``resexp sweep depth=20,56 gpus=0,1 runs_per_gpu=2`` there are
``len(gpus) x runs_per_gpu`` slots, each job started in a free one with
``CUDA_VISIBLE_DEVICES`` set to that slot's GPU (the run sees its GPU alone, as cuda:0) and
its output in ``<run>/slot.log``.

Ctrl-C or SIGTERM: each running job gets SIGINT (it finishes its step and saves a
checkpoint), no other job starts, and once they have ended the sweep stops as interrupted.
A second signal is passed on as well: the jobs stop at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .files import RESULT, atomic_write_json, read_json

SLOT_OPTIONS = ("gpus", "runs_per_gpu")  # words of `resexp sweep` about how its runs are executed
LOG = "slot.log"
POLL_S = 0.2  # how often the scheduler looks for ended jobs and signals to pass on


# --- the command-line words ---------------------------------------------------------------------

def slot_overrides(overrides: list[str]) -> list[str]:
    """``gpus=0,1`` and ``runs_per_gpu=2`` (the words of the README's commands) as the config keys
    they set, ``sweep.gpus=[0,1]`` and ``sweep.runs_per_gpu=2``.

    Typed as it is, ``gpus=0,1`` would read as a Hydra sweep over two values. Hydra parses the
    result like any override, and ``config.problems`` checks it.
    """
    rewritten = []
    for override in overrides:
        key, equals, value = override.partition("=")
        value = value.strip()
        if key == "gpus" and equals:
            listed = value in ("all", "null") or value.startswith("[")
            rewritten.append(f"sweep.gpus={value}" if listed else f"sweep.gpus=[{value}]")
        elif key == "runs_per_gpu" and equals:
            rewritten.append(f"sweep.runs_per_gpu={value}")
        else:
            rewritten.append(override)
    return rewritten


def gpu_numbers(gpus) -> list[int]:
    """The checked ``sweep.gpus`` as GPU numbers on this machine: ``all`` is every visible GPU."""
    numbers = visible_gpus() if gpus == "all" else [int(gpu) for gpu in gpus]
    check_gpus_exist(numbers)
    return numbers


def _is_number_word(word: str) -> bool:
    return word.isascii() and word.isdigit()


def visible_gpus() -> list[int]:
    """The GPUs this process sees, by the numbers CUDA_VISIBLE_DEVICES takes."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError("gpus=all, but no CUDA GPU is visible here; leave gpus out and the sweep's runs "
                         "train one after another")
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(count))
    words = [word.strip() for word in listed.split(",")][:count]
    if not all(_is_number_word(word) for word in words):
        raise UsageError(f"gpus=all, but CUDA_VISIBLE_DEVICES={listed} does not name its GPUs by number; "
                         "give them as gpus=0,1,...")
    return [int(word) for word in words]


def check_gpus_exist(gpus: list[int]) -> None:
    """On a machine whose GPUs are all visible, a number past the last one is a typo.

    Without the check, that slot's runs would quietly train on the CPU (device=auto finds no
    GPU). A machine without GPUs is allowed: its runs share the CPU cores.
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return  # the numbers name the machine's GPUs, which cannot be counted from behind this mask
    import torch

    count = torch.cuda.device_count()
    missing = [gpu for gpu in gpus if gpu >= count]
    if count and missing:
        raise UsageError(f"gpus names GPU {missing[0]}, but this machine has {count} GPU(s): 0 to {count - 1}")


# --- the scheduler ------------------------------------------------------------------------------

@dataclass
class Job:
    """A sweep job running in a slot: one run in a process of its own."""
    number: int            # position in the sweep, from 0
    run: str               # the run folder's name
    run_dir: Path
    overrides: list[str]
    gpu: int | None        # None: the machine as it is (no GPU of its own)
    process: subprocess.Popen
    record_file: Path      # where the job process writes run_job's record
    stops_sent: int = 0    # SIGINTs passed on to it

    @property
    def log(self) -> Path | None:
        """Where its output goes: slot.log in a GPU slot; None for the terminal."""
        return None if self.gpu is None else self.run_dir / LOG


def run_in_slots(planned: list[dict], sweep_dir: Path, gpus: list[int] | None = None, runs_per_gpu: int = 1,
                 extra_overrides: list[str] = ()) -> list:
    """Train the planned jobs one after another, or with ``gpus`` up to ``len(gpus) x runs_per_gpu`` at once.

    Returns one Hydra ``JobReturn`` per job, in the planned order, holding run_job's record, as
    Hydra's launchers report a job (``resexp.sweep.finished_record`` reads them). After SIGINT
    or SIGTERM, raises RunInterrupted once every running job has ended.
    """
    from .signals import RunInterrupted

    # One entry per free slot; this order puts the first runs on different GPUs.
    free_gpus = [None] if gpus is None else [gpu for _ in range(runs_per_gpu) for gpu in gpus]
    threads = threads_per_job(len(free_gpus))
    waiting = list(range(len(planned)))
    running: list[Job] = []
    results: list = [None] * len(planned)
    # The jobs' specs and records: under the sweep folder (hidden), not in /tmp, where a scheduler
    # killed outright would leave them behind.
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".slots-", dir=sweep_dir) as scratch, StopRequests() as stops:
        try:
            while running or (waiting and not stops.count):
                while waiting and free_gpus and not stops.count:
                    number = waiting.pop(0)
                    running.append(start_job(number, len(planned), planned[number], Path(sweep_dir),
                                             free_gpus.pop(0), threads, Path(scratch), list(extra_overrides)))
                time.sleep(POLL_S)
                pass_on_stops(running, stops.count)
                for job in [job for job in running if job.process.poll() is not None]:
                    running.remove(job)
                    free_gpus.append(job.gpu)
                    results[job.number] = job_return_of(job, interrupted=bool(stops.count))
        finally:
            stop_now(running)  # only left running when the scheduler itself failed
    if stops.count:
        raise RunInterrupted(stops.first)
    return results


def threads_per_job(slots: int) -> int:
    """CPU threads for each job: this process's cores shared out, never more than OMP_NUM_THREADS asks."""
    from .machine import usable_cores

    threads = max(1, usable_cores() // slots)
    asked = os.environ.get("OMP_NUM_THREADS", "").strip()
    if _is_number_word(asked) and int(asked) > 0:
        threads = min(threads, int(asked))
    return threads


def job_environment(gpu: int | None, threads: int) -> dict[str, str]:
    """A job's environment: its GPU alone (if it has one), and its share of the CPU cores for every
    thread pool, Inductor's compile workers included (by default it starts one per core, in every job)."""
    gpu_alone = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": str(gpu)}
    return {**os.environ, **gpu_alone, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TORCHINDUCTOR_COMPILE_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def start_job(number: int, total: int, job: dict, sweep_dir: Path, gpu: int | None, threads: int,
              scratch: Path, extra_overrides: list[str]) -> Job:
    from .sweep import job_header

    run_dir = sweep_dir / job["run"]
    run_dir.mkdir(parents=True, exist_ok=True)
    record_file = scratch / f"job-{number}.json"
    overrides = [*job["overrides"], *extra_overrides]
    spec_file = scratch / f"job-{number}-spec.json"
    atomic_write_json(spec_file, {"run_dir": str(run_dir), "overrides": overrides})
    command = [sys.executable, "-m", "resexp.slots", "--record", str(record_file),
               "--scheduler-pid", str(os.getpid()), str(spec_file)]
    # A session of its own: a Ctrl-C in the terminal reaches the scheduler alone, which passes it on once.
    start = dict(stdin=subprocess.DEVNULL, env=job_environment(gpu, threads), start_new_session=True)
    if gpu is None:  # one run at a time: its progress bar and messages in the terminal
        print(job_header(sweep_dir, job["run"], number, total), file=sys.stderr, flush=True)
        process = subprocess.Popen(command, **start)
    else:
        log_path = run_dir / LOG
        print(f"[sweep {number + 1}/{total}] {job['run']} on GPU {gpu} (output: {log_path})",
              file=sys.stderr, flush=True)
        # Appended to, so that the output of an earlier attempt (a failure, say) stays readable.
        with open(log_path, "a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {job['run']}: CUDA_VISIBLE_DEVICES={gpu}, "
                      f"{threads} CPU thread(s)\n")
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **start)
    return Job(number, job["run"], run_dir, overrides, gpu, process, record_file)


def job_return_of(job: Job, interrupted: bool):
    """The ended job's Hydra JobReturn, holding run_job's record (or a failed run's)."""
    from .sweep import job_return

    record = read_json_object(job.record_file)
    if record is None and not interrupted:
        record = ended_without_record(job)
    if record is not None:
        if record.get("outcome") == "failed":
            print(f"{job.run}: failed: {record.get('error')}", file=sys.stderr, flush=True)
        else:
            print(f"{job.run}: {record.get('status')} ({record.get('outcome')})", file=sys.stderr, flush=True)
    return job_return(job.overrides, job.run_dir, record)


def read_json_object(path: Path) -> dict | None:
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def ended_without_record(job: Job) -> dict:
    """A failed run's record for a job process that ended without reporting (killed, crashed)."""
    code = job.process.returncode
    how = f"signal {signal_name(-code)}" if code < 0 else f"exit code {code}"
    message = f"its process ended with {how} before reporting a result; see {job.log or 'its output above'}"
    result = read_json_object(job.run_dir / RESULT) or {}
    record = {**result, "run_name": job.run, "error": message}
    if result.get("status") == "running":  # it died while training: say so where resexp status looks
        record["status"] = "failed"
        atomic_write_json(job.run_dir / RESULT, record)
    record.setdefault("status", "failed")
    return {**record, "outcome": "failed"}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class StopRequests:
    """Count SIGINT/SIGTERM instead of stopping: the scheduler passes each on to its jobs."""

    def __init__(self):
        self.count = 0
        self.first: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.count += 1
        self.first = self.first or signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def pass_on_stops(running: list[Job], count: int) -> None:
    """Send each running job as many SIGINTs as the scheduler got (a job started since gets them too)."""
    for job in running:
        if job.stops_sent < count and job.process.poll() is None:
            print(f"{job.run}: saving a checkpoint and stopping" if count == 1 else f"{job.run}: stopping now",
                  file=sys.stderr, flush=True)
            while job.stops_sent < count:
                job.process.send_signal(signal.SIGINT)
                job.stops_sent += 1


def stop_now(running: list[Job]) -> None:
    """Ask the jobs still running to save a checkpoint and stop (SIGTERM); wait a while, then kill them."""
    for job in running:
        job.process.terminate()
    for job in running:
        try:
            job.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()


# --- one job, in its own process ----------------------------------------------------------------

def stop_with_scheduler(scheduler_pid: int) -> None:
    """Have Linux send this process SIGTERM when the scheduler dies (kill -9, a closed terminal).

    The run then saves a checkpoint and stops, instead of training on unwatched while the
    same sweep, started again, trains it a second time.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != scheduler_pid:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resexp.slots",
                                     description="Train one job of a sweep (started by resexp sweep gpus=...).")
    parser.add_argument("--record", type=Path, required=True, help="where to write the run's record (JSON)")
    parser.add_argument("--scheduler-pid", type=int, help="stop, saving a checkpoint, when this process ends")
    parser.add_argument("spec", type=Path, help="JSON object of the run to train: run_dir, overrides")
    args = parser.parse_args(argv)
    if args.scheduler_pid:
        stop_with_scheduler(args.scheduler_pid)

    from .config import compose
    from .signals import RunInterrupted
    from .sweep import run_job

    job = read_json(args.spec)
    run_dir = Path(job["run_dir"])
    try:
        record = run_job(compose(job["overrides"]), run_dir)
    except UsageError as error:  # the sweep checked the config before it started: rare
        print(f"resexp: error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as interrupt:
        print(f"{run_dir.name}: interrupted at a checkpoint", file=sys.stderr)
        return interrupt.exit_code
    atomic_write_json(args.record, record)
    return 1 if record.get("outcome") == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
