"""What the records say about the machine, and how many cores a process may use."""

from __future__ import annotations

import os
import platform


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
