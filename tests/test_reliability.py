"""Nothing lost: interruptions at awkward moments, divergence, damaged files, a full disk."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import resexp.train as train_module
from resexp import config as config_module
from resexp.errors import UsageError
from resexp.signals import RunInterrupted
from resexp.train import CHECKPOINT, train

SMOKE = ["data=synthetic", "device=cpu", "schedule=smoke", "progress=false", "arch=plain", "depth=8",
         "schedule.iterations=12", "schedule.milestones=[6,9]"]
VOLATILE = ("time_s", "images_per_s")


def compose(*overrides):
    return config_module.compose([*SMOKE, *overrides])


def metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def interrupt_self():
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("moment", ["evaluation", "checkpoint"])
def test_signal_during_evaluation_or_checkpoint_resumes_exactly(tmp_path, monkeypatch, moment):
    cfg = compose()
    train(cfg, tmp_path / "straight")

    calls = {"n": 0}
    if moment == "evaluation":
        real = train_module.evaluate

        def evaluate_then_signal(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                interrupt_self()
            return real(*args, **kwargs)

        monkeypatch.setattr(train_module, "evaluate", evaluate_then_signal)
    else:
        real = train_module.atomic_write

        def write_then_signal(path, *args, **kwargs):
            if str(path).endswith(CHECKPOINT):
                calls["n"] += 1
                if calls["n"] == 1:
                    interrupt_self()
            return real(path, *args, **kwargs)

        monkeypatch.setattr(train_module, "atomic_write", write_then_signal)

    with pytest.raises(RunInterrupted) as caught:
        train(cfg, tmp_path / "resumed")
    assert caught.value.exit_code == 130
    assert json.loads((tmp_path / "resumed" / "result.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    assert train(cfg, tmp_path / "resumed")["outcome"] == "resumed"
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")


def test_ctrl_c_in_a_real_terminal_session_exits_130_and_resumes(tmp_path):
    smoke = [arg for arg in SMOKE if not arg.startswith("schedule.iterations=")]  # each key once
    command = [sys.executable, "-m", "resexp", "train", *smoke, "schedule.iterations=400",
               "schedule.eval_every=20", "schedule.checkpoint_every=20", f"out={tmp_path}", "name=run"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "run the same command to resume" in err and "Traceback" not in err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "interrupted"
    checkpoint = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert checkpoint["iteration"] == result["iterations_done"]
    assert all(m["iteration"] <= checkpoint["iteration"] for m in metrics(tmp_path / "run"))


def test_divergence_stops_the_run_and_keeps_finite_metrics(tmp_path, capsys):
    result = train(compose("schedule.lr=1e30", "schedule.eval_every=2"), tmp_path / "run")
    assert result["status"] == "diverged"
    assert result["diverged_at"] == 2 or result["diverged_at"] == 4
    assert result["iterations_done"] == result["diverged_at"] < 12
    assert "diverged at iteration" in capsys.readouterr().err
    # A diverged run is finished: running it again does not train it again.
    assert train(compose("schedule.lr=1e30", "schedule.eval_every=2"), tmp_path / "run")["outcome"] == "skipped"


def test_damaged_metrics_file_is_reported_with_the_users_choice(tmp_path):
    cfg = compose()
    train(cfg, tmp_path / "run", stop_after=5)
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text("{broken\n" + path.read_text())
    with pytest.raises(UsageError, match=r"metrics.jsonl is damaged.*resume=false"):
        train(cfg, tmp_path / "run")


def test_damaged_result_file_does_not_lose_the_run(tmp_path, capsys):
    cfg = compose()
    first = train(cfg, tmp_path / "run")
    (tmp_path / "run" / "result.json").write_text('{"status": "do')
    again = train(cfg, tmp_path / "run")
    assert "result.json is damaged" in capsys.readouterr().err
    assert again["status"] == "done" and again["final_test_error"] == first["final_test_error"]


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = compose()
    real_save = torch.save
    saves = {"n": 0}

    def save_until_disk_is_full(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", save_until_disk_is_full)
    with pytest.raises(UsageError, match="No space left on device.*previous checkpoint is intact"):
        train(cfg, tmp_path / "run")
    monkeypatch.undo()
    checkpoint = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert checkpoint["iteration"] == cfg.schedule.checkpoint_every
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# --- a real full disk, and two processes on one run ----------------------------------------------

@pytest.fixture(params=["1m", "3m"], ids=["before-the-first-checkpoint", "at-the-second-checkpoint"])
def small_disk(request, tmp_path):
    """A tmpfs of 1 MB (no room for a ResNet-20 checkpoint) or 3 MB (room for one, not for the next
    beside it). Mounting needs root, as CI has."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'}); needs root")
    yield disk, request.param
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_and_loses_nothing(small_disk, cli_env):
    disk, size = small_disk
    overrides = ["depth=20", "data=synthetic", "schedule=smoke", "schedule.iterations=60", "schedule.eval_every=10",
                 "schedule.checkpoint_every=20", "schedule.milestones=[]", "progress=false", "device=cpu",
                 f"out={disk}", "name=run"]
    done = subprocess.run([sys.executable, "-m", "resexp", "train", *overrides], env=cli_env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and lines[-1].startswith("resexp: error: could not write"), done.stderr
    run_dir = disk / "run"
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn line
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and "could not write" in result["error"]  # not left "running"
    if size == "3m":
        assert "the previous checkpoint is intact" in lines[-1]
        assert torch.load(run_dir / CHECKPOINT, weights_only=True)["iteration"] == 20
    else:
        assert "no checkpoint yet" in lines[-1] and not (run_dir / CHECKPOINT).exists()

    plotted = subprocess.run([sys.executable, "-m", "resexp", "plot", str(run_dir)], env=cli_env,
                             capture_output=True, text=True, timeout=300)
    assert "Traceback" not in plotted.stderr, plotted.stderr
    assert plotted.returncode in (0, 2), plotted.stderr
    if plotted.returncode == 2:
        assert [line for line in plotted.stderr.splitlines() if line.strip()][-1].startswith("resexp: error:")


def test_a_run_being_trained_by_another_process_is_refused_in_one_line(tmp_path, cli_env):
    command = [sys.executable, "-m", "resexp", "train", "depth=8", "data=synthetic", "schedule=smoke",
               "schedule.iterations=400", "schedule.eval_every=50", "schedule.checkpoint_every=50",
               "schedule.milestones=[]", "progress=false", "device=cpu", f"out={tmp_path}", "name=run"]
    first = subprocess.Popen(command, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "run" / train_module.LOCK
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the first run never took its folder"
    second = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=300)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"being trained by process {first.pid}" in lines[0]
    assert first.wait(timeout=300) == 0, first.stderr.read()
    iterations = [json.loads(line)["iteration"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert iterations == list(range(50, 401, 50))  # every line once
    assert not lock.exists()


def test_the_same_sweep_started_twice_at_once_is_refused_in_one_line(tmp_path, cli_env):
    command = [sys.executable, "-m", "resexp", "sweep", "arch=resnet", "depth=8", "data=synthetic", "schedule=smoke",
               "schedule.iterations=400", "schedule.eval_every=50", "schedule.milestones=[]", "progress=false",
               "device=cpu", f"out={tmp_path}", "name=twice"]
    first = subprocess.Popen(command, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    locks = []
    deadline = time.time() + 120
    while not locks and first.poll() is None and time.time() < deadline:
        locks = list((tmp_path / "twice").glob(f"*/{train_module.LOCK}"))
        time.sleep(0.05)
    assert locks, "the first sweep never started its run"
    run_dir = locks[0].parent
    second = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=300)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert lines[-1].startswith("resexp: error:")
    # The run's own process holds it: one started by the first sweep (one run = one process).
    holder = int(lines[-1].split("being trained by process ")[1].split()[0])
    parent = next(line for line in Path(f"/proc/{holder}/status").read_text().splitlines() if line.startswith("PPid:"))
    assert int(parent.split()[1]) == first.pid, (holder, parent)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in metrics] == list(range(50, 401, 50))


@pytest.mark.parametrize("failures", [1, 3])
def test_a_failed_requeue_is_tried_again_and_then_leaves_the_run_stopped_at_its_checkpoint(monkeypatch, capsys, failures):
    """submitit's SIGUSR2 handler runs ``scontrol requeue``, which a busy controller can fail."""
    import resexp.signals as signals_module

    monkeypatch.setattr(signals_module, "REQUEUE_RETRY_S", 0.0)
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        if len(calls) <= failures:
            raise subprocess.CalledProcessError(1, ["scontrol", "requeue", "7"])
        raise SystemExit(-1)  # requeued: submitit exits the process

    stop = signals_module.StopSignals()  # not entered, and restoring nothing: pytest's handlers stay
    monkeypatch.setattr(stop, "_restore", lambda: None)
    stop._previous[signal.SIGUSR2] = submitit_handler
    stop.received = signal.SIGUSR2
    if failures < signals_module.REQUEUE_TRIES:
        with pytest.raises(SystemExit):
            stop.hand_over()
    else:
        stop.hand_over()  # returns: the caller stops the run as interrupted
    assert calls == [signal.SIGUSR2] * min(failures + 1, signals_module.REQUEUE_TRIES)
    stderr = capsys.readouterr().err
    assert stderr.count("requeueing this job failed") == failures
    assert ("the job was not requeued" in stderr) == (failures == signals_module.REQUEUE_TRIES)
