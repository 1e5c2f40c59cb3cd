"""``resexp bench``: training throughput of resexp's step against the usual CIFAR-10 pipeline.

Both pipelines train the same network on the same images, in one process:

resexp     batches built on the training device by ``TrainBatches`` (one gather per batch, no
           workers), the model in channels_last, ``TrainStep`` with the precision and compile
           choices of ``resexp train``, and the per-step statistics the training loop keeps.
reference  what the common CIFAR-10 reproductions run: a ``torchvision.datasets.CIFAR10``-style
           dataset that makes a PIL image per item, ``RandomCrop(32, padding=4)``,
           ``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize`` in ``DataLoader`` workers,
           the model in fp32 and NCHW, ``torch.optim.SGD``, and ``loss.item()`` every step.

Each pipeline is built and runs ``warmup`` untimed steps (the first one timed on its own: it
compiles, starts workers), then the two take turns at timed windows of ``steps`` steps, so that
a change in the machine's load hits both alike; the figures are medians over ``windows``
windows. CUDA is synchronised only at window ends, so a pipeline waits for the GPU only where it
does so itself (as ``loss.item()`` does).

After the windows, ``gradient_norms`` (what the trainer logs once per evaluation) is timed on
resexp's model right after a training step, and set against the step time and the evaluation
intervals of the paper and quick schedules.

``measure=memory`` times nothing: it counts, for one net, batch and precision, the bytes of the
parameter state (weights, gradients, momentum) and of the tensors autograd saves for backward in
one training forward pass, and on CUDA the peak memory of a training step.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .errors import UsageError
from .models import forward_macs
from .train import usable_cores

USAGE = """\
usage: resexp bench [KEY=VALUE ...]

Measure steady-state training throughput (images/s) of resexp's training step and of the
usual torchvision DataLoader pipeline on the same net, and the time of the per-layer gradient
norms the trainer logs; with measure=memory, count the net's training memory instead. Write a
JSON record.

keys (default):
  arch (resnet)  depth (20)  batch_size (128)       the net and the mini-batch
  device (auto)  precision (auto)  compile (auto)   as in resexp train
  cuda_graph (auto)                                 as in resexp train: one CUDA graph per step on a GPU
  steps (50)  warmup (10)  windows (5)              timed windows of `steps` steps after `warmup` steps
  data (synthetic)  data.root  data.train_size      synthetic | imagefolder | cifar10 (no download)
  workers (min(4, cores))                           DataLoader workers of the reference pipeline
  reference (true)                                  false: measure resexp only
  threads (the usable cores)                        CPU threads of the main process, for both pipelines
  seed (0)  json (outputs/bench/<arch>-<depth>-b<batch>-<device>.json)
  measure (throughput)                              throughput | memory. memory times nothing: it counts the
                                                    bytes of weights, gradients and momentum and of what autograd
                                                    saves for backward in one training forward pass at this
                                                    batch_size and precision, and on CUDA the peak memory of a
                                                    training step (json: outputs/bench/memory-<arch>-<depth>-
                                                    b<batch>-<precision>-<device>.json; data keys unused)
"""

DATA_CHOICES = ("synthetic", "imagefolder", "cifar10")
MEASURE_CHOICES = ("throughput", "memory")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
BOOLEAN_WORDS = {"true": True, "false": False}
SYNTHETIC_TRAIN_IMAGES = 50_000  # as many as CIFAR-10, so epochs (and the reference's reshuffles) come as often
UNSTEADY_SPREAD = 1.3  # fastest / slowest window above this: the machine's load changed during the run
SGD = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=1e-4)  # the paper's recipe, for both pipelines
GRAD_NORM_CALLS = 5  # timed gradient_norms calls, each right after its own training step
LOGGED_SCHEDULES = ("paper", "quick")  # schedules whose eval_every the gradient-norm overhead is given for

# The normalisation constants the common CIFAR-10 scripts use (any values cost the same).
REFERENCE_MEAN = (0.4914, 0.4822, 0.4465)
REFERENCE_STD = (0.2470, 0.2435, 0.2616)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against the CUDA device name in order.
BF16_DENSE_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)


# --- arguments ----------------------------------------------------------------------------------

@dataclass
class BenchSettings:
    arch: str = "resnet"
    depth: int = 20
    batch_size: int = 128
    device: str = "auto"
    precision: str = "auto"
    compile: str | bool = "auto"  # "auto", True or False, as resolve_compile takes it
    cuda_graph: str | bool = "auto"  # "auto", True or False, as resolve_cuda_graph takes it
    steps: int = 50
    warmup: int = 10
    windows: int = 5
    data: str = "synthetic"
    data_root: str | None = None
    train_size: int | None = None
    workers: int = field(default_factory=lambda: min(4, usable_cores()))
    reference: bool = True
    threads: int | None = None  # CPU threads of the main process; None: as resexp train sets them
    seed: int = 0
    json: str | None = None
    measure: str = "throughput"


def parse_arguments(args: list[str]) -> BenchSettings:
    """``key=value`` arguments into settings; anything unknown or malformed is a UsageError."""
    settings = BenchSettings()
    seen: set[str] = set()
    for arg in args:
        key, equals, value = arg.partition("=")
        if not equals or not key:
            raise UsageError(f"resexp bench takes key=value arguments; got {arg!r} ('resexp bench --help' lists the keys)")
        if key in seen:
            raise UsageError(f"{key} is given twice; give each key once")
        seen.add(key)
        if key not in PARSERS:
            raise UsageError(f"unknown key {key!r}; resexp bench takes {', '.join(PARSERS)}")
        attribute, parse = PARSERS[key]
        setattr(settings, attribute, parse(key, value))
    if settings.data in ("imagefolder", "cifar10") and settings.data_root is None:
        raise UsageError(f"data={settings.data} needs data.root=<folder>")
    return settings


def _whole_number(minimum: int) -> Callable[[str, str], int]:
    def parse(key: str, value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise UsageError(f"{key}={value} is not allowed: use a whole number >= {minimum}")
        return number
    return parse


def _optional_whole_number(key: str, value: str) -> int | None:
    return None if value.lower() in ("null", "none") else _whole_number(1)(key, value)


def _choice(allowed: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(key: str, value: str) -> str:
        if value not in allowed:
            raise UsageError(f"{key}={value} is not allowed: use one of {', '.join(allowed)}")
        return value
    return parse


def _boolean(key: str, value: str) -> bool:
    if value.lower() not in BOOLEAN_WORDS:
        raise UsageError(f"{key}={value} is not allowed: use true or false")
    return BOOLEAN_WORDS[value.lower()]


def _auto_or_boolean(key: str, value: str) -> str | bool:
    if value == "auto":
        return "auto"
    if value.lower() not in BOOLEAN_WORDS:
        raise UsageError(f"{key}={value} is not allowed: use auto, true or false")
    return BOOLEAN_WORDS[value.lower()]


def _arch(key: str, value: str) -> str:
    from .models import ARCHS

    return _choice(ARCHS)(key, value)


def _depth(key: str, value: str) -> int:
    from .models import blocks_per_stage

    depth = _whole_number(1)(key, value)
    blocks_per_stage(depth)  # the CIFAR nets exist for 6n+2 layers only
    return depth


def _text(key: str, value: str) -> str:
    if not value:
        raise UsageError(f"{key} is empty: give a path")
    return value


PARSERS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "arch": ("arch", _arch),
    "depth": ("depth", _depth),
    "batch_size": ("batch_size", _whole_number(1)),
    "device": ("device", _choice(DEVICE_CHOICES)),
    "precision": ("precision", _choice(PRECISION_CHOICES)),
    "compile": ("compile", _auto_or_boolean),
    "cuda_graph": ("cuda_graph", _auto_or_boolean),
    "steps": ("steps", _whole_number(1)),
    "warmup": ("warmup", _whole_number(1)),  # the first step is always a warm-up step (compile, workers)
    "windows": ("windows", _whole_number(1)),
    "data": ("data", _choice(DATA_CHOICES)),
    "data.root": ("data_root", _text),
    "data.train_size": ("train_size", _optional_whole_number),
    "workers": ("workers", _whole_number(0)),
    "reference": ("reference", _boolean),
    "threads": ("threads", _optional_whole_number),
    "seed": ("seed", _whole_number(0)),
    "json": ("json", _text),
    "measure": ("measure", _choice(MEASURE_CHOICES)),
}


# --- what the hardware does -------------------------------------------------------------------

def training_tflops(macs_per_image: int, images_per_s: float) -> float:
    """Achieved TFLOP/s: 2 FLOPs per multiply-add, and forward + backward ~ 3x the forward pass."""
    return 3 * 2 * macs_per_image * images_per_s / 1e12


def bf16_peak_tflops(device_name: str) -> float | None:
    for name, peak in BF16_DENSE_PEAK_TFLOPS:
        if name in device_name:
            return peak
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux lets a process reset its peak RSS, which getrusage then reports from here on;
    # elsewhere the figure stays the process's peak since it started.
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def memory_kind(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the main process"


# --- timing -------------------------------------------------------------------------------------

@dataclass
class Pipeline:
    """One way of training the net: its step, what it is, and what was measured of it."""

    name: str
    one_step: Callable[[], None]
    description: dict
    close: Callable[[], None] = lambda: None
    model: nn.Module | None = None  # the trained net, where something besides the step looks at it
    first_step_s: float = 0.0
    peak_memory_mb: float = 0.0
    window_s: list[float] = field(default_factory=list)


def memory_held(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def prepare(build: Callable[[], Pipeline], settings: BenchSettings, device: torch.device) -> Pipeline:
    """Build a pipeline and run its warm-up steps, timing the first one; then record the peak memory
    of one steady-state step.

    The peak is reset after the warm-up: cuDNN's and Triton's autotuning workspaces and the CUDA
    graph's capture are one-off costs, not what training holds step after step. On CUDA, memory
    that an earlier pipeline still holds is not counted.
    """
    held_before = memory_held(device)
    pipeline = build()
    try:
        start = time.perf_counter()
        pipeline.one_step()
        synchronize(device)
        pipeline.first_step_s = time.perf_counter() - start
        for _ in range(settings.warmup - 1):
            pipeline.one_step()
        synchronize(device)
        reset_peak_memory(device)
        pipeline.one_step()
        synchronize(device)
    except BaseException:
        pipeline.close()
        raise
    pipeline.peak_memory_mb = peak_memory_mb(device) - held_before / 2**20
    return pipeline


def time_window(pipeline: Pipeline, steps: int, device: torch.device) -> None:
    start = time.perf_counter()
    for _ in range(steps):
        pipeline.one_step()
    synchronize(device)
    pipeline.window_s.append(time.perf_counter() - start)


def summarize(pipeline: Pipeline, settings: BenchSettings, macs_per_image: int, peak_tflops: float | None,
              device: torch.device) -> dict:
    images_per_window = settings.batch_size * settings.steps
    median_s = statistics.median(pipeline.window_s)
    images_per_s = images_per_window / median_s
    step_s = median_s / settings.steps
    tflops = training_tflops(macs_per_image, images_per_s)
    compiled = pipeline.description.get("compile")
    return {
        **pipeline.description,
        "images_per_s": round(images_per_s, 2),
        "ms_per_step": round(1000 * step_s, 3),
        "window_images_per_s": [round(images_per_window / s, 2) for s in pipeline.window_s],
        "first_step_s": round(pipeline.first_step_s, 4),
        # The first step compiles (or captures); what it takes beyond a steady step is that cost.
        "compile_s": round(max(0.0, pipeline.first_step_s - step_s), 4) if compiled else None,
        "peak_memory_mb": round(pipeline.peak_memory_mb, 1),
        "peak_memory_kind": memory_kind(device),
        "achieved_tflops": round(tflops, 5),
        "bf16_peak_fraction": round(tflops / peak_tflops, 5) if peak_tflops else None,
    }


def significant(value: float, digits: int = 4) -> float:
    """Round to significant digits: the overhead fractions are far below what fixed decimals keep."""
    return float(f"{value:.{digits}g}")


def time_gradient_norms(pipeline: Pipeline, device: torch.device, calls: int = GRAD_NORM_CALLS) -> list[float]:
    """Seconds of ``gradient_norms(model)`` right after a training step, as the trainer calls it."""
    from .models import gradient_norms

    seconds = []
    for _ in range(calls):
        pipeline.one_step()  # fresh gradients, and caches in the state a step leaves them
        synchronize(device)  # so that the timer sees the norms, not the step's queued GPU work
        start = time.perf_counter()
        gradient_norms(pipeline.model)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def paper_iterations() -> int:
    """``schedule.iterations`` of the paper's schedule, from the config ``resexp train`` composes."""
    from .config import compose

    return int(compose([]).schedule.iterations)


def eval_intervals(schedules: tuple[str, ...] = LOGGED_SCHEDULES) -> dict[str, int]:
    """``schedule.eval_every`` of each schedule, from the configs ``resexp train`` composes."""
    from .config import compose

    return {name: int(compose([f"schedule={name}"]).schedule.eval_every) for name in schedules}


def gradient_norm_figures(call_s: list[float], step_ms: float, intervals: dict[str, int]) -> dict:
    """The gradient-norm time against one step, and spread over the steps between two evaluations."""
    median_ms = 1000 * statistics.median(call_s)
    return {
        "median_ms": round(median_ms, 4),
        "call_ms": [round(1000 * s, 4) for s in call_s],
        "step_ms": step_ms,
        "fraction_of_step": significant(median_ms / step_ms),
        # Logged once per evaluation: the cost per training step is median / (eval_every x step).
        "overhead_per_step": {name: {"eval_every": every, "fraction": significant(median_ms / (every * step_ms))}
                              for name, every in intervals.items()},
    }


# --- the two pipelines --------------------------------------------------------------------------

def resexp_pipeline(data, settings: BenchSettings, device: torch.device, precision: str,
                    compile_model: bool, cuda_graph: bool) -> Pipeline:
    """resexp's training step, built as ``train.train`` builds it."""
    from .data import TrainBatches, pixel_mean
    from .models import build_model
    from .train import autocast, learning_rate_tensor, make_optimizer, make_train_step

    images = data.train_images.to(device)
    labels = data.train_labels.to(device)
    mean = pixel_mean(data.train_images).to(device)
    batches = TrainBatches(images, labels, settings.batch_size, settings.seed, mean)
    torch.manual_seed(settings.seed)
    model = build_model(settings.arch, settings.depth, num_classes=len(data.classes))
    model = model.to(device, memory_format=torch.channels_last)
    lr = learning_rate_tensor(SGD.lr, device)
    optimizer = make_optimizer(model, SGD, device, lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = make_train_step(model, optimizer, scaler, autocast(device, precision), compile=compile_model,
                           cuda_graph=cuda_graph)
    step_stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, errors, images: kept per step
    batch_images = torch.tensor(float(settings.batch_size), dtype=torch.float64, device=device)
    iteration = 0
    model.train()

    def one_step() -> None:
        nonlocal iteration
        lr.fill_(SGD.lr)  # the training loop sets the scheduled rate every iteration
        x, y = batches.batch(iteration)
        loss, wrong = step(x.contiguous(memory_format=torch.channels_last), y)
        step_stats.add_(torch.stack([loss.double() * len(y), wrong.double(), batch_images]))
        iteration += 1

    return Pipeline("resexp", one_step, {
        "precision": precision, "compile": compile_model, "cuda_graph": cuda_graph, "memory_format": "channels_last",
        "data_pipeline": "TrainBatches on the training device",
    }, model=model)


class PILImageDataset(torch.utils.data.Dataset):
    """Like ``torchvision.datasets.CIFAR10``: uint8 HWC images in memory, a PIL image made per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # NCHW tensor -> NHWC array
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def reference_loader(data, settings: BenchSettings, device: torch.device) -> torch.utils.data.DataLoader:
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(REFERENCE_MEAN, REFERENCE_STD),
    ])
    dataset = PILImageDataset(data.train_images, data.train_labels, transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=settings.batch_size, shuffle=True, drop_last=True, num_workers=settings.workers,
        persistent_workers=settings.workers > 0, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(settings.seed),
    )


def reference_pipeline(data, settings: BenchSettings, device: torch.device) -> Pipeline:
    """The common reproductions' loop: DataLoader batches, fp32 NCHW model, plain SGD, loss.item()."""
    from .models import build_model

    loader = reference_loader(data, settings, device)

    def endless_batches():
        while True:  # persistent workers carry over from one epoch to the next
            yield from loader

    batches = endless_batches()
    torch.manual_seed(settings.seed)
    model = build_model(settings.arch, settings.depth, num_classes=len(data.classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD.lr, momentum=SGD.momentum,
                                weight_decay=SGD.weight_decay)
    criterion = nn.CrossEntropyLoss()
    running_loss = 0.0
    model.train()

    def one_step() -> None:
        nonlocal running_loss
        inputs, targets = next(batches)
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()

    def close() -> None:
        batches.close()  # drops the loader's iterator, which stops the workers
        gc.collect()

    return Pipeline("reference", one_step, {
        "precision": "fp32", "compile": False, "memory_format": "contiguous (NCHW)",
        "data_pipeline": f"DataLoader, {settings.workers} workers, PIL transforms",
    }, close)


# --- memory (measure=memory) --------------------------------------------------------------------

STATE_STEP_BATCH = 2  # off CUDA, the steps that make the gradients and momentum need not be full-sized


def parameter_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the weights, their gradients and SGD's momentum buffers, after a training step.

    Autocast keeps all three in the weights' own dtype (fp32) whatever the precision.
    """
    def size(tensors) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)

    parameters = list(model.parameters())
    figures = {
        "parameter_bytes": size(parameters),
        "gradient_bytes": size(p.grad for p in parameters),
        "momentum_bytes": size(state.get("momentum_buffer") for state in optimizer.state.values()),
    }
    return {**figures, "parameter_state_bytes": sum(figures.values())}


def saved_for_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp) -> dict[str, int]:
    """Bytes autograd keeps for backward in one training forward pass, by dtype.

    Each storage counts once (a ReLU's output is also the next convolution's input). The
    weights and BN buffers are left out: the parameter state holds them already. Autocast's
    low-precision copies of the weights are new tensors, so they count.
    """
    held = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    seen: dict[int, tuple[str, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            seen.setdefault(storage.data_ptr(), (str(tensor.dtype).removeprefix("torch."), storage.nbytes()))
        return tensor  # the graph keeps it alive, so no other storage takes its address during the pass

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), amp:
        loss = F.cross_entropy(model(x).float(), y)  # as TrainStep computes it
    del loss  # the graph, and what it saved, go with it
    by_dtype: dict[str, int] = {}
    for dtype, nbytes in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return by_dtype


def run_memory(settings: BenchSettings) -> dict:
    """Count the memory of one net's training at one batch size and precision; return the record."""
    from .models import build_model, count_parameters
    from .train import (TrainStep, autocast, configure_backend, make_optimizer, resolve_compile, resolve_device,
                        resolve_precision)

    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    on_cuda = device.type == "cuda"
    compile_model = resolve_compile(settings.compile, device) and on_cuda  # off CUDA no step is measured
    configure_backend(device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    load_average_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    def random_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The bytes depend on shapes only, so random images do.
        x = torch.randn(size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, 10, (size,), device=device)

    torch.manual_seed(settings.seed)
    model = build_model(settings.arch, settings.depth).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, SGD, device)
    amp = autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = TrainStep(model, optimizer, scaler, amp, compile=compile_model)
    try:
        x, y = random_batch(settings.batch_size if on_cuda else STATE_STEP_BATCH)
        for _ in range(2):  # the first step also makes the momentum buffers (and, on CUDA, tries kernels)
            step(x, y)
        synchronize(device)
        if on_cuda:  # the steady state: a step after those, without the autotuners' one-off workspaces
            torch.cuda.reset_peak_memory_stats(device)
            step(x, y)
            synchronize(device)
        cuda_peak = torch.cuda.max_memory_allocated(device) if on_cuda else None
        state = parameter_state(model, optimizer)
        del x, y
        x, y = random_batch(settings.batch_size)
        start = time.perf_counter()
        saved = saved_for_backward(model, x, y, amp)
        synchronize(device)
        forward_s = time.perf_counter() - start
    except torch.OutOfMemoryError as error:
        raise UsageError(f"out of GPU memory at batch_size={settings.batch_size}; use a smaller batch_size") from error

    saved_bytes = sum(saved.values())
    return {
        "measure": "memory",
        "memory": {
            **state,
            "saved_activation_bytes": saved_bytes,
            "saved_activation_bytes_by_dtype": saved,
            "saved_activation_bytes_per_image": round(saved_bytes / settings.batch_size),
            # An estimate, not a peak: a step also holds activation gradients, kernel workspaces
            # and the allocator's slack, and on a GPU the CUDA context besides.
            "estimate_bytes": state["parameter_state_bytes"] + saved_bytes,
            "cuda_peak_bytes": cuda_peak,
            "cuda_peak_kind": "torch.cuda.max_memory_allocated over a steady-state training step"
                              if on_cuda else None,
            "forward_s": round(forward_s, 2),
        },
        "model": {"arch": settings.arch, "depth": settings.depth, "parameters": count_parameters(model)},
        "settings": {**asdict(settings), "device": device.type, "precision": precision, "compile": compile_model},
        "environment": environment_record(device, torch.cuda.get_device_name(device) if on_cuda else cpu_model(),
                                          None, load_average_start),
    }


# --- the command --------------------------------------------------------------------------------

def load_images(settings: BenchSettings):
    from .data import load_data

    synthetic = settings.data == "synthetic"
    train_size = settings.train_size
    if synthetic and train_size is None:
        train_size = SYNTHETIC_TRAIN_IMAGES
    data = load_data(settings.data, settings.data_root, train_size=train_size,
                     test_size=10 if synthetic else None, download=False, seed=settings.seed)
    if settings.batch_size > len(data.train_images):
        raise UsageError(f"batch_size={settings.batch_size} is larger than the training set "
                         f"({len(data.train_images)} images): use at most {len(data.train_images)}")
    return data


def default_json_path(settings: BenchSettings, device: torch.device, precision: str) -> Path:
    name = f"{settings.arch}-{settings.depth}-b{settings.batch_size}"
    if settings.measure == "memory":  # one record per precision: they are compared side by side
        return Path("outputs") / "bench" / f"memory-{name}-{precision}-{device.type}.json"
    return Path("outputs") / "bench" / f"{name}-{device.type}.json"


def run_bench(settings: BenchSettings) -> dict:
    """Measure both pipelines and return the record that ``bench_command`` writes."""
    from .models import build_model, count_parameters
    from .train import configure_backend, resolve_compile, resolve_cuda_graph, resolve_device, resolve_precision

    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    # compile=auto as resexp train decides it for the paper's schedule (the run a user times).
    compile_model = resolve_compile(settings.compile, device, paper_iterations())
    cuda_graph = resolve_cuda_graph(settings.cuda_graph, device, precision)
    configure_backend(device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    load_average_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    data = load_images(settings)
    counting_model = build_model(settings.arch, settings.depth, num_classes=len(data.classes))
    macs_per_image = forward_macs(counting_model, tuple(data.train_images.shape[1:]))
    parameters = count_parameters(counting_model)
    del counting_model

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    peak_tflops = bf16_peak_tflops(device_name) if device.type == "cuda" else None

    pipelines: list[Pipeline] = []
    try:
        pipelines.append(prepare(lambda: resexp_pipeline(data, settings, device, precision, compile_model, cuda_graph),
                                 settings, device))
        if settings.reference:
            pipelines.append(prepare(lambda: reference_pipeline(data, settings, device), settings, device))
        for _ in range(settings.windows):
            for pipeline in pipelines:  # alternate windows, so a change in the machine's load hits both alike
                time_window(pipeline, settings.steps, device)
        grad_norm_s = time_gradient_norms(pipelines[0], device)
    except torch.OutOfMemoryError as error:
        raise UsageError(f"out of GPU memory at batch_size={settings.batch_size}; use a smaller batch_size") from error
    finally:
        for pipeline in pipelines:
            pipeline.close()
    figures = {pipeline.name: summarize(pipeline, settings, macs_per_image, peak_tflops, device)
               for pipeline in pipelines}
    resexp, reference = figures["resexp"], figures.get("reference")
    grad_norms = gradient_norm_figures(grad_norm_s, resexp["ms_per_step"], eval_intervals())

    reference_images_per_s = reference["images_per_s"] if reference else None
    window_ratios = [round(r / p, 3) for r, p in zip(resexp["window_images_per_s"],
                                                     reference["window_images_per_s"])] if reference else None
    return {
        "resexp_images_per_s": resexp["images_per_s"],
        "reference_images_per_s": reference_images_per_s,
        "ratio": round(resexp["images_per_s"] / reference_images_per_s, 3) if reference else None,
        # Each resexp window against the reference window right after it: under a changing load
        # the median of these is steadier than the ratio of the two medians.
        "window_ratios": window_ratios,
        "window_ratio_median": round(statistics.median(window_ratios), 3) if reference else None,
        "resexp": resexp,
        "reference": reference,
        "grad_norms": grad_norms,
        "measure": "throughput",
        "model": {"arch": settings.arch, "depth": settings.depth, "parameters": parameters,
                  "forward_macs_per_image": macs_per_image},
        "settings": {**asdict(settings), "device": device.type, "precision": precision, "compile": compile_model,
                     "cuda_graph": cuda_graph, "train_images": len(data.train_images)},
        "environment": environment_record(device, device_name, peak_tflops, load_average_start),
    }


def environment_record(device: torch.device, device_name: str, peak_tflops: float | None,
                       load_average_start) -> dict:
    import torchvision

    return {
        "device": device.type,
        "device_name": device_name,
        "bf16_dense_peak_tflops": peak_tflops,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "load_average_start": list(load_average_start) if load_average_start else None,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_table(record: dict) -> str:
    environment, model, settings = record["environment"], record["model"], record["settings"]
    lines = [
        f"{model['arch']}-{model['depth']}, batch {settings['batch_size']}, {environment['device']} "
        f"({environment['device_name']}, {environment['usable_cores']} cores, {environment['torch_threads']} threads), "
        f"torch {environment['torch']}",
        f"forward pass: {model['forward_macs_per_image'] / 1e6:.1f} M multiply-adds per image; "
        f"{settings['warmup']} warm-up steps, then the median of {settings['windows']} windows "
        f"of {settings['steps']} steps (the pipelines take turns)",
        "",
        f"{'pipeline':<12}{'images/s':>10}{'ms/step':>10}{'peak MiB':>10}{'1st step s':>12}{'TFLOP/s':>10}",
    ]
    pipelines = [(label, figures) for label, figures in (("resexp", record["resexp"]), ("reference", record["reference"]))
                 if figures is not None]
    for label, figures in pipelines:
        lines.append(f"{label:<12}{figures['images_per_s']:>10.1f}{figures['ms_per_step']:>10.1f}"
                     f"{figures['peak_memory_mb']:>10.0f}{figures['first_step_s']:>12.2f}"
                     f"{figures['achieved_tflops']:>10.3f}")
    lines.append("")
    for label, figures in pipelines:
        compiled = (", compiled" if figures["compile"] else "") + (", CUDA graph" if figures.get("cuda_graph") else "")
        lines.append(f"{label}: {figures['precision']}{compiled}, {figures['memory_format']}, "
                     f"{figures['data_pipeline']}")
    if record["ratio"] is not None:
        lines.append(f"resexp / reference: {record['ratio']:.2f}x; window by window "
                     f"{', '.join(f'{r:.2f}' for r in record['window_ratios'])} "
                     f"(median {record['window_ratio_median']:.2f}x)")
    for label, figures in pipelines:
        slowest, fastest = min(figures["window_images_per_s"]), max(figures["window_images_per_s"])
        if fastest > UNSTEADY_SPREAD * slowest:
            lines.append(f"warning: {label} ran between {slowest:.0f} and {fastest:.0f} images/s from window to "
                         "window: something else is using the machine; the window-by-window ratio is the fairer "
                         "comparison, and a quiet machine gives steadier figures")
            break
    if record["resexp"]["compile_s"] is not None:
        lines.append(f"compile time (first step minus a steady one): {record['resexp']['compile_s']:.1f} s")
    if record["resexp"]["bf16_peak_fraction"] is not None:
        lines.append(f"resexp reaches {100 * record['resexp']['bf16_peak_fraction']:.1f}% of the bf16 dense peak "
                     f"({environment['bf16_dense_peak_tflops']:.0f} TFLOP/s)")
    lines.append(f"peak memory: {record['resexp']['peak_memory_kind']}")
    grad_norms = record["grad_norms"]
    overheads = ", ".join(f"{100 * figures['fraction']:.2g}% at eval_every={figures['eval_every']} ({name})"
                          for name, figures in grad_norms["overhead_per_step"].items())
    lines.append(f"gradient norms (logged at each evaluation): {grad_norms['median_ms']:.2f} ms after a step "
                 f"(median of {len(grad_norms['call_ms'])}), {100 * grad_norms['fraction_of_step']:.2g}% of a step")
    lines.append(f"  spread over the steps between evaluations: {overheads} per step")
    lines.append(load_line(environment))
    return "\n".join(line for line in lines if line is not None)


def load_line(environment: dict) -> str | None:
    load = environment["load_average_start"]
    if not load:
        return None
    return f"load average (1 min) at start {load[0]:.2f}, at end {environment['load_average_end'][0]:.2f}"


def format_memory_table(record: dict) -> str:
    environment, model, settings, memory = record["environment"], record["model"], record["settings"], record["memory"]

    def mib(nbytes: int) -> str:
        return f"{nbytes / 2**20:>10.1f}"

    by_dtype = ", ".join(f"{dtype} {nbytes / 2**20:.1f}"
                         for dtype, nbytes in memory["saved_activation_bytes_by_dtype"].items())
    if memory["cuda_peak_bytes"] is not None:
        peak = f"{mib(memory['cuda_peak_bytes'])}   {memory['cuda_peak_kind']}"
    else:
        peak = f"{'-':>10}   not measured: no CUDA device ({environment['device']})"
    lines = [
        f"{model['arch']}-{model['depth']}, batch {settings['batch_size']}, {settings['precision']}, "
        f"{environment['device']} ({environment['device_name']}, {environment['torch_threads']} threads), "
        f"torch {environment['torch']}; {model['parameters'] / 1e6:.2f} M parameters",
        "",
        f"{'':<40}{'MiB':>10}",
        f"{'weights + gradients + momentum':<40}{mib(memory['parameter_state_bytes'])}   "
        f"weights {memory['parameter_bytes'] / 2**20:.1f}, gradients {memory['gradient_bytes'] / 2**20:.1f}, "
        f"momentum {memory['momentum_bytes'] / 2**20:.1f}",
        f"{'saved for backward, one forward':<40}{mib(memory['saved_activation_bytes'])}   "
        f"{by_dtype}; {memory['saved_activation_bytes_per_image'] / 2**20:.2f} MiB per image",
        f"{'estimate: the two together':<40}{mib(memory['estimate_bytes'])}   "
        "not a peak: a step also holds activation gradients, workspaces, allocator slack",
        f"{'peak of a training step':<40}{peak}",
        "",
        f"the forward pass with the counting hooks took {memory['forward_s']:.1f} s",
        load_line(environment),
    ]
    return "\n".join(line for line in lines if line is not None)


def bench_command(args: list[str]) -> int:
    from .files import atomic_write_json, unwritable_reason

    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return 0
    settings = parse_arguments(args)
    if settings.json and unwritable_reason(settings.json):
        raise UsageError(f"json={settings.json} cannot be written: {unwritable_reason(settings.json)}; "
                         "give a file path in a folder that exists or can be made")
    memory = settings.measure == "memory"
    record = run_memory(settings) if memory else run_bench(settings)
    path = Path(settings.json) if settings.json else default_json_path(
        settings, torch.device(record["settings"]["device"]), record["settings"]["precision"])
    atomic_write_json(path, record)
    print(format_memory_table(record) if memory else format_table(record))
    print(f"record: {path}")
    return 0
