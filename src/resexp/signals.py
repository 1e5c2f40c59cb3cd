"""Stopping a run cleanly on a signal: finish the step, save a checkpoint, then stop (or requeue).

SIGINT (Ctrl-C) and SIGTERM (``kill``, ``scancel``) ask a run to stop at its next step
boundary; SIGUSR2 is the warning a SLURM job gets before its time limit or on preemption
(submitit's ``--signal=USR2@...``), after which the job is requeued.

A preempted SLURM job gets SIGTERM and then SIGUSR2 (submitit's ``SlurmJob._interrupt`` sends
that pair): in a SLURM job, SIGTERM together with SIGUSR2 turns the stop into a requeue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

# How long a SLURM job that got SIGTERM waits, checkpoint saved, for the SIGUSR2 that says it is
# preempted rather than cancelled. Well below SLURM's KillWait (30 s by default), after which
# SIGKILL follows the SIGTERM.
PREEMPTION_SIGNAL_WAIT_S = 5.0
# A busy SLURM controller can fail the ``scontrol requeue`` that submitit's handler runs: try again
# a few times before giving up (the checkpoint is saved either way).
REQUEUE_TRIES = 3
REQUEUE_RETRY_S = 5.0


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM arrived; the run saved a checkpoint and can be resumed.

    A BaseException, like KeyboardInterrupt, so that it stops a whole sweep rather than
    being recorded as one failed job.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT/SIGTERM/SIGUSR2 set a flag the loop checks after each step; a second SIGINT (Ctrl-C pressed
    again) stops at once. Repeats of SIGTERM or SIGUSR2 are the same request again and change nothing: the
    death of a sweep's scheduler reaches its job as one SIGTERM per exiting thread. SIGTERM and SIGUSR2
    together in a SLURM job are a preemption: checkpoint and requeue.

    The line saying the run stops after its step is printed as the signal arrives, by a thread that
    Python's wake-up file descriptor wakes, even while the main thread is inside a long call (a first
    step that compiles) where Python's own handler waits for the call to return.

    SIGUSR2 is the warning a SLURM job gets before its time limit or on preemption (submitit's
    ``--signal=USR2@...``). In a submitit job, submitit's own SIGUSR2 handler requeues the job:
    ``hand_over`` calls it once the checkpoint is saved.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._announced = threading.Lock()  # taken by whoever says "stopping after this step" first
        self._wakeup: tuple[int, int] | None = None  # the wake-up pipe: read end, write end
        self._previous_wakeup = -1

    def __enter__(self):
        if threading_is_main():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
                self._previous[signum] = signal.signal(signum, self._handle)
            read, write = os.pipe()
            os.set_blocking(write, False)
            try:
                self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            except ValueError:  # not allowed here: the handler says it, when it runs
                os.close(read), os.close(write)
            else:
                self._wakeup = (read, write)
                threading.Thread(target=self._announce_on_arrival, args=(read,), daemon=True).start()
        return self

    def _announce_on_arrival(self, read: int) -> None:
        while True:
            try:
                arrived = os.read(read, 64)
            except OSError:
                return
            if not arrived:  # the pipe was closed: the run is over
                return
            stops = [signum for signum in arrived if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)]
            if stops:
                self._announce(stops[0])

    def _announce(self, signum: int) -> None:
        if self._announced.acquire(blocking=False):
            print(f"\n{signal.Signals(signum).name}: stopping after the current step and saving a checkpoint "
                  "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def _handle(self, signum, frame):
        # Python runs pending handlers in signal-number order, so the pair can come in either order.
        if {self.received, signum} == {signal.SIGTERM, signal.SIGUSR2} and in_slurm_job():
            self.received = signal.SIGUSR2  # preempted: the pending stop becomes a requeue
            print("SIGTERM and SIGUSR2: preempted; the job is requeued once the checkpoint is saved",
                  file=sys.stderr)
            return
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C pressed again: stop now
                raise KeyboardInterrupt
            return  # the same stop asked again (a parent's death comes once per exiting thread)
        self.received = signum
        self._announce(signum)

    def hand_over(self) -> None:
        """Give SIGUSR2 to the handler it displaced, if any (submitit's: requeue the job and exit).
        If the requeue keeps failing, return: the caller stops the run as interrupted, resumable.

        In a SLURM job, SIGTERM alone is a cancellation or ``scontrol requeue``, and SIGTERM then
        SIGUSR2 a preemption: wait a little for the SIGUSR2 before taking it as the former.
        """
        if self.received == signal.SIGTERM and in_slurm_job():
            deadline = time.monotonic() + PREEMPTION_SIGNAL_WAIT_S
            while self.received == signal.SIGTERM and time.monotonic() < deadline:
                time.sleep(0.05)
        previous = self._previous.get(self.received)
        if self.received == signal.SIGUSR2 and callable(previous):
            # The checkpoint is saved: signals from here on (the SIGTERM that ``scontrol requeue``
            # sends this job) go to the handlers this one displaced, not to "second signal: stop now".
            self._restore()
            for attempt in range(1, REQUEUE_TRIES + 1):
                try:
                    previous(self.received, None)  # requeues, then exits the process
                    return
                except (OSError, subprocess.SubprocessError) as error:
                    print(f"requeueing this job failed (try {attempt} of {REQUEUE_TRIES}): {error}", file=sys.stderr)
                    if attempt < REQUEUE_TRIES:
                        time.sleep(REQUEUE_RETRY_S)
            print("the job was not requeued; the run stopped at its checkpoint: the same command resumes it",
                  file=sys.stderr)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def __exit__(self, *exc):
        self._restore()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in reversed(self._wakeup):  # the write end first: the thread reads the end and leaves
                os.close(fd)
            self._wakeup = None
        return False


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()
