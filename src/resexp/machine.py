"""What the records say about the machine, how many cores a process may use, and how many of them
other programs keep busy."""

from __future__ import annotations

import os
import platform
import time


def cpu_model() -> str:
    """The CPU's name, for the records of where something ran."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def usable_cores() -> int:
    """Cores this process may run on (a cluster job or taskset may allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class OtherPrograms:
    """How many of this process's cores other programs keep busy, measured between calls of ``cores_busy``.

    Linux's /proc/stat counts each CPU's busy time; this process's own CPU time is taken off, and only
    the CPUs this process may run on count. Elsewhere (no /proc/stat) nothing is measured: 0 cores.
    """

    def __init__(self):
        self._cpus = {f"cpu{n}" for n in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()
        self._since = self._now()

    def cores_busy(self) -> float:
        """Cores' worth of other programs' work since the last call (or since this object was made)."""
        now = self._now()
        (wall_then, busy_then, own_then), (wall_now, busy_now, own_now) = self._since, now
        self._since = now
        if busy_now is None or busy_then is None or wall_now <= wall_then:
            return 0.0
        return max(0.0, ((busy_now - busy_then) - (own_now - own_then)) / (wall_now - wall_then))

    def _now(self) -> tuple[float, float | None, float]:
        return time.monotonic(), self._busy_seconds(), time.process_time()

    def _busy_seconds(self) -> float | None:
        """Seconds the CPUs of this process's set have been busy since boot (all programs), or None."""
        try:
            with open("/proc/stat") as stat:
                lines = [line.split() for line in stat if line.startswith("cpu") and not line.startswith("cpu ")]
        except OSError:
            return None
        ticks = 0
        for name, *fields in lines:
            if name in self._cpus:
                user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
                ticks += user + nice + system + irq + softirq
        return ticks / os.sysconf("SC_CLK_TCK") if ticks else None


def threads_beside(cores_busy: float) -> int:
    """Threads for torch on the cores that other programs leave free: at least one. Threads that
    outnumber the free cores make every parallel operation wait for the one a scheduler put aside."""
    return max(1, min(usable_cores(), round(usable_cores() - cores_busy)))
