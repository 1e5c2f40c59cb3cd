"""What a run or a sweep will cost, said before it starts and while it goes.

A run's cost is the work left in it, in forward multiply-adds (``models.forward_macs``): images
still to train, and the evaluations still to come (the whole test set each time, a forward pass
only: about a third of a training image's forward, backward and update). One short measured training step of the cheapest net turns cost
into seconds on this device; every other net is scaled by its multiply-adds. That is rough
(small nets are dominated by overheads, a GPU's compiled and graphed step is faster than the
eager step measured here) but it tells hours from days. While a sweep runs, the finished runs'
wall times give a better rate, so the ETA of the runs left weighs each by its cost.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from .files import RESULT, read_result

# A sweep on a CPU longer than this is told about the quick ways to see the result.
LONG_ON_A_CPU_S = 3600
WORTH_SAYING_S = 60  # a shorter run's cost goes without saying
CIFAR10_TEST_IMAGES = 10_000  # the evaluation set when the config does not size it
TIMED_STEPS = 2  # after one untimed step


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
    """Seconds per forward multiply-add of training, from a few eager steps of ``cfg``'s net here."""
    import torch

    from .models import build_model_for
    from .train import TrainStep, autocast, configure_backend, make_optimizer, resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backend(device)
    model = build_model_for(cfg).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.schedule, device)
    step = TrainStep(model, optimizer, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                     autocast(device, precision))
    batch = cfg.schedule.batch_size
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        loss, _ = step(x, y)
    float(loss)  # waits for the device
    seconds = (time.perf_counter() - start) / TIMED_STEPS
    return seconds / (macs_per_image(cfg) * batch)


def cost_line(configs: list[DictConfig], costs: list[float], parallel: int = 1) -> str | None:
    """One line: the estimated wall time of the runs ahead on this device, or None when there is little left.

    ``parallel``: GPUs the runs are spread over (runs sharing one GPU, or the CPU, are not faster together).
    """
    from .status import format_duration

    left = [(cfg, cost) for cfg, cost in zip(configs, costs) if cost > 0]
    if not left:
        return None
    cheapest = min((cfg for cfg, _ in left), key=lambda cfg: macs_per_image(cfg) * cfg.schedule.batch_size)
    rate = seconds_per_cost(cheapest)
    seconds = rate * sum(cost for _, cost in left) / max(1, parallel)
    import torch

    from .train import resolve_device

    if seconds < WORTH_SAYING_S:
        return None
    device = resolve_device(cheapest.device)
    where = f"this GPU ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "this CPU"
    runs = f"{len(left)} run{'s' if len(left) != 1 else ''}"
    line = (f"estimated wall time: about {format_duration(seconds)} for {runs} on {where} "
            f"(from a measured step of {cheapest.arch}-{cheapest.depth}, scaled by each net's multiply-adds)")
    if device.type != "cuda" and seconds > LONG_ON_A_CPU_S:
        line += ("; for a first look on a CPU, resexp sweep experiment=laptop shows the degradation in about "
                 "10 minutes (or add schedule=quick: 1/32 of the paper's iterations); this run goes on")
    return line


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
