"""Stop requests: one stop per request, however often it is repeated; said as soon as it arrives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from resexp.signals import StopSignals


def test_repeated_sigterms_are_one_stop_and_a_second_ctrl_c_stops_at_once(capsys):
    with StopSignals() as stops:
        for _ in range(3):  # a scheduler's death: one SIGTERM per exiting thread
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert stops.received == signal.SIGTERM
    with StopSignals() as stops:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    time.sleep(0.1)  # the announcing thread has said its line
    announced = [line for line in capsys.readouterr().err.splitlines() if "stopping after the current step" in line]
    assert announced == ["SIGTERM: stopping after the current step and saving a checkpoint "
                         "(press Ctrl-C again to stop at once)",
                         "SIGINT: stopping after the current step and saving a checkpoint "
                         "(press Ctrl-C again to stop at once)"]


CHILD = """
import sys, time, torch
from resexp.signals import StopSignals
torch.set_num_threads(1)
a = torch.linalg.qr(torch.randn(1500, 1500))[0]  # orthogonal: its powers stay finite
with StopSignals():
    print("ready", flush=True)
    torch.linalg.matrix_power(a, 2**15 - 1)  # one call of seconds: Python's own handler waits for it
    print("step done", flush=True)
"""


def test_a_stop_is_announced_while_a_long_step_is_still_running(cli_env):
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=cli_env)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    sent = time.monotonic()
    lines = [(line.strip(), time.monotonic() - sent) for line in child.stdout if line.strip()]
    child.wait(timeout=120)
    assert [text for text, _ in lines] == [
        "SIGINT: stopping after the current step and saving a checkpoint (press Ctrl-C again to stop at once)",
        "step done"], lines
    (_, announced), (_, step_done) = lines
    assert announced < 0.5 and step_done - announced > 0.5, lines  # said at once, not when the call returns


def test_the_schedulers_scratch_files_live_in_the_sweep_folder(tmp_path, monkeypatch):
    """A scheduler killed outright (SIGKILL) cleans nothing up: its scratch files must not be in /tmp."""
    from pathlib import Path

    from resexp import slots

    seen = []

    def start_job(number, total, job, sweep_dir, gpu, threads, scratch, extra_overrides):
        seen.append(Path(scratch))
        return slots.Job(number, job["run"], sweep_dir / job["run"], [], gpu, subprocess.Popen(["true"]),
                         Path(scratch) / f"job-{number}.json")

    monkeypatch.setattr(slots, "start_job", start_job)
    monkeypatch.setattr(slots, "job_return_of", lambda job, interrupted: job.run)
    assert slots.run_in_slots([{"run": "plain-8-s0", "overrides": []}], tmp_path / "sweep") == ["plain-8-s0"]
    (scratch,) = seen
    assert scratch.parent == tmp_path / "sweep" and scratch.name.startswith(".slots-")
    assert not scratch.exists()
