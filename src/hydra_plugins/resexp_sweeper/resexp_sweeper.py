"""resexp's Hydra sweeper: Hydra's basic grid sweeper with resexp's rules (see resexp.sweep).

Hydra finds sweepers only under the ``hydra_plugins`` package; the logic lives in
``resexp.sweep``, imported when a sweep starts so that Hydra's plugin scan stays cheap.

With Hydra's submitit launcher (``launcher=slurm`` or ``launcher=submitit_local``) the
sweeper submits the jobs itself, with the launcher's settings and the launcher as each
job's callable, exactly as the launcher's own ``launch`` does. Two things differ:
``launcher.wait=false`` returns once the jobs are submitted (Hydra's launcher interface
has no way to say "submitted, not finished"), and a job that ends without a result
(cancelled, killed, out of requeues) is recorded as a failed run instead of stopping
the collection of the others' results.

With ``gpus=...`` (``sweep.gpus``) and the local launcher, the jobs go to ``resexp.slots``
instead, which runs several at once on this machine, one process and one GPU each.
"""

import sys
from pathlib import Path
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf


class ResexpSweeper(BasicSweeper):
    def __init__(self, max_batch_size=None, params=None, exclude=None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.exclude = [dict(rule) for rule in (exclude or [])]

    def sweep(self, arguments: List[str]) -> Any:
        from resexp import sweep as resexp_sweep
        from resexp.errors import UsageError, exit_with

        loader = self.hydra_context.config_loader

        def compose(overrides):
            return loader.load_sweep_config(self.config, list(overrides))

        try:
            jobs, swept = resexp_sweep.expand_grid(dict(self.params or {}), arguments, self.exclude)
            planned = resexp_sweep.plan_jobs(jobs, swept, compose, Path(self.config.hydra.sweep.dir))
        except UsageError as error:
            exit_with(error)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        print(f"sweep folder: {sweep_dir} ({len(planned)} runs)", file=sys.stderr, flush=True)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        record = {"name": sweep_dir.name, "arguments": list(arguments), "swept": swept, "runs": planned}
        resexp_sweep.write_sweep_record(sweep_dir, record)
        job_overrides = [job["overrides"] for job in planned]

        if is_submitit_launcher(self.launcher):
            # One job array for the whole grid (launcher.array_parallelism caps how many run at once).
            submitted = submit_to_submitit(self.launcher, job_overrides)
            record["runs"] = [{**job, "job_id": str(submitted_job.job_id)}
                              for job, submitted_job in zip(planned, submitted)]
            if not OmegaConf.select(self.config, "launcher.wait", default=True):
                record = {**record, "runs": [{**job, "outcome": "submitted"} for job in record["runs"]]}
                resexp_sweep.write_sweep_record(sweep_dir, record)
                print_submitted(sweep_dir, record["runs"], self.launcher)
                return [[]]
            resexp_sweep.write_sweep_record(sweep_dir, record)
            try:
                results = [job_result(submitted_job, sweep_dir / job["run"])
                           for job, submitted_job in zip(planned, submitted)]
            except KeyboardInterrupt:
                if self.launcher._EXECUTOR == "slurm":  # local jobs got the Ctrl-C too; cluster jobs did not
                    print(f"stopped waiting; the SLURM jobs keep running (scancel {submitted[0].job_id.split('_')[0]} "
                          f"stops them); resexp status {sweep_dir} shows them", file=sys.stderr)
                raise
        elif self.config.sweep.gpus is not None:
            # Several jobs at once on this machine, each in its own process with one GPU (resexp.slots).
            from resexp import slots

            results = slots.run_in_slots(planned, sweep_dir, list(self.config.sweep.gpus),
                                         self.config.sweep.runs_per_gpu, extra_overrides=config_dirs(loader))
        else:
            results = []
            for batch in self.split_overrides_to_chunks(job_overrides, self.max_batch_size):
                results += self.launcher.launch(batch, initial_job_idx=len(results))
        resexp_sweep.write_sweep_record(sweep_dir, resexp_sweep.finished_record(sweep_dir, record, results))
        return [results]


def config_dirs(loader) -> List[str]:
    """``--config-dir`` folders, as an override for job processes that compose their config themselves."""
    folders = [source.full_path() for source in loader.get_sources() if source.provider == "command-line"]
    return [f"hydra.searchpath=[{','.join(folders)}]"] if folders else []


# --- Hydra's submitit launcher ------------------------------------------------------------------

def is_submitit_launcher(launcher) -> bool:
    try:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
    except ImportError:
        return False
    return isinstance(launcher, BaseSubmititLauncher)


def submit_to_submitit(launcher, job_overrides: List[List[str]]) -> list:
    """Submit every job as one array, as ``BaseSubmititLauncher.launch`` does, without waiting.

    The launcher itself is each job's callable: in the job it composes the config and runs
    the task, and its ``checkpoint`` lets submitit requeue the job (same arguments) when it
    is preempted or reaches its time limit; the run then resumes from its own checkpoint.
    """
    import submitit
    from hydra.core.singleton import Singleton
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cluster = launcher._EXECUTOR  # "slurm" or "local"
    params = dict(launcher.params)
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


def job_result(submitted_job, run_dir: Path):
    """The job's Hydra JobReturn; for a job that ended without one, a failed run's record."""
    from hydra.core.utils import JobReturn, JobStatus
    from resexp.files import read_json

    try:
        return submitted_job.results()[0]
    except Exception as error:  # submitit's UncompletedJobError / FailedJobError: no result came back
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = f"job {submitted_job.job_id} ended without a result ({first_line}); log: {submitted_job.paths.stderr}"
    try:
        run_record = read_json(run_dir / "result.json")
    except (OSError, ValueError):
        run_record = {"status": "failed", "run_name": run_dir.name}
    return JobReturn(status=JobStatus.COMPLETED, _return_value={**run_record, "error": message, "outcome": "failed"})


def print_submitted(sweep_dir: Path, runs: list, launcher) -> None:
    print(f"submitted {len(runs)} job(s) ({launcher._EXECUTOR}), logs in {sweep_dir / '.submitit'}:")
    for job in runs:
        print(f"  {job['job_id']:<12} {job['run']}")
    print(f"progress: resexp status {sweep_dir}    figures once they are done: resexp plot {sweep_dir}")
