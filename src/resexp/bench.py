"""``resexp bench``: training throughput of resexp's step against the usual CIFAR-10 pipeline.

Both pipelines train the same network on the same images, in one process:

resexp     batches built on the training device by ``TrainBatches`` (one gather per batch, no
           workers), the model in channels_last, ``TrainStep`` with the precision and compile
           choices of ``resexp train``, and the per-step statistics the training loop keeps.
reference  what the common CIFAR-10 reproductions run: a ``torchvision.datasets.CIFAR10``-style
           dataset that makes a PIL image per item, ``RandomCrop(32, padding=4)``,
           ``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize`` in ``DataLoader`` workers,
           the model in fp32 and NCHW, ``torch.optim.SGD``, and ``loss.item()`` every step.

The settings are ``resexp train``'s config with conf/bench.yaml on top: the same keys for the
net, device, precision, compile, batch size (``schedule.batch_size``), SGD recipe and data, and
the measurement's own under ``bench.`` (``bench.steps``, ``bench.warmup``, ``bench.windows``, ...).

Each pipeline is built and runs ``bench.warmup`` untimed steps (the first one timed on its own: it
compiles, starts workers), then the two take turns at timed windows of ``bench.steps`` steps, so
that a change in the machine's load hits both alike; the figures are medians over
``bench.windows`` windows. CUDA is synchronised only at window ends, so a pipeline waits for the
GPU only where it does so itself (as ``loss.item()`` does).

After the windows, ``gradient_norms`` (what the trainer logs once per evaluation) is timed on
resexp's model right after a training step, and set against the step time and the evaluation
intervals of the paper and quick schedules.

``bench.measure=memory`` times nothing: it counts, for one net, batch and precision, the bytes of
the parameter state (weights, gradients, momentum) and of the tensors autograd saves for backward
in one training forward pass, and on CUDA the peak memory of a training step.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from .errors import UsageError
from .step import caused_by_out_of_memory
from .models import forward_macs
from .machine import usable_cores

USAGE = """\
usage: resexp bench [KEY=VALUE ...]

Measure steady-state training throughput (images/s) of resexp's training step and of the
usual torchvision DataLoader pipeline on the same net and images, and the time of the per-layer
gradient norms the trainer logs; with bench.measure=memory, count the net's training memory
instead. Print a table and write a JSON record. The keys are resexp train's, plus bench.*."""

# The main options of the help page: (key, meaning). Each default is read from the composed
# config (conf/bench.yaml on top of resexp train's), so the page cannot drift from it.
HELP_OPTIONS = (
    ("arch", "plain | resnet"),
    ("depth", "weighted layers, 6n+2: 20, 32, 44, 56, 110, 1202, ..."),
    ("schedule.batch_size", "the mini-batch of both pipelines"),
    ("device", "auto (cuda if there is one) | cpu | cuda"),
    ("precision", "auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32"),
    ("compile", "auto (as resexp train for the schedule's length) | true | false"),
    ("cuda_graph", "auto (on a GPU, unless fp16) | true | false: a step is one CUDA graph"),
    ("data", "synthetic (generated) | imagefolder | cifar10: both pipelines' images"),
    ("data.root", "the images' folder (imagefolder: train/<class>/, test/<class>/)"),
    ("data.train_size", "training images: as many as CIFAR-10's (null: all of data.root's)"),
    ("seed", "initialisation and data order of both pipelines"),
    ("bench.steps", "steps in each timed window"),
    ("bench.warmup", "untimed steps first; the first one is timed alone (compiling, workers)"),
    ("bench.windows", "timed windows per pipeline, taken in turns; figures are their medians"),
    ("bench.reference", "false: time resexp's step only"),
    ("bench.workers", "DataLoader workers of the reference pipeline (null: min(4, cores))"),
    ("bench.threads", "CPU threads of the main process (null: as resexp train sets them)"),
    ("bench.measure", "throughput | memory: the bytes of weights, gradients, momentum and"),
    ("", "saved activations at this batch and precision, and on CUDA a step's peak"),
    ("bench.json", "the record's path (null: outputs/bench/<run name>-b<batch>-<device>.json,"),
    ("", "the run name as resexp train gives it, e.g. resnet-20-s0-synthetic)"),
)
HELP_EXAMPLES = (
    "resexp bench                                     ResNet-20, batch 128: 10 warm-up steps, 5 windows of 50",
    "resexp bench depth=56 compile=true bench.steps=20 bench.windows=3",
    "resexp bench data=imagefolder data.root=data/cifar10-jpeg bench.reference=false",
    "resexp bench bench.measure=memory depth=1202 precision=bf16",
)

UNSTEADY_SPREAD = 1.3  # fastest / slowest window above this: the machine's load changed during the run
GRAD_NORM_CALLS = 5  # timed gradient_norms calls, each right after its own training step
LOGGED_SCHEDULES = ("paper", "quick")  # schedules whose eval_every the gradient-norm overhead is given for
REFERENCE_WORKERS = 4  # the common scripts' num_workers (bench.workers=null: fewer on a machine with fewer cores)

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


# --- the config ---------------------------------------------------------------------------------

def bench_config(overrides: list[str]) -> DictConfig:
    """``resexp train``'s config with conf/bench.yaml on top, for these overrides; every value checked."""
    from . import config

    check_arguments(overrides)
    cfg = config.compose(overrides, config_name="bench")
    config.check(cfg, config_name="bench")
    return cfg


def check_arguments(overrides: list[str]) -> None:
    """KEY=VALUE arguments, one value per key."""
    from .sweep import check_one_setting, parse_overrides

    for arg in overrides:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):  # ~KEY deletes a key, as in Hydra
            raise UsageError(f"resexp bench takes KEY=VALUE arguments, --help and --cfg job; got {arg!r}")
    check_one_setting(parse_overrides(overrides), "bench")


def reference_workers(cfg: DictConfig) -> int:
    return min(REFERENCE_WORKERS, usable_cores()) if cfg.bench.workers is None else cfg.bench.workers


def help_page() -> str:
    """The --help text, with the defaults of the composed config."""
    cfg = bench_config([])
    rows = [f"  {key + '=':<22}{shown(OmegaConf.select(cfg, key)):<12}{meaning}" if key else f"{'':<36}{meaning}"
            for key, meaning in HELP_OPTIONS]
    return "\n".join([USAGE, "", f"{'options:':<24}{'default':<12}meaning", *rows,
                      f"  {'model.*':<34}the net's options, as in resexp train (model.shortcut=B, ...)", "",
                      "examples:", *(f"  {example}" for example in HELP_EXAMPLES), "",
                      "Every config key can be set the same way: --cfg job prints them all, resolved.",
                      "Errors print one line; HYDRA_FULL_ERROR=1 shows tracebacks."])


def shown(value) -> str:
    """A default as it is typed: a config group by its option's name, true/false, null."""
    if isinstance(value, DictConfig):
        return str(value.name)
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


# --- what the hardware does -------------------------------------------------------------------

def training_tflops(macs_per_image: int, images_per_s: float) -> float:
    """Achieved TFLOP/s: 2 FLOPs per multiply-add, and forward + backward ~ 3x the forward pass."""
    return 3 * 2 * macs_per_image * images_per_s / 1e12


def bf16_peak_tflops(device_name: str) -> float | None:
    for name, peak in BF16_DENSE_PEAK_TFLOPS:
        if name in device_name:
            return peak
    return None


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
        # Reserved, not allocated: a replayed CUDA graph allocates nothing, and its activations live in
        # the graph's private pool, which the allocated figure leaves out.
        return torch.cuda.max_memory_reserved(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return ("torch.cuda.max_memory_reserved over a steady step, after empty_cache: the allocator's segments, "
                "a CUDA graph's private pool included; training images kept on the GPU are left out")
    return "peak RSS of the main process"


# --- timing -------------------------------------------------------------------------------------

@dataclass
class Pipeline:
    """One way of training the net: its step, what it is, and what was measured of it."""

    name: str
    one_step: Callable[[], None]
    description: dict
    close: Callable[[], None] = lambda: None
    model: nn.Module | None = None  # the trained net, where something besides the step looks at it
    resident_bytes: int = 0  # the data set the pipeline keeps on the device: labelled, not counted as the step's
    first_step_s: float = 0.0
    peak_memory_mb: float = 0.0
    window_s: list[float] = field(default_factory=list)


def memory_held(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()  # what the allocator keeps cached but unused is nobody's
    return torch.cuda.memory_reserved(device)


def prepare(build: Callable[[], Pipeline], warmup: int, device: torch.device) -> Pipeline:
    """Build a pipeline and run its warm-up steps, timing the first one; then record the peak memory
    of one steady-state step.

    The peak is reset after the warm-up: cuDNN's and Triton's autotuning workspaces and the CUDA
    graph's capture are one-off costs, not what training holds step after step. On CUDA, memory
    that an earlier pipeline still holds is not counted, nor the data set the pipeline keeps there.
    """
    held_before = memory_held(device)
    pipeline = build()
    try:
        start = time.perf_counter()
        pipeline.one_step()
        synchronize(device)
        pipeline.first_step_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            pipeline.one_step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the warm-up's freed blocks: not what a steady step holds
        reset_peak_memory(device)
        pipeline.one_step()
        synchronize(device)
    except BaseException:
        pipeline.close()
        raise
    pipeline.peak_memory_mb = peak_memory_mb(device) - (held_before + pipeline.resident_bytes) / 2**20
    return pipeline


def time_window(pipeline: Pipeline, steps: int, device: torch.device) -> None:
    start = time.perf_counter()
    for _ in range(steps):
        pipeline.one_step()
    synchronize(device)
    pipeline.window_s.append(time.perf_counter() - start)


def summarize(pipeline: Pipeline, cfg: DictConfig, macs_per_image: int, peak_tflops: float | None,
              device: torch.device) -> dict:
    images_per_window = cfg.schedule.batch_size * cfg.bench.steps
    median_s = statistics.median(pipeline.window_s)
    images_per_s = images_per_window / median_s
    step_s = median_s / cfg.bench.steps
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

def resexp_pipeline(data, cfg: DictConfig, device: torch.device, precision: str,
                    compile_model: bool, cuda_graph: bool) -> Pipeline:
    """resexp's training step, built as ``train.train`` builds it."""
    from .data import TrainBatches, pixel_mean
    from .models import build_model_for
    from .step import autocast, learning_rate_tensor, make_optimizer, make_train_step

    images = data.train_images.to(device)
    labels = data.train_labels.to(device)
    mean = pixel_mean(data.train_images).to(device)
    batches = TrainBatches(images, labels, cfg.schedule.batch_size, cfg.seed, mean,
                           padding=cfg.data.augment.padding, flip=cfg.data.augment.flip)
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, num_classes=len(data.classes))
    model = model.to(device, memory_format=torch.channels_last)
    lr = learning_rate_tensor(cfg.schedule.lr, device)
    optimizer = make_optimizer(model, cfg.schedule, device, lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = make_train_step(model, optimizer, scaler, autocast(device, precision), compile=compile_model,
                           cuda_graph=cuda_graph)
    step_stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, errors, images: kept per step
    batch_images = torch.tensor(float(cfg.schedule.batch_size), dtype=torch.float64, device=device)
    iteration = 0
    model.train()

    def one_step() -> None:
        nonlocal iteration
        lr.fill_(cfg.schedule.lr)  # the training loop sets the scheduled rate every iteration
        x, y = batches.batch(iteration)
        loss, wrong = step(x.contiguous(memory_format=torch.channels_last), y)
        step_stats.add_(torch.stack([loss.double() * len(y), wrong.double(), batch_images]))
        iteration += 1

    resident = images.numel() * images.element_size() + labels.numel() * labels.element_size() \
        if device.type == "cuda" else 0
    return Pipeline("resexp", one_step, {
        "precision": precision, "compile": compile_model, "cuda_graph": cuda_graph, "memory_format": "channels_last",
        "data_pipeline": "TrainBatches on the training device", "data_on_device_mb": round(resident / 2**20, 1),
    }, model=model, resident_bytes=resident)


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


def reference_loader(data, cfg: DictConfig, device: torch.device) -> torch.utils.data.DataLoader:
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(REFERENCE_MEAN, REFERENCE_STD),
    ])
    dataset = PILImageDataset(data.train_images, data.train_labels, transform)
    workers = reference_workers(cfg)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.schedule.batch_size, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def reference_pipeline(data, cfg: DictConfig, device: torch.device) -> Pipeline:
    """The common reproductions' loop: DataLoader batches, fp32 NCHW model, plain SGD, loss.item()."""
    from .models import build_model_for

    loader = reference_loader(data, cfg, device)

    def endless_batches():
        while True:  # persistent workers carry over from one epoch to the next
            yield from loader

    batches = endless_batches()
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, num_classes=len(data.classes)).to(device)
    schedule = cfg.schedule  # the same recipe as resexp's step: the paper's unless the config says otherwise
    optimizer = torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                                weight_decay=schedule.weight_decay)
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
        "data_pipeline": f"DataLoader, {loader.num_workers} workers, PIL transforms",
    }, close)


# --- memory (bench.measure=memory) --------------------------------------------------------------

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


def run_memory(cfg: DictConfig) -> dict:
    """Count the memory of one net's training at one batch size and precision; return the record."""
    from .models import build_model_for, count_parameters
    from .step import TrainStep, autocast, make_optimizer, resolve_compile, resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    on_cuda = device.type == "cuda"
    compile_model = resolve_compile(cfg.compile, device) and on_cuda  # off CUDA no step is measured
    use_threads(cfg, device)
    environment = environment_at_start(device)
    batch_size = cfg.schedule.batch_size

    def random_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The bytes depend on shapes only, so random images do.
        x = torch.randn(size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, 10, (size,), device=device)

    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.schedule, device)
    amp = autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = TrainStep(model, optimizer, scaler, amp, compile=compile_model)
    try:
        x, y = random_batch(batch_size if on_cuda else STATE_STEP_BATCH)
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
        x, y = random_batch(batch_size)
        start = time.perf_counter()
        saved = saved_for_backward(model, x, y, amp)
        synchronize(device)
        forward_s = time.perf_counter() - start
    except Exception as error:  # raised as it is, or wrapped by torch.compile or the capture
        if not caused_by_out_of_memory(error):
            raise
        raise out_of_memory(batch_size) from error

    saved_bytes = sum(saved.values())
    return {
        "measure": "memory",
        "memory": {
            **state,
            "saved_activation_bytes": saved_bytes,
            "saved_activation_bytes_by_dtype": saved,
            "saved_activation_bytes_per_image": round(saved_bytes / batch_size),
            # An estimate, not a peak: a step also holds activation gradients, kernel workspaces
            # and the allocator's slack, and on a GPU the CUDA context besides.
            "estimate_bytes": state["parameter_state_bytes"] + saved_bytes,
            "cuda_peak_bytes": cuda_peak,
            "cuda_peak_kind": "torch.cuda.max_memory_allocated over a steady-state training step"
                              if on_cuda else None,
            "forward_s": round(forward_s, 2),
        },
        "model": model_record(cfg, count_parameters(model)),
        "settings": settings_record(cfg, device=device.type, precision=precision, compile=compile_model),
        "environment": {**environment, "load_average_end": load_average()},
    }


# --- the command --------------------------------------------------------------------------------

def use_threads(cfg: DictConfig, device: torch.device):
    """The CPU threads of the main process: as resexp train sets them (``CpuThreads``: settled again
    before each window, as a run does at each evaluation), unless bench.threads says how many."""
    from .step import configure_backend

    threads = configure_backend(device)
    if cfg.bench.threads is not None:
        torch.set_num_threads(cfg.bench.threads)
        threads.adapts = False
    return threads


def environment_at_start(device: torch.device) -> dict:
    """``train.environment`` (the one record of where something ran), and what a benchmark adds:
    the GPU's bf16 peak, and the load average, as the machine's other work slows both pipelines."""
    from .train import environment

    record = environment(device)
    peak = bf16_peak_tflops(record["device_name"]) if device.type == "cuda" else None
    return {**record, "bf16_dense_peak_tflops": peak, "load_average_start": load_average()}


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def load_images(cfg: DictConfig):
    """The training images, as ``resexp train`` loads them for this config."""
    from .data import load_data

    wanted = cfg.data
    # A batch larger than these images is refused by TrainBatches, as in resexp train.
    return load_data(wanted.name, wanted.root, train_size=wanted.train_size, test_size=wanted.test_size,
                     val_size=wanted.val_size, resize=wanted.resize, download=wanted.download, seed=cfg.seed)


def out_of_memory(batch_size: int) -> UsageError:
    return UsageError(f"out of GPU memory at schedule.batch_size={batch_size}; use a smaller schedule.batch_size")


def model_record(cfg: DictConfig, parameters: int, **figures) -> dict:
    return {"arch": cfg.arch, "depth": cfg.depth, "options": OmegaConf.to_container(cfg.model),
            "parameters": parameters, **figures}


def settings_record(cfg: DictConfig, **resolved) -> dict:
    """The settings under the names the records have always used (``batch_size`` for
    ``schedule.batch_size``, ``steps`` for ``bench.steps``, ...), with what ``auto`` resolved to."""
    return {"arch": cfg.arch, "depth": cfg.depth, "batch_size": cfg.schedule.batch_size, "seed": cfg.seed,
            "data": cfg.data.name, "data_root": cfg.data.root, "train_size": cfg.data.train_size,
            **OmegaConf.to_container(cfg.bench), "workers": reference_workers(cfg), **resolved}


def default_json_path(cfg: DictConfig, device: str, precision: str) -> Path:
    """outputs/bench/, named by the run name ``resexp train`` gives this config, the batch and the device."""
    from .config import run_name

    name = f"{run_name(cfg)}-b{cfg.schedule.batch_size}"
    if cfg.bench.measure == "memory":  # one record per precision: they are compared side by side
        return Path("outputs") / "bench" / f"memory-{name}-{precision}-{device}.json"
    return Path("outputs") / "bench" / f"{name}-{device}.json"


def run_bench(cfg: DictConfig) -> dict:
    """Measure both pipelines and return the record that ``bench_command`` writes."""
    from .models import build_model_for, count_parameters
    from .step import resolve_compile, resolve_cuda_graph, resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    # compile=auto as resexp train decides it for the schedule's length (the paper's: the run a user times).
    compile_model = resolve_compile(cfg.compile, device, cfg.schedule.iterations)
    cuda_graph = resolve_cuda_graph(cfg.cuda_graph, device, precision)
    threads = use_threads(cfg, device)
    environment = environment_at_start(device)

    data = load_images(cfg)
    counting_model = build_model_for(cfg, num_classes=len(data.classes))
    macs_per_image = forward_macs(counting_model, tuple(data.train_images.shape[1:]))
    parameters = count_parameters(counting_model)
    del counting_model

    pipelines: list[Pipeline] = []
    window_threads = []  # the CPU threads of each timed window, in the order they ran
    try:
        pipelines.append(prepare(lambda: resexp_pipeline(data, cfg, device, precision, compile_model, cuda_graph),
                                 cfg.bench.warmup, device))
        if cfg.bench.reference:
            pipelines.append(prepare(lambda: reference_pipeline(data, cfg, device), cfg.bench.warmup, device))
        for _ in range(cfg.bench.windows):
            for pipeline in pipelines:  # alternate windows, so a change in the machine's load hits both alike
                window_threads.append(threads.settle())
                time_window(pipeline, cfg.bench.steps, device)
        grad_norm_s = time_gradient_norms(pipelines[0], device)
    except Exception as error:  # raised as it is, or wrapped by torch.compile or the capture
        if not caused_by_out_of_memory(error):
            raise
        raise out_of_memory(cfg.schedule.batch_size) from error
    finally:
        for pipeline in pipelines:
            pipeline.close()
    peak_tflops = environment["bf16_dense_peak_tflops"]
    figures = {pipeline.name: summarize(pipeline, cfg, macs_per_image, peak_tflops, device)
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
        "model": model_record(cfg, parameters, forward_macs_per_image=macs_per_image),
        "settings": settings_record(cfg, device=device.type, precision=precision, compile=compile_model,
                                    cuda_graph=cuda_graph, train_images=len(data.train_images)),
        "environment": {**environment, "load_average_end": load_average(),
                        "window_threads": window_threads if device.type == "cpu" else None},
    }


def format_table(record: dict) -> str:
    environment, model, settings = record["environment"], record["model"], record["settings"]
    lines = [
        f"{model['arch']}-{model['depth']}, batch {settings['batch_size']}, {environment['device']} "
        f"({environment['device_name']}, {environment['usable_cores']} cores, {environment['cpu_threads']} threads), "
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
        f"{environment['device']} ({environment['device_name']}, {environment['cpu_threads']} threads), "
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
    from . import config
    from .files import atomic_write_json

    if any(arg in ("-h", "--help") for arg in args):
        print(help_page())
        return 0
    overrides = without_cfg_job(args)
    if overrides is not None:  # as resexp train --cfg job: the config, composed and resolved, and nothing run
        print(OmegaConf.to_yaml(config.compose(overrides, config_name="bench"), resolve=True), end="")
        return 0
    cfg = bench_config(args)
    memory = cfg.bench.measure == "memory"
    record = run_memory(cfg) if memory else run_bench(cfg)
    settings = record["settings"]
    path = Path(cfg.bench.json) if cfg.bench.json else default_json_path(cfg, settings["device"],
                                                                         settings["precision"])
    atomic_write_json(path, record)
    print(format_memory_table(record) if memory else format_table(record))
    print(f"record: {path}")
    return 0


def without_cfg_job(args: list[str]) -> list[str] | None:
    """The overrides, where the arguments ask for the config with ``--cfg job`` (or ``-c job``); else None."""
    for index, arg in enumerate(args):
        if arg in ("--cfg", "-c") and args[index + 1 : index + 2] == ["job"]:
            return args[:index] + args[index + 2 :]
    return None
