"""What resexp measures of the machine: how busy other programs keep its cores, and the threads that leaves."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from resexp import machine
from resexp.machine import OtherPrograms, threads_beside, usable_cores
from resexp.step import CpuThreads

linux_only = pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"),
                                reason="measured from Linux's /proc/stat")
BUSY_LOOP = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@linux_only
def test_another_programs_busy_core_is_counted_and_this_processs_own_work_is_not():
    others = OtherPrograms()
    time.sleep(0.5)
    if others.cores_busy() > 0.2:
        pytest.skip("other programs keep this machine busy: nothing to measure against")
    spin(1.0)  # this process's own work: not another program's
    assert others.cores_busy() < 0.35
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # past its start
        others.cores_busy()
        time.sleep(1.5)
        assert 0.6 < others.cores_busy() < 1.4  # one core's worth (the machine's other work on top)
    finally:
        busy.kill()
        busy.wait()


def test_threads_take_the_cores_that_others_leave_free_and_never_fewer_than_one(monkeypatch):
    monkeypatch.setattr(machine, "usable_cores", lambda: 4)
    assert [threads_beside(busy) for busy in (0.0, 0.4, 1.0, 2.2, 3.9, 7.0)] == [4, 4, 3, 2, 1, 1]


def test_a_run_steps_down_beside_busy_programs_and_back_up_when_they_end(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    busy = [1.0]
    monkeypatch.setattr(OtherPrograms, "cores_busy", lambda self: busy[0])
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    monkeypatch.setattr("resexp.step.usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        threads = CpuThreads(torch.device("cpu"))
        assert torch.get_num_threads() == 2  # all cores until it has looked
        assert threads.settle() == 1 == torch.get_num_threads()
        busy[0] = 0.1
        assert threads.settle() == 2 == torch.get_num_threads()
        assert CpuThreads(torch.device("cpu"), count=1) and torch.get_num_threads() == 1  # a checkpoint's count
    finally:
        torch.set_num_threads(before)


def test_an_explicit_thread_count_wins_and_never_changes(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(OtherPrograms, "cores_busy", lambda self: 0.0)
    before = torch.get_num_threads()
    try:
        threads = CpuThreads(torch.device("cpu"), count=2)
        assert threads.settle() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_torchs_threads_spin_briefly_while_they_wait_unless_the_user_says_otherwise():
    """OpenMP reads how long its threads spin when torch loads: importing resexp sets it first."""
    show = "import resexp, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def shown(**settings):
        return subprocess.run([sys.executable, "-c", show], env={**env, **settings}, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert shown() == "10000"
    assert shown(GOMP_SPINCOUNT="300000") == "300000"
    assert shown(OMP_WAIT_POLICY="ACTIVE") == "None"  # ACTIVE's own spin count
