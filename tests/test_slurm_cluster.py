"""Sweeps through a real SLURM scheduler (``launcher=slurm``): submit, wait, preempt, time out, cancel.

Needs a cluster whose nodes share this machine's /tmp, with accounting: the one that
``scripts/slurm-cluster.sh start`` brings up here (``.ci/run`` does). Skipped when ``sinfo``
finds none. The scenarios start together when the first test asks, and the scheduler runs
their jobs as cores free up; each test waits for the scenario it checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from test_launcher import TIMEOUT_S, finish, metrics, ok, resexp, run_resexp, summary_rows, wait_for


def cluster_problem() -> str | None:
    if not shutil.which("sinfo"):
        return "no SLURM client (sinfo) on PATH; scripts/slurm-cluster.sh start brings up a one-node cluster"
    ran = subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%t"], capture_output=True, text=True)
    if ran.returncode != 0 or "idle" not in ran.stdout and "mix" not in ran.stdout:
        return f"no SLURM cluster with an idle cpu partition answers ({(ran.stderr or ran.stdout).strip()[:200]})"
    return None


pytestmark = pytest.mark.skipif(cluster_problem() is not None, reason=str(cluster_problem()))

# One core and 1 GB per job, so that the node runs as many as it has cores.
ON_CPU_PARTITION = ["launcher=slurm", "launcher.partition=cpu", "launcher.gpus_per_node=0",
                    "launcher.cpus_per_task=1", "launcher.mem_gb=1"]
SHORT = ["depth=8", "schedule=smoke", "data=synthetic", "progress=false", "schedule.iterations=40",
         "schedule.eval_every=5", "schedule.checkpoint_every=1000"]
# Long enough (about 110 s on an idle core, more on a busy one) that SLURM's time-limit warning,
# at most 60 s after the job starts, always reaches its first job part-way.
LONG = ["arch=resnet", "depth=8", "schedule=smoke", "data=synthetic", "progress=false",
        "schedule.iterations=1800", "schedule.eval_every=100", "schedule.checkpoint_every=10000"]
# slurmctld looks at time limits every 30 s and sends the warning up to 30 s early: a job warned
# DELAY_S before a LIMIT_MIN limit gets it between 30 and 60 s after it starts, long after Python
# has its handlers, and again in each requeued job, each time after some progress.
LIMIT_MIN, DELAY_S = 2, 60
# Each requeued job waits for a free core (the node runs one job per core) and gets 30 to 60 s
# before its next warning: on a busy machine that takes a few rounds.
LIMITED_TIMEOUT_S = 600


def sweep(root: Path, name: str, *extra: str) -> list[str]:
    return ["sweep", *ON_CPU_PARTITION, *extra, f"out={root}", f"name={name}"]


def job_ids(sweep_dir: Path) -> list[str]:
    record = json.loads((sweep_dir / "sweep.json").read_text())
    return [run["job_id"] for run in record["runs"] if run.get("job_id")]


def job_logs(sweep_dir: Path) -> str:
    return "".join(path.read_text() for path in sweep_dir.glob(".submitit/*/*_log.*"))


def the_run(sweep_dir: Path) -> Path:
    """The folder of a one-run sweep's run."""
    return next(sweep_dir.glob("*/config.yaml")).parent


def first_evaluation_written(sweep_dir: Path) -> bool:
    return any(path.stat().st_size for path in sweep_dir.glob("*/metrics.jsonl"))


def ok_or_logs(ran: tuple[int, str, str], logs: str) -> None:
    """``ok``, with the jobs' own logs when it fails: what SLURM and submitit said happened."""
    try:
        ok(ran)
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- job logs ---\n{logs[-4000:]}") from None


def slurm(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


# --- scenarios, run in the background -----------------------------------------------------------

def submitted_then_rerun(root: Path, env: dict) -> dict:
    """launcher.wait=false, resexp status until both runs are done, then the same command waiting."""
    sweep_dir = root / "short"
    args = sweep(root, "short", *SHORT, "launcher.wait=false")
    submitted = run_resexp(args, env)
    tables, deadline = [], time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        tables.append(run_resexp(["status", str(sweep_dir)], env))
        if "2 done" in tables[-1][1].splitlines()[0]:
            break
        time.sleep(2)
    jobs_before = sorted(p.name for p in (sweep_dir / ".submitit").iterdir())
    rerun = run_resexp([arg for arg in args if arg != "launcher.wait=false"], env)
    return {"submitted": submitted, "tables": tables, "rerun": rerun, "dir": sweep_dir, "jobs_before": jobs_before,
            "jobs_after": sorted(p.name for p in (sweep_dir / ".submitit").iterdir())}


def signalled(how: str):
    """A one-run sweep whose job gets ``how`` once it has written its first evaluation."""

    def scenario(root: Path, env: dict) -> dict:
        sweep_dir = root / how
        process = resexp(sweep(root, how, *SHORT, "arch=resnet"), env)
        wait_for(lambda: first_evaluation_written(sweep_dir), process, "the first evaluation")
        (job,) = job_ids(sweep_dir)
        if how == "usr2":
            slurm("scancel", "--signal=USR2", job)
        elif how == "term_usr2":  # preemption as submitit models it (SlurmJob._interrupt)
            slurm("scancel", "--signal=TERM", job)
            slurm("scancel", "--signal=USR2", job)
        elif how == "requeue":
            slurm("scontrol", "requeue", job)
        ran = finish(process)
        return {"run": ran, "sweep_dir": sweep_dir, "dir": the_run(sweep_dir), "logs": job_logs(sweep_dir)}

    return scenario


def cancelled_and_resumed(root: Path, env: dict) -> dict:
    sweep_dir = root / "cancel"
    args = sweep(root, "cancel", *SHORT, "arch=resnet")
    process = resexp(args, env)
    wait_for(lambda: first_evaluation_written(sweep_dir), process, "the first evaluation")
    cancelled_at = time.monotonic()
    slurm("scancel", *job_ids(sweep_dir))
    stopped = finish(process)
    returned_after_s = time.monotonic() - cancelled_at
    record = json.loads((sweep_dir / "sweep.json").read_text())
    status = run_resexp(["status", str(sweep_dir)], env)
    resumed = run_resexp(args, env)
    return {"stopped": stopped, "returned_after_s": returned_after_s, "record": record, "status": status,
            "resumed": resumed, "dir": the_run(sweep_dir)}


def uninterrupted_long(root: Path, env: dict) -> dict:
    ran = run_resexp(sweep(root, "long", *LONG), env)
    return {"run": ran, "dir": the_run(root / "long")}


def time_limited(root: Path, env: dict) -> dict:
    """A two-minute limit, warned a minute ahead: the job is requeued (and resumed) until the run is done."""
    sweep_dir = root / "limit"
    ran = run_resexp(sweep(root, "limit", *LONG, f"launcher.timeout_min={LIMIT_MIN}",
                           f"hydra.launcher.signal_delay_s={DELAY_S}"), env, timeout_s=LIMITED_TIMEOUT_S)
    return {"run": ran, "dir": the_run(sweep_dir), "logs": job_logs(sweep_dir)}


def on_gpu_partition(root: Path, env: dict) -> dict:
    """The README's GPU-partition command: one GPU per job (the cluster's stand-in GPU where it has none)."""
    sweep_dir = root / "gpu"
    ran = run_resexp(["sweep", "launcher=slurm", "launcher.partition=gpu", "launcher.cpus_per_task=1",
                      "launcher.mem_gb=1", *SHORT, "arch=resnet", f"out={root}", "name=gpu"], env)
    scripts = "".join(path.read_text() for path in sweep_dir.glob(".submitit/*/*_submission.sh"))
    return {"run": ran, "dir": sweep_dir, "logs": job_logs(sweep_dir), "scripts": scripts}


def impossible(root: Path, env: dict) -> dict:
    cores = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()
    ran = run_resexp(["sweep", *SHORT, "launcher=slurm", "launcher.gpus_per_node=0", "launcher.mem_gb=1",
                      f"launcher.cpus_per_task={max(map(int, cores)) + 1}", f"out={root}", "name=impossible"], env)
    return {"run": ran, "dir": root / "impossible"}


# The longest first: SLURM starts jobs in the order they were submitted, and the time-limit
# scenario (requeued, and queueing again each time) sets how long the module takes.
SCENARIOS = {"limit": time_limited, "long": uninterrupted_long, "short": submitted_then_rerun,
             "usr2": signalled("usr2"), "term_usr2": signalled("term_usr2"), "requeue": signalled("requeue"),
             "cancel": cancelled_and_resumed, "gpu": on_gpu_partition, "impossible": impossible}


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, cli_env) -> dict[str, Future]:
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS))
    root = tmp_path_factory.mktemp("slurm")
    env = {**cli_env, "RESEXP_TEST_CORE": str(min(os.sched_getaffinity(0)))}
    futures = {name: pool.submit(scenario, root / name, env) for name, scenario in SCENARIOS.items()}
    yield futures
    pool.shutdown(wait=True)


# --- tests --------------------------------------------------------------------------------------

def test_sweep_submitted_without_waiting_is_followed_with_status_and_a_rerun_submits_nothing(scenarios):
    short = scenarios["short"].result()
    ok(short["submitted"])
    assert "submitted 2 job(s) (slurm)" in short["submitted"][1]
    for table in short["tables"]:
        ok(table)
    assert "2 done" in short["tables"][-1][1].splitlines()[0]
    ok(short["rerun"])
    assert "no job submitted" in short["rerun"][2]
    assert short["jobs_after"] == short["jobs_before"]
    record = json.loads((short["dir"] / "sweep.json").read_text())
    assert [(run["outcome"], "job_id" in run) for run in record["runs"]] == [("skipped", False), ("skipped", False)]
    assert sorted(row["arch"] for row in summary_rows(short["dir"])) == ["plain", "resnet"]
    for figure in ("curves.png", "error_vs_depth.png", "summary.md"):
        assert (short["dir"] / figure).stat().st_size > 0, figure


@pytest.mark.parametrize("how", ["usr2", "term_usr2", "requeue"])
def test_a_preempted_or_requeued_job_comes_back_and_ends_like_an_uninterrupted_run(scenarios, how):
    stopped, reference = scenarios[how].result(), scenarios["short"].result()
    ok_or_logs(stopped["run"], stopped["logs"])
    assert "Traceback" not in stopped["logs"]
    result = json.loads((stopped["dir"] / "result.json").read_text())
    assert result["status"] == "done"
    resumed_at = json.loads((stopped["dir"] / "env.json").read_text())["resumed_at_iteration"]
    assert resumed_at and resumed_at >= 5  # from the checkpoint saved at the signal
    assert metrics(stopped["dir"]) == metrics(reference["dir"] / "resnet-8-s0")
    table = stopped["run"][1]
    assert stopped["dir"].name in table and (stopped["sweep_dir"] / "curves.png").stat().st_size > 0


def test_a_job_at_its_time_limit_is_requeued_and_ends_like_an_uninterrupted_run(scenarios):
    limited, reference = scenarios["limit"].result(), scenarios["long"].result()
    ok_or_logs(limited["run"], limited["logs"])
    ok(reference["run"])
    assert "this job is timed-out" in limited["logs"] and "Traceback" not in limited["logs"]
    assert json.loads((limited["dir"] / "env.json").read_text())["resumed_at_iteration"]
    assert metrics(limited["dir"]) == metrics(reference["dir"])


def test_scancel_in_a_waiting_sweep_records_the_run_interrupted_and_the_same_command_resumes(scenarios):
    cancel, reference = scenarios["cancel"].result(), scenarios["short"].result()
    returncode, stdout, stderr = cancel["stopped"]
    assert returncode == 1, stderr[-2000:]
    assert cancel["returned_after_s"] < 60
    (run,) = cancel["record"]["runs"]
    assert run["outcome"] == "failed" and run["result"]["status"] == "interrupted"
    assert "interrupted" in stdout and "Traceback" not in stderr
    ok(cancel["status"])
    assert "1 interrupted" in cancel["status"][1].splitlines()[0]
    ok(cancel["resumed"])
    assert metrics(cancel["dir"]) == metrics(reference["dir"] / "resnet-8-s0")


def test_a_sweep_on_a_gpu_partition_asks_one_gpu_per_job_and_finishes(scenarios):
    gpu = scenarios["gpu"].result()
    ok_or_logs(gpu["run"], gpu["logs"])
    assert "#SBATCH --partition=gpu" in gpu["scripts"] and "#SBATCH --gpus-per-node=1" in gpu["scripts"]
    assert json.loads((the_run(gpu["dir"]) / "result.json").read_text())["status"] == "done"
    assert (gpu["dir"] / "curves.png").stat().st_size > 0


def test_a_request_no_node_can_meet_is_one_line_and_exit_code_2(scenarios):
    returncode, stdout, stderr = scenarios["impossible"].result()["run"]
    assert returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("resexp: error:")]
    assert errors == [line for line in stderr.splitlines() if not line.startswith("sweep folder:")]
    assert len(errors) == 1 and "More processors requested than permitted" in errors[0]
    assert not scenarios["impossible"].result()["dir"].exists()
