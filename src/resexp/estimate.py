"""What a run or a sweep will cost, said before it starts and while it goes.

A run's cost is the work left in it, in forward multiply-adds (``models.forward_macs``): images
still to train, and the evaluations still to come (the whole test set each time, a forward pass
only: about a third of a training image's forward, backward and update). Steady training steps
of the cheapest net, and of the dearest where its steps are short, built as ``resexp train`` builds
them (graphed on a GPU, not compiled), turn cost into seconds on this device; every other net is
scaled by its multiply-adds, at a rate between the two (a small net's step is mostly overhead).
Compiling and capture come on top; it is within a fifth for experiment=laptop on two CPU cores,
and it tells hours from days. On a GPU the probe runs in a process of its own, which gives its
GPU memory back when it ends. While a sweep runs, the finished runs' wall times give a better
rate, so the ETA of the runs left weighs each by its cost.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig

from .files import RESULT, read_result

# A sweep on a CPU longer than this is told about the quick ways to see the result.
LONG_ON_A_CPU_S = 3600
WORTH_SAYING_S = 60  # a shorter run's cost goes without saying
BUSY_CORES = 0.5  # other programs' work, in cores, that the cost line mentions
PROBE_STEP_AT_MOST_S = 1.0  # a larger net is probed too where its step should take no longer
CIFAR10_TEST_IMAGES = 10_000  # the evaluation set when the config does not size it
UNTIMED_STEPS = 2  # cuDNN's autotuning; on a GPU the capture of the CUDA graph
TIMED_STEPS = {"cpu": 2, "cuda": 20}  # at least; a GPU step is milliseconds: time more of them
TIMED_AT_LEAST_S = 0.5  # and steps until this much time has passed: a small net's step is a few ms on a CPU too


def macs_per_image(cfg: DictConfig) -> int:
    from .models import build_model_for, forward_macs

    return forward_macs(build_model_for(cfg))


def iterations_left(cfg: DictConfig, run_dir: Path | None) -> int:
    """The iterations a run still has to train: all of them, less what its folder records as done."""
    done = 0
    if run_dir is not None:
        try:
            record = read_result(run_dir / RESULT)
            done = (record.get("iterations_done") or 0) if record.get("iterations") == cfg.schedule.iterations else 0
        except (OSError, ValueError):
            done = 0
    return max(0, cfg.schedule.iterations - done)


def run_cost(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Forward multiply-adds a run has left, counted in training images (backward and update scale with them)."""
    left = iterations_left(cfg, run_dir)
    evaluations = -(-left // cfg.schedule.eval_every)
    eval_images = cfg.data.val_size or cfg.data.test_size or CIFAR10_TEST_IMAGES
    return float(macs_per_image(cfg)) * (cfg.schedule.batch_size * left + evaluations * eval_images / 3)


def seconds_per_cost(cfg: DictConfig) -> float:
    """Seconds per forward multiply-add of training, from a few steady steps of ``cfg``'s net here.

    The step is built as ``resexp train`` builds it (on a GPU: captured as a CUDA graph and
    replayed), but not compiled: a probe cannot wait for a compiler, and on a GPU the graph, not
    the compiler, is what takes the launch overhead away. The probe's random numbers come from a
    forked generator, so a run that measures itself trains as one that does not.
    """
    import torch

    from .step import resolve_cuda_graph, resolve_device, resolve_precision, step_on_random_data

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    threads = torch.get_num_threads()  # a run that measures itself keeps the CPU threads it settled on
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        step, x, y = step_on_random_data(cfg, compile=False,
                                         cuda_graph=resolve_cuda_graph(cfg.cuda_graph, device, precision))
        for _ in range(UNTIMED_STEPS):  # cuDNN's autotuning, the graph's capture
            step(x, y)
        timed = TIMED_STEPS[device.type]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        steps = 0
        while steps < timed or time.perf_counter() - start < TIMED_AT_LEAST_S:
            for _ in range(timed):
                loss, _ = step(x, y)
            steps += timed
            float(loss)  # waits for the device
        seconds = (time.perf_counter() - start) / steps
    torch.set_num_threads(threads)
    del step, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training that follows in this process gets the probe's memory back
    return seconds / (macs_per_image(cfg) * cfg.schedule.batch_size)


def seconds_per_cost_apart(cfg: DictConfig) -> float:
    """``seconds_per_cost`` in a process of its own where it would use a GPU, so that no CUDA context
    (hundreds of MiB on GPU 0) stays in the sweep's own process while its runs train. Running out of
    GPU memory there is the one line a run gives."""
    from .errors import UsageError
    from .step import resolve_device, run_apart

    if resolve_device(cfg.device).type != "cuda":
        return seconds_per_cost(cfg)
    try:
        return float(run_apart("resexp.estimate", cfg).split()[-1])
    except (RuntimeError, ValueError, IndexError) as failed:
        raise UsageError(f"measuring a step of {cfg.arch}-{cfg.depth} for the cost estimate failed: {failed}") from None


class Probe(NamedTuple):
    cfg: DictConfig
    macs: int     # forward multiply-adds per image of its net
    rate: float   # seconds per multiply-add, measured


def probe(sized) -> list[Probe]:
    """Measured rates of the cheapest net of ``sized`` ((config, multiply-adds per image) pairs) and,
    where it is larger and its steps are short, of the dearest: a small net's step is mostly
    overhead, so it does less per second than a large one (on two CPU cores, 8-layer nets about
    30 % less than 32-layer ones)."""
    by_cost = sorted(sized, key=lambda pair: pair[1] * pair[0].schedule.batch_size)
    cheapest, cheapest_macs = by_cost[0]
    probes = [Probe(cheapest, cheapest_macs, seconds_per_cost_apart(cheapest))]
    for cfg, macs in reversed(by_cost):
        if macs <= cheapest_macs:
            break
        if probes[0].rate * macs * cfg.schedule.batch_size <= PROBE_STEP_AT_MOST_S:
            probes.append(Probe(cfg, macs, seconds_per_cost_apart(cfg)))
            break
    return probes


def rate_at(macs: int, probes: list[Probe]) -> float:
    """Seconds per multiply-add of a net of ``macs`` per image: the probed rates, interpolated on the
    logarithm of the nets' size between the two probes and held beyond them."""
    small, large = probes[0], probes[-1]
    if large.macs <= small.macs:
        return small.rate
    share = min(1.0, max(0.0, math.log(macs / small.macs) / math.log(large.macs / small.macs)))
    return small.rate + share * (large.rate - small.rate)


def cost_line(configs: list[DictConfig], costs: list[float], parallel: int = 1) -> str | None:
    """One line: the estimated wall time of the runs ahead on this device, or None when there is little left.

    ``parallel``: GPUs the runs are spread over (runs sharing one GPU, or the CPU, are not faster together).
    """
    return cost_estimate(configs, costs, parallel).line


class Estimate(NamedTuple):
    seconds: float  # wall time of the runs left (0: nothing left)
    on_cpu: bool
    line: str | None  # what to tell the user (None: too little to be worth saying)


def cost_estimate(configs: list[DictConfig], costs: list[float], parallel: int = 1) -> Estimate:
    """``cost_line``'s estimate, with the seconds it says, for the question before a long CPU sweep."""
    import torch

    from .status import format_duration
    from .step import resolve_device

    left = [(cfg, cost) for cfg, cost in zip(configs, costs) if cost > 0]
    if not left:
        return Estimate(0.0, False, None)
    from .machine import OtherPrograms, usable_cores

    sized = [(cfg, macs_per_image(cfg)) for cfg, _ in left]  # each net built once to count them
    others = OtherPrograms()
    probes = probe(sized)
    others_busy = others.cores_busy()  # while the probes ran (their own time left out)
    seconds = sum(cost * rate_at(macs, probes) for (_, cost), (_, macs) in zip(left, sized)) / max(1, parallel)
    cheapest = probes[0].cfg
    device = resolve_device(cheapest.device)
    on_cpu = device.type != "cuda"
    if seconds < WORTH_SAYING_S:
        return Estimate(seconds, on_cpu, None)
    where = "this CPU" if on_cpu else f"this GPU ({torch.cuda.get_device_name(device)})"
    runs = f"{len(left)} run{'s' if len(left) != 1 else ''}"
    line = (f"estimated wall time: about {format_duration(seconds)} for {runs} on {where} "
            f"(from measured steps of {' and '.join(f'{p.cfg.arch}-{p.cfg.depth}' for p in probes)}, "
            "scaled by each net's multiply-adds)")
    if on_cpu and others_busy >= BUSY_CORES:
        line += (f"; other programs kept {others_busy:.1f} of this CPU's {usable_cores()} cores busy while it was "
                 "measured: the estimate is for the share the runs get now")
    if on_cpu and seconds > LONG_ON_A_CPU_S and not all(cfg.sweep.experiment == "laptop" for cfg, _ in left):
        line += (f"; for a first look on a CPU, resexp sweep experiment=laptop{data_options(cheapest)} shows the "
                 "paper's three findings in about 10 minutes on two free cores "
                 "(or add schedule=quick: 1/32 of the paper's iterations)")
    return Estimate(seconds, on_cpu, line)


def data_options(cfg: DictConfig) -> str:
    """The data options of ``cfg`` as they are typed (empty for the default, CIFAR-10 in data/), so that a
    suggested command can be copied as printed."""
    import shlex

    from .config import data_defaults

    default = data_defaults()  # read from conf/: this runs inside the sweep's Hydra, where compose cannot
    words = [] if cfg.data.name == default["name"] else [f"data={cfg.data.name}"]
    if cfg.data.root != default["root"] and cfg.data.name != "synthetic":
        words.append(f"data.root={cfg.data.root}")
    return "".join(f" {shlex.quote(word)}" for word in words)


# A CPU sweep longer than this asks before it starts, where someone at a terminal can answer.
ASK_BEYOND_S = 3 * 3600
ASSUME_YES_VARIABLE = "RESEXP_YES"  # set by `resexp sweep --yes`: start without asking


def ask_on_the_terminal(question: str) -> str:
    """The user's answer, the question on stderr (stdout may be a pipe or a file)."""
    print(question, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline()


def confirmed_to_start(estimate: Estimate, ask=ask_on_the_terminal) -> bool:
    """Whether a sweep may start: yes, unless it is a CPU sweep of more than ``ASK_BEYOND_S`` started
    from a terminal without ``--yes``, and the user, asked, does not say yes (the default is no).
    A shell script, a CI job or a cluster job has no terminal on its standard input: it goes on."""
    if not (estimate.on_cpu and estimate.seconds > ASK_BEYOND_S) or os.environ.get(ASSUME_YES_VARIABLE):
        return True
    if not sys.stdin.isatty():
        return True
    from .status import format_duration

    answer = ask(f"this sweep would train for about {format_duration(estimate.seconds)} on this CPU; "
                 "start it? [y/N] (--yes skips this question) ")
    return answer.strip().lower() in ("y", "yes")  # Enter, or the end of the input: no


def eta_of_sweep(sweep_dir: Path, runs: list[dict]) -> float | None:
    """Seconds left for the runs of ``sweep.json`` not yet finished, at the rate of those that are:
    each run weighed by its cost (a 110-layer net costs five times a 20-layer one)."""
    spent = cost_done = cost_left = 0.0
    for job in runs:
        cost = job.get("cost")
        if not isinstance(cost, (int, float)) or cost <= 0:
            continue
        try:
            record = read_result(sweep_dir / job["run"] / RESULT)
        except (OSError, ValueError, KeyError):
            record = {}
        if record.get("status") == "done" and record.get("wall_time_s"):
            spent += float(record["wall_time_s"])
            cost_done += cost
        else:
            cost_left += cost
    if not cost_done:
        return None
    return spent / cost_done * cost_left


if __name__ == "__main__":  # the probe of seconds_per_cost_apart: a resolved config on stdin, the rate on stdout
    from omegaconf import OmegaConf

    from .errors import UsageError
    from .step import caused_by_out_of_memory, error_line

    probed = OmegaConf.create(sys.stdin.read())
    try:
        print(seconds_per_cost(probed))
    except Exception as error:
        line = (f"out of GPU memory at batch size {probed.schedule.batch_size}; use a smaller schedule.batch_size"
                if caused_by_out_of_memory(error) else str(error) if isinstance(error, UsageError) else error_line(error))
        print(line, file=sys.stderr)
        sys.exit(2)
