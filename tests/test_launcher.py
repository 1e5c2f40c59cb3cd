"""Sweeps through Hydra's submitit launcher, and runs that are stopped by a signal and resumed.

``launcher=submitit_local`` runs the same submission path as ``launcher=slurm`` on this
machine; ``launcher=slurm`` itself is checked against a stand-in ``sbatch``/``srun`` that
records the batch script and lets the test play the cluster's part. Every scenario starts
real ``resexp`` processes (each imports torch and Hydra), so the module starts them all
together when the first test asks, and each test waits for the scenario it checks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra (hydra-submitit-launcher)")

RESEXP = Path(sysconfig.get_path("scripts")) / "resexp"
TIMEOUT_S = 300
SMOKE = ["depth=8", "schedule=smoke", "data=synthetic", "progress=false"]
# Long enough to be stopped part-way: 40 iterations, an evaluation every 5 (each scenario
# picks its checkpoint interval; it does not change the metrics).
RESUMABLE = ["arch=resnet", "depth=8", "schedule=smoke", "data=synthetic", "progress=false",
             "schedule.iterations=40", "schedule.eval_every=5"]
TIMING_FIELDS = ("time_s", "images_per_s")
FAKE_ARRAY_JOB = "4242"
SETUP_MARK = "setup-line-ran"


# --- helpers ------------------------------------------------------------------------------------

def on_one_core(env: dict) -> list[str]:
    """A command prefix that keeps a scenario (and the jobs it starts) on one core.

    The trainer uses every core it may run on; the scenarios run side by side, and
    oversubscribed CPU threads slow each other down many times over. One thread each
    also keeps the CPU arithmetic, and so the metrics, identical between scenarios.
    """
    taskset = shutil.which("taskset")
    return [taskset, "-c", env["RESEXP_TEST_CORE"]] if taskset else []


def resexp(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([*on_one_core(env), str(RESEXP), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout_s: float = TIMEOUT_S) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout_s)
    return process.returncode, stdout, stderr


def run_resexp(args: list[str], env: dict, timeout_s: float = TIMEOUT_S) -> tuple[int, str, str]:
    return finish(resexp(args, env), timeout_s)


def wait_for(condition, process: subprocess.Popen, what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Poll until ``condition()`` holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the command ended (exit code {process.returncode}) before {what}: "
                                 f"{process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def metrics(run_dir: Path) -> list[dict]:
    """The run's metrics lines without the wall-clock fields (the rest is deterministic on a CPU)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{key: value for key, value in line.items() if key not in TIMING_FIELDS} for line in lines]


def summary_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return [{key: value for key, value in row.items() if key not in ("wall_time_s", "images_per_s")}
                for row in csv.DictReader(f)]


def run_folders(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def submitit_task_pids(marker: str) -> list[int]:
    """Processes running a submitit job whose command line mentions ``marker`` (a sweep folder)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in words and any(marker.encode() in word for word in words):
            pids.append(int(cmdline.parent.name))
    return pids


# --- scenarios, run in the background -----------------------------------------------------------

def default_sweep(root: Path, env: dict) -> dict:
    return {"run": run_resexp(["sweep", *SMOKE, f"out={root}", "name=smoke"], env), "dir": root / "smoke"}


def submitit_local_sweep(root: Path, env: dict) -> dict:
    ran = run_resexp(["sweep", *SMOKE, "launcher=submitit_local", f"out={root}", "name=smoke"], env)
    return {"run": ran, "dir": root / "smoke"}


def fake_slurm_sweep(root: Path, env: dict) -> dict:
    """Submit to a stand-in sbatch without waiting, then run the first array task as SLURM would."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" "{bin_dir}/batch_script.sh"\n'
                                    f'echo "Submitted batch job {FAKE_ARRAY_JOB}"\n')
    # srun: drop its own options, run the command in this process's place.
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in\n'
                                  '  --unbuffered) shift ;; --*) shift 2 ;; *) break ;;\nesac; done\nexec "$@"\n')
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}
    # The README's other sbatch options, through Hydra's launcher config.
    submitted = run_resexp(["sweep", *SMOKE, "launcher=slurm", "launcher.partition=gpu", "launcher.wait=false",
                            "hydra.launcher.account=proj7", f"hydra.launcher.setup=['echo {SETUP_MARK}']",
                            f"out={root}", "name=smoke"], env)
    sweep_dir = root / "smoke"
    record_after_submission = json.loads((sweep_dir / "sweep.json").read_text())
    task_env = {**env, "SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": FAKE_ARRAY_JOB, "SLURM_ARRAY_TASK_ID": "0",
                "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1"}
    task = subprocess.run([*on_one_core(env), "bash", str(bin_dir / "batch_script.sh")], env=task_env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return {"submitted": submitted, "record": record_after_submission, "task": task,
            "script": (bin_dir / "batch_script.sh").read_text(), "dir": sweep_dir}


def uninterrupted_run(root: Path, env: dict) -> dict:
    return {"run": run_resexp(["train", *RESUMABLE, f"out={root}", "name=run"], env), "dir": root / "run"}


def sigterm_then_resume(root: Path, env: dict) -> dict:
    """SIGTERM once the first checkpoint exists, then the same command again."""
    run_dir = root / "run"
    process = resexp(["train", *RESUMABLE, "schedule.checkpoint_every=5", f"out={root}", "name=run"], env)
    wait_for(lambda: (run_dir / "checkpoint.pt").exists(), process, "the first checkpoint")
    process.send_signal(signal.SIGTERM)
    stopped = finish(process)
    status_when_stopped = json.loads((run_dir / "result.json").read_text())["status"]
    resumed = run_resexp(["train", *RESUMABLE, "schedule.checkpoint_every=5", f"out={root}", "name=run"], env)
    return {"stopped": stopped, "status_when_stopped": status_when_stopped, "resumed": resumed, "dir": run_dir}


def preempted_submitit_job(root: Path, env: dict) -> dict:
    """SIGUSR2 (SLURM's warning before the time limit, and on preemption) to a submitit_local job.

    No periodic checkpoint falls inside the run (checkpoint_every=1000), so the requeued job
    can only resume part-way if the run saved a checkpoint when it was signalled.
    """
    sweep_dir = root / "preempt"
    process = resexp(["sweep", *RESUMABLE, "schedule.checkpoint_every=1000", "launcher=submitit_local",
                      f"out={root}", "name=preempt"], env)
    wait_for(lambda: any(path.stat().st_size for path in sweep_dir.glob("*/metrics.jsonl")), process,
             "the first evaluation")
    pids = submitit_task_pids(str(sweep_dir))
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGUSR2)
    ran = finish(process)
    run_dir = next(sweep_dir.glob("*/metrics.jsonl")).parent
    logs = "".join(path.read_text() for path in sweep_dir.glob(".submitit/*/*_log.*"))
    return {"run": ran, "dir": run_dir, "sweep_dir": sweep_dir, "logs": logs}


HAS_PROC = Path("/proc/self/cmdline").exists()  # finding the submitit job's process needs Linux's /proc
needs_proc = pytest.mark.skipif(not HAS_PROC, reason="finds the submitit job's process through /proc")
SCENARIOS = {"default": default_sweep, "submitit_local": submitit_local_sweep, "fake_slurm": fake_slurm_sweep,
             "uninterrupted": uninterrupted_run, "sigterm": sigterm_then_resume,
             **({"usr2": preempted_submitit_job} if HAS_PROC else {})}


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, cli_env) -> dict[str, Future]:
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS))
    root = tmp_path_factory.mktemp("launcher")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    futures = {name: pool.submit(scenario, root / name,
                                 {**cli_env, "RESEXP_TEST_CORE": str(cores[index % len(cores)])})
               for index, (name, scenario) in enumerate(SCENARIOS.items())}
    yield futures
    pool.shutdown(wait=True)


def ok(ran: tuple[int, str, str]) -> None:
    returncode, stdout, stderr = ran
    assert returncode == 0, f"exit code {returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-3000:]}"


# --- configuration ------------------------------------------------------------------------------

def test_slurm_settings_map_onto_the_launcher_documented_options():
    import resexp.config  # noqa: F401  (registers the resolver the sweep folders use)
    from hydra import compose, initialize_config_module
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from omegaconf import OmegaConf

    overrides = ["launcher=slurm", "launcher.partition=gpu", "launcher.timeout_min=30", "launcher.mem_gb=8",
                 "launcher.cpus_per_task=6", "launcher.array_parallelism=3", "launcher.wait=false"]
    with initialize_config_module("resexp.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert set(launcher) == {field.name for field in dataclasses.fields(SlurmQueueConf)}
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert {key: launcher[key] for key in ("partition", "timeout_min", "mem_gb", "cpus_per_task",
                                           "array_parallelism", "gpus_per_node", "tasks_per_node", "nodes")} == \
        {"partition": "gpu", "timeout_min": 30, "mem_gb": 8, "cpus_per_task": 6, "array_parallelism": 3,
         "gpus_per_node": 1, "tasks_per_node": 1, "nodes": 1}
    assert launcher["max_num_timeout"] > 0  # resexp resumes from its checkpoint, so requeue after time-outs
    assert cfg.launcher.wait is False

    with initialize_config_module("resexp.conf", version_base="1.3"):
        default = compose("config", return_hydra_config=True)
    assert default.hydra.launcher._target_.endswith("BasicLauncher") and default.launcher.name == "local"


# --- sweeps -------------------------------------------------------------------------------------

def test_submitit_local_sweep_matches_the_default_launcher(scenarios):
    default, submitit = scenarios["default"].result(), scenarios["submitit_local"].result()
    ok(default["run"])
    ok(submitit["run"])
    assert run_folders(submitit["dir"]) == run_folders(default["dir"]) == ["plain-8-s0", "resnet-8-s0"]
    for name in run_folders(default["dir"]):
        assert metrics(submitit["dir"] / name) == metrics(default["dir"] / name), name
    assert summary_rows(submitit["dir"]) == summary_rows(default["dir"])
    for figure in ("curves.png", "curves.pdf", "error_vs_depth.png", "error_vs_depth.pdf", "summary.md"):
        assert (submitit["dir"] / figure).stat().st_size > 0, figure
    runs = json.loads((submitit["dir"] / "sweep.json").read_text())["runs"]
    assert [run["outcome"] for run in runs] == ["trained", "trained"] and all(run["job_id"] for run in runs)


def test_slurm_sweep_without_waiting_submits_one_array_and_returns(scenarios):
    slurm = scenarios["fake_slurm"].result()
    ok(slurm["submitted"])
    stdout = slurm["submitted"][1]
    assert f"{FAKE_ARRAY_JOB}_0" in stdout and f"{FAKE_ARRAY_JOB}_1" in stdout
    for flag in ("--partition=gpu", "--account=proj7", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=4",
                 "--mem=16GB", "--time=240", "--array=0-1%2", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in slurm["script"], flag
    runs = slurm["record"]["runs"]
    assert [(run["run"], run["outcome"], run["job_id"]) for run in runs] == [
        ("plain-8-s0", "submitted", f"{FAKE_ARRAY_JOB}_0"), ("resnet-8-s0", "submitted", f"{FAKE_ARRAY_JOB}_1")]


def test_slurm_array_task_trains_its_run_and_records_where(scenarios, capsys):
    from resexp.status import status_command

    slurm, default = scenarios["fake_slurm"].result(), scenarios["default"].result()
    assert slurm["task"].returncode == 0, slurm["task"].stderr[-3000:]
    assert f"echo {SETUP_MARK}\n" in slurm["script"] and SETUP_MARK in slurm["task"].stdout  # before the job
    run_dir = slurm["dir"] / "plain-8-s0"
    env = json.loads((run_dir / "env.json").read_text())
    assert (env["slurm_job_id"], env["slurm_array_task_id"]) == ("4243", "0") and env["host"]
    ok(default["run"])
    assert metrics(run_dir) == metrics(default["dir"] / "plain-8-s0")

    assert status_command([str(slurm["dir"])]) == 0
    table = capsys.readouterr().out
    assert "1 done, 1 queued" in table.splitlines()[0]
    assert f"job {FAKE_ARRAY_JOB}_0" in table and f"job {FAKE_ARRAY_JOB}_1" in table


# --- stopping and resuming ----------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_like_an_uninterrupted_run(scenarios):
    stopped, reference = scenarios["sigterm"].result(), scenarios["uninterrupted"].result()
    assert stopped["stopped"][0] == 128 + signal.SIGTERM, stopped["stopped"][2][-2000:]
    assert stopped["status_when_stopped"] == "interrupted"
    ok(stopped["resumed"])
    ok(reference["run"])
    assert json.loads((stopped["dir"] / "env.json").read_text())["resumed_at_iteration"] >= 5
    assert metrics(stopped["dir"]) == metrics(reference["dir"])
    assert len(metrics(reference["dir"])) == 8


@needs_proc
def test_requeued_submitit_job_ends_like_an_uninterrupted_run(scenarios):
    preempted, reference = scenarios["usr2"].result(), scenarios["uninterrupted"].result()
    ok(preempted["run"])
    assert "Requeued job" in preempted["logs"]
    assert json.loads((preempted["dir"] / "result.json").read_text())["status"] == "done"
    ok(reference["run"])
    assert metrics(preempted["dir"]) == metrics(reference["dir"])


@needs_proc
def test_requeued_submitit_job_resumes_from_the_checkpoint_saved_at_the_signal(scenarios):
    preempted = scenarios["usr2"].result()
    ok(preempted["run"])
    outcome = json.loads((preempted["sweep_dir"] / "sweep.json").read_text())["runs"][0]["outcome"]
    resumed_at = json.loads((preempted["dir"] / "env.json").read_text())["resumed_at_iteration"]
    assert outcome == "resumed" and resumed_at and resumed_at >= 5


def test_a_job_that_ends_without_a_result_is_a_failed_run_not_a_stopped_sweep(tmp_path):
    """A cancelled or killed job: the sweep records the run as failed and goes on collecting the others."""
    from hydra_plugins.resexp_sweeper.resexp_sweeper import job_result
    from resexp.sweep import finished_record, outcome_table
    from submitit.core.utils import UncompletedJobError

    class CancelledJob:
        job_id = f"{FAKE_ARRAY_JOB}_1"
        paths = type("Paths", (), {"stderr": tmp_path / ".submitit" / "4242_1_0_log.err"})()

        def results(self):
            raise UncompletedJobError(f"Job {self.job_id} (task: 0) has not produced any output (state: CANCELLED)\n"
                                      "Error stream produced:\n...")

    run_dir = tmp_path / "resnet-8-s0"
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"status": "interrupted", "run_name": run_dir.name,
                                                     "iterations_done": 5, "iterations": 40}))
    returned = job_result(CancelledJob(), run_dir)
    record = finished_record(tmp_path, {"runs": [{"run": run_dir.name, "overrides": []}]}, [returned])
    run = record["runs"][0]
    assert run["outcome"] == "failed" and run["result"]["status"] == "interrupted"
    assert run["result"]["error"].startswith(f"job {FAKE_ARRAY_JOB}_1 ended without a result (Job 4242_1")
    assert "4242_1_0_log.err" in run["result"]["error"] and "\n" not in run["result"]["error"]
    assert outcome_table(record)[1]  # the sweep ends with exit code 1


class WaitedJob:
    """A submitted job as wait_for_jobs sees it: done() after ``done_after`` polls, or never."""

    watcher = type("Watcher", (), {"update": staticmethod(lambda: None)})()

    def __init__(self, job_id: str, done_after: int | None = None):
        self.job_id, self.done_after, self.polls = job_id, done_after, 0

    def done(self) -> bool:
        self.polls += 1
        return self.done_after is not None and self.polls > self.done_after


def test_without_accounting_a_job_squeue_no_longer_lists_ends_the_wait(monkeypatch):
    """Without slurmdbd, sacct never says that a killed job ended: squeue's silence does, after a grace time."""
    import hydra_plugins.resexp_sweeper.resexp_sweeper as sweeper

    monkeypatch.setattr(sweeper, "POLL_S", 0.01)
    monkeypatch.setattr(sweeper, "GONE_AFTER_S", 0.1)
    # squeue: both listed, then it cannot say (a busy controller: no verdict), then only the second.
    listings = iter([{"7_0", "7_1"}, None, None] + [{"7_1"}] * 10_000)
    monkeypatch.setattr(sweeper, "listed_by_squeue", lambda job_ids: next(listings))
    killed, finishing = WaitedJob("7_0"), WaitedJob("7_1", done_after=30)
    started = time.monotonic()
    assert sweeper.wait_for_jobs([killed, finishing], "slurm") == {"7_0": False, "7_1": True}
    assert time.monotonic() - started >= 0.1  # not before the grace time


def test_squeue_that_no_longer_knows_the_jobs_lists_none_and_one_that_fails_says_nothing(monkeypatch):
    import hydra_plugins.resexp_sweeper.resexp_sweeper as sweeper

    def squeue(stderr: str, returncode: int = 1, stdout: str = ""):
        return lambda command, **kwargs: subprocess.CompletedProcess(command, returncode, stdout, stderr)

    monkeypatch.setattr(sweeper.subprocess, "run", squeue("slurm_load_jobs error: Invalid job id specified"))
    assert sweeper.listed_by_squeue(["7_0"]) == set()
    monkeypatch.setattr(sweeper.subprocess, "run", squeue("slurm_load_jobs error: Socket timed out on send/recv"))
    assert sweeper.listed_by_squeue(["7_0"]) is None
    monkeypatch.setattr(sweeper.subprocess, "run", squeue("", 0, "7_0\n7_1\n"))
    assert sweeper.listed_by_squeue(["7_0", "7_1"]) == {"7_0", "7_1"}
