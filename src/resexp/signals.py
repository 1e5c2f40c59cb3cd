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
    """SIGINT/SIGTERM/SIGUSR2 set a flag the loop checks after each step; a second signal stops at once
    (except SIGTERM and SIGUSR2 together in a SLURM job: preemption, checkpoint and requeue).

    SIGUSR2 is the warning a SLURM job gets before its time limit or on preemption (submitit's
    ``--signal=USR2@...``). In a submitit job, submitit's own SIGUSR2 handler requeues the job:
    ``hand_over`` calls it once the checkpoint is saved.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading_is_main():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        # Python runs pending handlers in signal-number order, so the pair can come in either order.
        if {self.received, signum} == {signal.SIGTERM, signal.SIGUSR2} and in_slurm_job():
            self.received = signal.SIGUSR2  # preempted: the pending stop becomes a requeue
            print("SIGTERM and SIGUSR2: preempted; the job is requeued once the checkpoint is saved",
                  file=sys.stderr)
            return
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr)

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
        return False


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()
