"""resexp's Hydra sweeper: the grid of a sweep with resexp's rules (see resexp.sweep).

Hydra finds sweepers only under the ``hydra_plugins`` package; the logic lives in
``resexp.sweep``, imported when a sweep starts so that Hydra's plugin scan stays cheap.

The sweeper plans the jobs (``resexp.sweep.plan_jobs``: every config composed and checked,
each run folder named, finished runs found) and hands them on, one run to a process:

- ``launcher=local`` (the default): ``resexp.slots`` trains them on this machine, one after
  another, or with ``gpus=...`` (``sweep.gpus``) several at once, one GPU each.
- submitit (``launcher=slurm`` or ``launcher=submitit_local``): the jobs are submitted as one
  array with the launcher's settings and the launcher as each job's callable, as the launcher's
  own ``launch`` does (``submit_to_submitit``). Two things differ, which its ``launch`` cannot
  do: finished runs are not submitted, and ``launcher.wait=false`` returns once the jobs are
  queued. A job that ends without a result (cancelled, killed, out of requeues) is recorded as
  a failed run instead of stopping the collection of the others' results.
"""

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf, open_dict


class ResexpSweeper(Sweeper):
    def __init__(self, params=None, exclude=None) -> None:
        self.params = dict(params or {})
        self.exclude = [dict(rule) for rule in (exclude or [])]

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from resexp import sweep as resexp_sweep
        from resexp.errors import UsageError, exit_with
        from resexp.files import READ_ONLY_ERRNOS, SWEEP_RECORD, write_error_reason

        from resexp import slots
        from resexp.data import fetch_cifar10
        from resexp.trackers import prepare_sweep

        # Every check before anything is written or trains: each job's config and what it needs of this
        # machine (plan_jobs), the GPUs of gpus=..., and the data set, fetched once for all runs.
        sweep_dir = Path(self.config.hydra.sweep.dir)
        try:
            jobs, swept = resexp_sweep.expand_grid(self.params, arguments, self.exclude)
            planned = resexp_sweep.plan_jobs(jobs, swept, self.job_config, sweep_dir)
            gpus = None if self.config.sweep.gpus is None else slots.gpu_numbers(self.config.sweep.gpus)
            # Composed once, in plan_jobs, with what is finished; sweep.json keeps the rest.
            configs = [job.pop("config") for job in planned]
            for data in {(cfg.data.name, cfg.data.root, bool(cfg.data.download)) for cfg in configs}:
                fetch_cifar10(*data)
        except UsageError as error:
            exit_with(error)
        finished = {number: result for number, job in enumerate(planned) if (result := job.pop("finished"))}
        cluster = submitit_cluster(self.config)

        print(f"sweep folder: {sweep_dir} ({len(planned)} runs)", file=sys.stderr, flush=True)
        if cluster is None:  # the runs train here: say what they will cost
            from resexp.estimate import confirmed_to_start, cost_estimate
            from resexp.step import warm_compile_cache_apart

            left = [number for number, job in enumerate(planned) if job["cost"] > 0]
            try:
                estimate = cost_estimate([configs[number] for number in left],
                                         [planned[number]["cost"] for number in left], parallel=len(gpus) if gpus else 1)
            except UsageError as error:  # the probe's step ran out of GPU memory, say
                exit_with(error)
            if estimate.line:
                print(estimate.line, file=sys.stderr, flush=True)
            if not confirmed_to_start(estimate):
                print("resexp: not started; nothing was written (resexp sweep --yes starts without asking)",
                      file=sys.stderr)
                sys.exit(1)
            if gpus and len(left) > 1:  # runs side by side would each compile the same blocks cold
                warm_compile_cache_apart([configs[number] for number in left])
        previous_record = resexp_sweep.read_sweep_record(sweep_dir) if sweep_dir.exists() else None
        new_folder = not sweep_dir.exists()
        record = {"name": sweep_dir.name, "arguments": list(arguments), "swept": swept, "runs": planned}
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:  # as Hydra's launchers honour hydra.sweep.mode
                os.chmod(sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            resexp_sweep.write_sweep_record(sweep_dir, record)
        except OSError as error:
            if len(finished) == len(planned) and error.errno in READ_ONLY_ERRNOS:
                # Nothing to train: a finished sweep in a read-only folder is shown as it is.
                print(f"all {len(planned)} runs are finished; nothing to train, and nothing recorded: "
                      f"{write_error_reason(error, sweep_dir)}", file=sys.stderr, flush=True)
                return [[returned({**finished[n], "outcome": "skipped"}) for n in range(len(planned))]]
            exit_with(UsageError(f"cannot record the sweep: {write_error_reason(error, sweep_dir)}"))
        job_overrides = [job["overrides"] for job in planned]
        prepare_sweep(configs, sweep_dir)  # logger=mlflow: the sweep's experiment, before its runs start

        if cluster is not None:
            # A finished run would only cost a queue wait (and a GPU) to be skipped in its job.
            to_submit = [number for number in range(len(planned)) if number not in finished]
            submitted = {}
            if to_submit:
                # submitit prints sbatch's complaint before raising it: keep it for the one-line error.
                complaint = io.StringIO()
                try:
                    with contextlib.redirect_stderr(complaint):
                        # One job array (launcher.array_parallelism caps how many run at once).
                        jobs = submit_to_submitit(self.launcher, cluster, [job_overrides[n] for n in to_submit])
                except Exception as error:  # sbatch refused the jobs: nothing was submitted
                    forget_sweep(sweep_dir, new_folder, previous_record)
                    exit_with(UsageError(f"the cluster refused the jobs: {refusal_line(error)}"))
                sys.stderr.write(complaint.getvalue())
                submitted = dict(zip(to_submit, jobs))
            else:
                print(f"all {len(planned)} runs are finished; no job submitted", file=sys.stderr, flush=True)
            record["runs"] = [{**job, "job_id": str(submitted[n].job_id)} if n in submitted else job
                              for n, job in enumerate(planned)]
            if submitted and not self.config.launcher.wait:
                record = {**record, "runs": [{**job, "outcome": "submitted"} if n in submitted
                                             else {**job, "outcome": "skipped", "result": finished[n]}
                                             for n, job in enumerate(record["runs"])]}
                resexp_sweep.write_sweep_record(sweep_dir, record)
                print_submitted(sweep_dir, [record["runs"][n] for n in submitted], cluster)
                return [[]]
            resexp_sweep.write_sweep_record(sweep_dir, record)
            try:
                ended = wait_for_jobs(list(submitted.values()), cluster)
            except KeyboardInterrupt:
                if cluster == "slurm":  # local jobs got the Ctrl-C too; cluster jobs did not
                    first = next(iter(submitted.values()))
                    print(f"stopped waiting; the SLURM jobs keep running (scancel {first.job_id.split('_')[0]} "
                          f"stops them); resexp status {sweep_dir} shows them", file=sys.stderr)
                raise
            results = [job_result(submitted[n], sweep_dir / job["run"], ended[submitted[n].job_id])
                       if n in submitted else returned({**finished[n], "outcome": "skipped"})
                       for n, job in enumerate(planned)]
        else:
            # One run = one process, on this machine: one after another, or side by side in GPU slots.
            results = slots.run_in_slots(planned, sweep_dir, gpus, self.config.sweep.runs_per_gpu,
                                         extra_overrides=config_dirs(self.hydra_context.config_loader))
        try:
            resexp_sweep.write_sweep_record(sweep_dir, resexp_sweep.finished_record(sweep_dir, record, results))
        except OSError as error:  # the runs' own records are whole: the same command records the sweep again
            exit_with(UsageError(f"the runs ended, but the sweep's record {sweep_dir / SWEEP_RECORD} could not be "
                                 f"written: {write_error_reason(error, sweep_dir)}"))
        return [results]

    def job_config(self, overrides: List[str]):
        """A job's config as Hydra's launcher hands it to the job: composed, without the hydra node."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg


def submitit_cluster(config) -> str | None:
    """submitit's name of the cluster the sweep's jobs go to (``slurm`` or ``local``); None for
    ``launcher=local``, whose runs train here (resexp.slots)."""
    return {"slurm": "slurm", "submitit_local": "local"}.get(config.launcher.name)


def config_dirs(loader) -> List[str]:
    """``--config-dir`` folders, as an override for job processes that compose their config themselves."""
    folders = [source.full_path() for source in loader.get_sources() if source.provider == "command-line"]
    return [f"hydra.searchpath=[{','.join(folders)}]"] if folders else []


# --- Hydra's submitit launcher ------------------------------------------------------------------

def submit_to_submitit(launcher, cluster: str, job_overrides: List[List[str]]) -> list:
    """Submit every job as one array, as ``BaseSubmititLauncher.launch`` does, without waiting.

    The launcher itself is each job's callable: in the job it composes the config and runs
    the task, and its ``checkpoint`` lets submitit requeue the job (same arguments) when it
    is preempted or reaches its time limit; the run then resumes from its own checkpoint.
    """
    import submitit
    from hydra.core.singleton import Singleton
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(launcher.params)
    if not params.get("gpus_per_node"):
        # submitit would still write --gpus-per-node=0, which a cluster without GPUs refuses.
        params.pop("gpus_per_node", None)
    executor_args = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        executor_args[f"{cluster}_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster=cluster, **executor_args)
    # Keys shared by every cluster go as they are; the others get the cluster's prefix.
    shared_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in shared_keys else f"{cluster}_{key}": value
                                  for key, value in params.items()})
    job_arguments = [(list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state())
                     for number, overrides in enumerate(job_overrides)]
    return executor.map_array(launcher, *zip(*job_arguments))


# How often a waiting sweep looks at its jobs, and how long SLURM must have stopped listing a
# job without a result before it counts as ended (a requeued job is listed again within seconds).
POLL_S = 5
GONE_AFTER_S = 20


def wait_for_jobs(jobs: list, cluster: str) -> dict:
    """Wait until every job has ended; job id -> whether it ended in a way submitit can tell.

    submitit asks ``sacct`` about a running job only every 10 minutes, and without SLURM's
    accounting never learns that a job died without a result: this asks for every job's
    state each POLL_S, and takes a job that squeue no longer lists for ended (``False``).
    """
    ended: dict = {}
    gone_since: dict = {}
    while len(ended) < len(jobs):
        if cluster == "slurm":
            jobs[0].watcher.update()  # one sacct call for all of them
        listed = listed_by_squeue([job.job_id for job in jobs]) if cluster == "slurm" else None
        for job in jobs:
            if job.job_id in ended:
                continue
            if job.done():
                ended[job.job_id] = True
            elif listed is not None and job.job_id not in listed:
                gone_since.setdefault(job.job_id, time.monotonic())
                if time.monotonic() - gone_since[job.job_id] >= GONE_AFTER_S:
                    ended[job.job_id] = False
            else:
                gone_since.pop(job.job_id, None)
        if len(ended) < len(jobs):
            time.sleep(POLL_S)
    return ended


def listed_by_squeue(job_ids: list) -> set | None:
    """The jobs (``ARRAY_TASK`` ids) that squeue still lists; None when squeue cannot say."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        ran = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if ran.returncode != 0:
        # Jobs SLURM has already forgotten make squeue fail with "Invalid job id specified".
        return set() if "invalid job id" in ran.stderr.lower() else None
    return set(ran.stdout.split())


def returned(record: dict):
    """A job's outcome as Hydra's launchers report it (``finished_record`` reads these)."""
    from hydra.core.utils import JobReturn, JobStatus

    return JobReturn(status=JobStatus.COMPLETED, _return_value=record)


def job_result(submitted_job, run_dir: Path, ended: bool = True):
    """The job's Hydra JobReturn; for a job that ended without one, a failed run's record."""
    from resexp.files import RESULT, read_json

    if ended:
        try:
            return submitted_job.results()[0]
        except Exception as error:  # submitit's UncompletedJobError / FailedJobError: no result came back
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    else:
        first_line = "SLURM no longer lists it, and its accounting does not tell how it ended"
    message = f"job {submitted_job.job_id} ended without a result ({first_line}); log: {submitted_job.paths.stderr}"
    try:
        run_record = read_json(run_dir / RESULT)
    except (OSError, ValueError):
        run_record = {"status": "failed", "run_name": run_dir.name}
    return returned({**run_record, "error": message, "outcome": "failed"})


def refusal_line(error: Exception) -> str:
    """sbatch's own reason for refusing a submission, from submitit's error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if "error:" in line]
    return reasons[-1].split("error:", 1)[-1].strip() if reasons else (lines[-1] if lines else type(error).__name__)


def forget_sweep(sweep_dir: Path, new_folder: bool, previous_record: dict | None) -> None:
    """Undo a sweep whose jobs were refused: nothing of it is left recorded as queued."""
    import shutil

    from resexp import sweep as resexp_sweep
    from resexp.files import SWEEP_RECORD

    if new_folder:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    elif previous_record is not None:
        resexp_sweep.write_sweep_record(sweep_dir, previous_record)
    else:
        (sweep_dir / SWEEP_RECORD).unlink(missing_ok=True)


def print_submitted(sweep_dir: Path, runs: list, cluster: str) -> None:
    print(f"submitted {len(runs)} job(s) ({cluster}), logs in {sweep_dir / '.submitit'}:")
    for job in runs:
        print(f"  {job['job_id']:<12} {job['run']}")
    print(f"progress: resexp status {sweep_dir}    figures once they are done: resexp plot {sweep_dir}")
