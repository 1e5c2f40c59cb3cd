"""Sweeps: a grid of runs, each in its own folder, then the figures.

``resexp sweep depth=20,56,110`` is a Hydra multirun. Its sweeper (``ResexpSweeper``,
in ``hydra_plugins/resexp_sweeper``) expands the grid with Hydra's override grammar,
adds ``arch=plain,resnet`` unless the command says otherwise, leaves out the runs a
preset excludes, checks every job's config (and what it needs of this machine) before any
trains, names each run folder from its config values, finds the finished runs, and hands
the jobs on: to ``resexp.slots`` on this machine (the default), or to Hydra's submitit
launcher. Each job is one run in a process of its own, which records its outcome; a failing
run never stops the others.
The sweep command then draws the figures from the folders on disk.

Running the same command again resumes the sweep: finished runs are skipped,
interrupted ones continue from their checkpoint and failed ones are tried again.
"""

from __future__ import annotations

import itertools
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from . import config as config_module
from .errors import UsageError
from .files import RESULT, SWEEP_RECORD, atomic_write_json, read_json
from .status import aligned_table, format_duration, percent


# --- planning -----------------------------------------------------------------------------------

def parse_overrides(arguments: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(arguments))
    except HydraException as error:
        raise UsageError(config_module.hydra_error_line(error)) from error


def literal_override(key: str, value: str) -> str:
    """``key='value'``: Hydra takes a quoted value as it is, commas (``milestones_2,4``) and all.
    The folder names made here come from ``config._safe``, which leaves no quote in them."""
    return f"{key}='{value}'"


def check_no_duplicates(overrides: list) -> None:
    """Hydra silently keeps the last of ``depth=20 depth=56``; we refuse it."""
    seen: dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        if key in seen:
            raise UsageError(f"{key} is given twice ({seen[key]} and {override.input_line}); give it once "
                             f"(resexp sweep takes several values as one list: {key}=V1,V2)")
        seen[key] = override.input_line


def check_one_setting(overrides: list, command: str) -> None:
    """``resexp train`` and ``resexp bench`` take one value of each key: Hydra would keep the last of
    ``depth=20 depth=56`` without a word, and read ``depth=20,56`` as a sweep."""
    check_no_duplicates(overrides)
    for override in overrides:
        if override.is_sweep_override():
            raise UsageError(f"{override.input_line} gives several values; resexp {command} runs one setting, "
                             f"resexp sweep runs one per value")


def sweep_name(overrides: list) -> str:
    """A readable folder name made from the (parsed) overrides: ``depth=20,56 schedule=quick`` ->
    ``depth20-56_quick``. Keys are sorted so that the order the overrides were typed in does not matter.
    """
    parts = []
    for override in sorted(overrides, key=lambda o: o.get_key_element()):
        key = override.get_key_element().lstrip("+~")
        # Where and how a sweep runs does not change what it trains, nor its folder.
        if key.split(".")[0] in ("hydra", "launcher", "logger", "name", "out", "progress", "resume", "device",
                                 "compile", "cuda_graph", "sweep"):
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() \
            else [override.get_value_element_as_str()]
        if key.endswith((".root", "_dir", "_path")) or (key == "arch" and sorted(values) == ["plain", "resnet"]):
            continue  # paths make unreadable names; plain+resnet is what a sweep does anyway
        if key in ("experiment", "data", "schedule"):  # group choices read well alone
            parts.append("-".join(values))
        else:
            parts.append(key.rsplit(".", 1)[-1] + "-".join(values))
    return config_module._safe("_".join(parts)) if parts else "sweep"


def expand_grid(default_params: dict, arguments: list[str], exclude: list[dict]) -> tuple[list[list[str]], list[str]]:
    """The jobs (one override list each) and the keys that vary between them.

    ``default_params`` (``hydra.sweeper.params``: plain and resnet by default, or a preset's
    grid) apply unless the command line sets the same key. A job matching every key/value
    of an ``exclude`` entry is left out.
    """
    given = parse_overrides(arguments)
    check_no_duplicates(given)
    given_keys = {o.get_key_element() for o in given}
    defaults = parse_overrides([f"{key}={value}" for key, value in default_params.items() if key not in given_keys])
    axes = []
    for override in defaults + given:
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise UsageError(f"{override.input_line}: only lists (a,b,c), range() and choice() can be swept")
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        if not values:
            raise UsageError(f"{override.input_line} gives no values, so the sweep has no runs; "
                             "give at least one value")
        axes.append((key, values))

    jobs = []
    for combination in itertools.product(*[[(key, v) for v in values] for key, values in axes]):
        chosen = dict(combination)
        if any(all(str(chosen.get(k)) == str(v) for k, v in rule.items()) for rule in exclude):
            continue
        jobs.append([f"{key}={value}" for key, value in combination])
    swept = sorted({key.lstrip("+~") for key, values in axes
                    if len({dict(item.split("=", 1) for item in job)[key] for job in jobs}) > 1})
    if "logger" in swept:  # each run logs to every logger selected: one run, not one per logger
        raise UsageError("logger=a,b would train every run once per logger; select several loggers as a list: "
                         "logger=[tensorboard,mlflow]")
    if not jobs:
        raise UsageError("the sweep has no runs left after its exclusions "
                         f"({'; '.join(str(rule) for rule in exclude)}); sweep more values")
    return jobs, swept


def plan_jobs(jobs: list[list[str]], swept: list[str], compose: Callable[[list[str]], DictConfig],
              sweep_dir: Path | None = None):
    """Check every job's config and name its run folder; one error lists every bad value.
    Each planned job: its run folder name, overrides, cost (what is left to train), composed config
    and, for a run with nothing left to train, its result (``train.finished_result``).

    With ``sweep_dir``, a run folder that already holds a run of another config (or one that another
    process is training) is refused here too, before anything is written into it.
    """
    from .estimate import run_cost
    from .step import check_machine
    from .train import check_resumable, finished_result

    found: list[str] = []
    planned = []
    extra = [f"sweep.keys=[{','.join(swept)}]", f"sweep.size={len(jobs)}"]
    for job in jobs:
        overrides = job + extra
        try:
            cfg = compose(overrides)
        except UsageError as error:
            found.append(str(error))
            continue
        except Exception as error:  # Hydra's composition errors
            found.append(config_module.hydra_error_line(error))
            continue
        problems = config_module.problems(cfg)
        if not problems:
            try:
                check_machine(cfg)
            except UsageError as error:
                problems = [str(error)]
        found += problems
        if problems:
            continue
        run = config_module.run_name(cfg)
        run_dir = sweep_dir / run if sweep_dir is not None else None
        if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
            found.append(f"{run_dir} is a file where the run's folder goes; move it and run the same command")
            continue
        finished = None
        if run_dir is not None and run_dir.is_dir():
            try:
                finished = finished_result(cfg, run_dir, check_resumable(cfg, run_dir))
            except UsageError as error:
                found.append(str(error))
                continue
        # What is left to train, for the cost line before the sweep and the ETA during it. The
        # composed config and the finished run's result go along for the sweeper (not into sweep.json).
        # The folder's name goes to the job as it is: nothing names a run folder twice.
        planned.append({"run": run, "overrides": [*overrides, literal_override("hydra.sweep.subdir", run)],
                        "cost": 0.0 if finished else run_cost(cfg, run_dir), "config": cfg, "finished": finished})
    if found:
        unique = list(dict.fromkeys(found))
        raise UsageError(f"the sweep has {len(unique)} problem(s), nothing was run: " + "; ".join(unique))
    names = [job["run"] for job in planned]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UsageError(f"several runs would share the folder {clashes[0]}; sweep fewer keys or give them distinct values")
    return planned


def write_sweep_record(sweep_dir: Path, record: dict) -> None:
    atomic_write_json(sweep_dir / SWEEP_RECORD, record)


def read_sweep_record(sweep_dir: Path) -> dict | None:
    path = Path(sweep_dir) / SWEEP_RECORD
    try:
        return read_json(path) if path.exists() else None
    except (OSError, ValueError):
        return None


# --- one job ------------------------------------------------------------------------------------

def run_job(cfg: DictConfig, run_dir, job_number: int | None = None) -> dict:
    """Train one run of a sweep; record, rather than raise, anything that goes wrong with it.

    Anything that goes wrong is recorded in the run's result.json (and error.txt for a crash),
    so that one failing job never stops the sweep.
    """
    from .train import RunInUse, train

    run_dir = Path(run_dir)
    total = cfg.sweep.size
    if job_number is not None and total:
        print(job_header(run_dir.parent, run_dir.name, job_number, total), file=sys.stderr, flush=True)
    try:
        return train(cfg, run_dir)
    except RunInUse as error:  # its records belong to the process training it: leave them alone
        print(f"{run_dir.name}: not trained: {error}", file=sys.stderr, flush=True)
        return {"run_name": run_dir.name, "status": "in use", "error": str(error), "outcome": "failed"}
    except UsageError as error:
        message = str(error)
    except Exception as error:  # any other crash: keep the traceback beside the run, go on with the sweep
        message = f"{type(error).__name__}: {error}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
    print(f"{run_dir.name}: failed: {message}", file=sys.stderr, flush=True)
    try:
        previous = read_json(run_dir / RESULT)
    except (OSError, ValueError):
        previous = {}
    record = {**previous, "status": "failed", "run_name": run_dir.name, "arch": cfg.arch, "depth": cfg.depth,
              "seed": cfg.seed, "error": message}
    atomic_write_json(run_dir / RESULT, record)
    return {**record, "outcome": "failed"}


def job_return(overrides: list[str], run_dir: Path, record: dict | None):
    """A job's outcome as Hydra's local launcher reports it (``finished_record`` reads these)."""
    from hydra.core.utils import JobReturn, JobStatus

    return JobReturn(overrides=overrides, working_dir=str(run_dir), task_name="resexp",
                     status=JobStatus.COMPLETED, _return_value=record)


def job_header(sweep_dir: Path, run: str, job_number: int, total: int) -> str:
    """The line a sweep prints as one of its runs starts: its place in the sweep, and the ETA of the rest."""
    return f"[sweep {job_number + 1}/{total}] {run}{sweep_eta(sweep_dir, job_number, total)}"


def sweep_eta(sweep_dir: Path, job_number: int, total: int) -> str:
    """The ETA of the runs left, from the finished runs' wall times, each run weighed by its cost."""
    from .estimate import eta_of_sweep

    record = read_sweep_record(sweep_dir) or {}
    runs = record.get("runs") if isinstance(record.get("runs"), list) else []
    seconds = eta_of_sweep(sweep_dir, [job for job in runs if isinstance(job, dict) and "run" in job])
    return "" if seconds is None else f" (ETA {format_duration(seconds)} for the remaining runs)"


# --- after the sweep ----------------------------------------------------------------------------

def outcome_table(record: dict) -> tuple[str, bool]:
    """The end-of-sweep table and whether any run failed."""
    rows = [("run", "status", "train err", "test err", "iterations", "time")]
    any_failed = False
    for job in record.get("runs", []):
        outcome = job.get("outcome") or "not run"
        result = job.get("result") or {}
        status = result.get("status", outcome)
        shown = {"skipped": "skipped", "resumed": "resumed", "failed": "failed"}.get(outcome, status)
        if status in ("diverged", "interrupted"):
            shown = status
        any_failed |= status in ("failed",) or outcome in ("failed", "not run")
        rows.append((job["run"], shown, percent(result.get("final_train_error")),
                     percent(result.get("final_test_error")),
                     # A run that failed before it started has no numbers: an empty cell, not "/".
                     f"{result.get('iterations_done') or 0}/{result['iterations']}" if result.get("iterations") else "",
                     format_duration(result["wall_time_s"]) if result.get("wall_time_s") else ""))
    return "\n".join(aligned_table(rows)), any_failed


def finished_record(sweep_dir: Path, record: dict, results: list) -> dict:
    """The sweep record with each run's outcome and result filled in."""
    runs = []
    for job, job_return in zip(record["runs"], results):
        value = getattr(job_return, "_return_value", None)
        outcome = value.get("outcome") if isinstance(value, dict) else "failed"
        result = value if isinstance(value, dict) else None
        runs.append({**job, "outcome": outcome,
                     "result": {k: v for k, v in (result or {}).items() if k != "outcome"} or None})
    return {**record, "runs": runs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
