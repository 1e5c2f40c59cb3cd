"""``resexp status``: one table for every run of a sweep, from fabricated run folders in every state."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from resexp.errors import UsageError
from resexp.status import STALLED_AFTER_MIN_S, run_status, status_command, sweep_status

ITERATIONS = 100


def make_run(sweep_dir, name, status=None, evaluations=(), *, error=None, env=None, **result_extra):
    """A run folder: config.yaml, one metrics line per (iteration, time_s, train_error, test_error),
    and result.json when ``status`` is given."""
    run = sweep_dir / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"arch": "plain", "depth": 20,
                                                      "schedule": {"iterations": ITERATIONS}}))
    lines = [{"iteration": i, "time_s": t, "train_error": tr, "test_error": te, "train_loss": 1.0,
              "test_loss": 1.0, "lr": 0.1} for i, t, tr, te in evaluations]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if status is not None:
        last = lines[-1] if lines else {}
        result = {"status": status, "run_name": name, "iterations": ITERATIONS,
                  "iterations_done": last.get("iteration", 0), "final_train_error": last.get("train_error"),
                  "final_test_error": last.get("test_error"), "wall_time_s": last.get("time_s"),
                  "error": error, **result_extra}
        (run / "result.json").write_text(json.dumps(result))
    if env is not None:
        (run / "env.json").write_text(json.dumps(env))
    return run


@pytest.fixture
def sweep_dir(tmp_path):
    """A sweep with a run in every state, as a cluster sweep leaves it half-way."""
    folder = tmp_path / "figure6"
    planned = ["plain-20-s0", "plain-32-s0", "plain-44-s0", "plain-56-s0", "resnet-20-s0", "resnet-32-s0",
               "resnet-44-s0", "resnet-56-s0", "resnet-110-s0"]
    runs = [{"run": name, "overrides": [f"arch={name.split('-')[0]}", f"depth={name.split('-')[1]}"],
             "job_id": f"4242_{index}"} for index, name in enumerate(planned)]
    runs[8] = {**runs[8], "outcome": "failed", "result": {"status": "failed", "error": "job 4242_8 ended without a result"}}
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"name": "figure6", "runs": runs}))

    make_run(folder, "plain-20-s0", "done", [(50, 100.0, 0.30, 0.32), (100, 200.0, 0.10, 0.125)],
             env={"host": "node1", "slurm_job_id": "4250", "slurm_array_job_id": "4242", "slurm_array_task_id": "0"})
    make_run(folder, "plain-32-s0", "failed", [(50, 100.0, 0.3, 0.3)], error="UsageError: out of GPU memory\nmore")
    make_run(folder, "plain-44-s0", "diverged", [(50, 100.0, float("nan"), 0.9)], diverged_at=50)
    make_run(folder, "plain-56-s0", "interrupted", [(50, 100.0, 0.4, 0.45)])
    make_run(folder, "resnet-20-s0", "running", [(20, 40.0, 0.5, 0.55), (25, 50.0, 0.45, 0.5)],
             env={"host": "node2", "slurm_job_id": "4255"})
    stalled = make_run(folder, "resnet-32-s0", "running", [(20, 40.0, 0.5, 0.55), (25, 50.0, 0.45, 0.5)])
    long_ago = time.time() - 2 * STALLED_AFTER_MIN_S
    os.utime(stalled / "metrics.jsonl", (long_ago, long_ago))
    make_run(folder, "resnet-44-s0")  # folder made, nothing recorded yet
    # resnet-56-s0: no folder at all. resnet-110-s0: its job failed before training started.
    make_run(folder, "resnet-8-s0-extra", "done", [(100, 10.0, 0.2, 0.25)])  # on disk, not in the plan
    return folder


def test_every_state_from_the_files(sweep_dir):
    states = {run.name: run.state for run in sweep_status(sweep_dir)}
    assert states == {
        "plain-20-s0": "done", "plain-32-s0": "failed", "plain-44-s0": "diverged", "plain-56-s0": "interrupted",
        "resnet-20-s0": "running", "resnet-32-s0": "stalled", "resnet-44-s0": "queued", "resnet-56-s0": "queued",
        "resnet-110-s0": "failed", "resnet-8-s0-extra": "done",
    }
    assert [run.name for run in sweep_status(sweep_dir)][-1] == "resnet-8-s0-extra"  # planned runs first


def test_running_run_shows_progress_and_eta_from_its_last_metrics(sweep_dir):
    running = run_status(sweep_dir / "resnet-20-s0", {"run": "resnet-20-s0", "job_id": "4242_4"})
    # 5 iterations took 10 s, so the remaining 75 take 150 s.
    assert (running.iterations_done, running.iterations, running.eta_s) == (25, 100, pytest.approx(150.0))
    assert (running.train_error, running.test_error) == (0.45, 0.5)
    assert running.where == "node2 job 4242_4"


def test_table_lists_every_run_with_errors_and_jobs(sweep_dir, capsys):
    assert status_command([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[3:] if line.strip() and not line.startswith(" ")}
    assert out.splitlines()[0].startswith(f"{sweep_dir}: 10 run(s): ")
    assert "2 done" in out.splitlines()[0] and "2 queued" in out.splitlines()[0]
    assert "100/100" in lines["plain-20-s0"] and "10.00%" in lines["plain-20-s0"] and "12.50%" in lines["plain-20-s0"]
    assert "node1 job 4242_0" in lines["plain-20-s0"]
    assert "25/100" in lines["resnet-20-s0"] and "2m 30s" in lines["resnet-20-s0"]
    assert "job 4242_7" in lines["resnet-56-s0"]
    errors = out.split("errors:")[1]
    assert "plain-32-s0: UsageError: out of GPU memory" in errors and "more" not in errors
    assert "plain-44-s0: loss not finite at iteration 50" in errors
    assert "resnet-32-s0: no new metrics for" in errors
    assert "resnet-110-s0: job 4242_8 ended without a result" in errors


def test_a_run_folder_on_its_own(tmp_path, capsys):
    run = make_run(tmp_path, "resnet-20-s0", "done", [(100, 10.0, 0.2, 0.25)])
    assert status_command([str(run)]) == 0
    assert "resnet-20-s0  done" in capsys.readouterr().out


def test_folders_without_a_plan_are_listed_from_disk(tmp_path):
    make_run(tmp_path, "b-run", "interrupted", [(10, 1.0, 0.5, 0.5)])
    make_run(tmp_path, "a-run", "done", [(100, 10.0, 0.2, 0.25)])
    (tmp_path / ".submitit").mkdir()
    assert [(run.name, run.state) for run in sweep_status(tmp_path)] == [("a-run", "done"), ("b-run", "interrupted")]


@pytest.mark.parametrize("args, message", [
    (["does-not-exist"], "folder does-not-exist does not exist"),
    ([], "takes one folder"),
    (["a", "b"], "takes one folder"),
    (["--all"], "unknown option --all; resexp status takes no options"),
    (["depth=20"], "unknown option depth=20; resexp status takes no options"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=message) as caught:
        status_command(args)
    assert "\n" not in str(caught.value)


def test_a_folder_without_runs_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="holds no runs"):
        status_command([str(tmp_path)])


def test_run_records_with_the_wrong_types_are_reported_not_a_traceback(tmp_path, cli_env):
    """A result.json or metrics line that resexp did not write (types wrong): status and plot say which
    file is damaged and carry on with the rest."""
    import subprocess
    import sys

    sweep_dir = tmp_path / "sweep"
    make_run(sweep_dir, "resnet-20-s0", "done", evaluations=[(50, 10.0, 0.5, 0.6)])
    damaged = sweep_dir / "plain-20-s0"
    damaged.mkdir()
    (damaged / "result.json").write_text(json.dumps({"status": "done", "final_train_error": "low", "iterations": []}))
    (damaged / "metrics.jsonl").write_text(json.dumps({"iteration": "ten", "train_error": "x"}) + "\n")

    shown = subprocess.run([sys.executable, "-m", "resexp", "status", str(sweep_dir)], env=cli_env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "damaged" in shown.stdout and "plain-20-s0/result.json: iterations is []" in shown.stdout
    assert "resnet-20-s0" in shown.stdout

    drawn = subprocess.run([sys.executable, "-m", "resexp", "plot", str(sweep_dir)], env=cli_env,
                           capture_output=True, text=True, timeout=300)
    assert drawn.returncode == 0 and "Traceback" not in drawn.stderr, drawn.stderr
    assert "plain-20-s0/result.json is unreadable" in drawn.stderr and (sweep_dir / "curves.png").exists()


def test_status_of_a_file_says_it_is_a_file(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a sweep\n")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        status_command([str(a_file)])


def a_gone_process() -> int:
    """The id of a process that has ended (and been reaped) on this host."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_run_whose_lock_names_a_gone_process_here_is_dead_at_once(tmp_path):
    import socket

    run = make_run(tmp_path, "plain-20-s0", "running", [(20, 40.0, 0.5, 0.55), (50, 100.0, 0.45, 0.5)])
    (run / "run.lock").write_text(json.dumps({"pid": a_gone_process(), "host": socket.gethostname()}))
    status = run_status(run, now=time.time())  # its metrics were written just now: not stalled
    assert status.state == "dead" and status.iterations_done == 50
    assert "is gone (killed?); run the same command to resume" in status.error
    # Alive here, or on a host whose processes cannot be seen: running as before.
    (run / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))
    assert run_status(run, now=time.time()).state == "running"


def test_a_run_failed_by_its_sweep_shows_how_far_it_got(tmp_path):
    """The job's process was killed after iteration 50; result.json still has the start's 0."""
    run = make_run(tmp_path, "plain-20-s0", "running", [(20, 40.0, 0.5, 0.55), (50, 100.0, 0.45, 0.5)],
                   iterations_done=0)
    result = json.loads((run / "result.json").read_text())
    assert result["iterations_done"] == 0
    planned = {"run": "plain-20-s0", "outcome": "failed", "result": {"status": "failed", "error": "killed"}}
    status = run_status(run, planned, now=time.time())
    assert (status.state, status.iterations_done, status.iterations) == ("failed", 50, ITERATIONS)
    result["status"] = "failed"
    (run / "result.json").write_text(json.dumps(result))
    assert run_status(run, now=time.time()).iterations_done == 50
