"""One training run, as He et al. 2015 (section 4.2) trained their CIFAR-10 nets.

``train`` reads top to bottom: look at what the run folder already holds (finished?
a checkpoint to resume?), set up the device, data, model and optimizer, restore the
checkpoint, then one loop. Each iteration: the learning rate (a pure function of the
iteration), the iteration's batch, one SGD step; then the warm-up check, every
``eval_every`` iterations an evaluation (training error of the interval, test error)
appended to ``metrics.jsonl``, every ``checkpoint_every`` iterations a checkpoint, and
the check for a stop signal. Batches depend only on (seed, iteration) and the checkpoint
(one dict) holds the model, optimizer, scaler, RNG state and step statistics, so a
resumed run continues exactly where the interrupted one stopped.

On CUDA the step is one CUDA-graph replay of a compiled forward/backward/update
(``GraphedTrainStep``); elsewhere, or if capture or compiling fails, an eager step.

A run folder holds:
    config.yaml     the resolved config
    env.json        where and with what it ran (git SHA, versions, device, command line)
    metrics.jsonl   one line per evaluation
    checkpoint.pt   the latest checkpoint
    result.json     status and final numbers
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import config as config_module
from .data import TrainBatches, load_data, normalize, pixel_mean
from .errors import UsageError
from .files import (CHECKPOINT, CONFIG, ENV, LOCK, METRICS, RESULT, append_jsonl, atomic_write, atomic_write_json,
                    holder_alive, read_lock, typed_command,
                    atomic_write_text, read_json, read_jsonl, read_result, write_jsonl)
from .models import build_model_for, count_parameters, gradient_norms
from .signals import RunInterrupted, StopSignals

CHECKPOINT_FORMAT = 1


# --- the learning rate, a pure function of the iteration ----------------------------------------

def learning_rate(iteration: int, *, lr: float, milestones, gamma: float, warming_up: bool = False,
                  warmup_lr: float = 0.01) -> float:
    """The paper's step schedule: ``lr`` divided by 1/gamma at each milestone passed.

    During warm-up (the paper's 110-layer net) the rate is ``warmup_lr`` instead, but never
    above the scheduled rate.
    """
    scheduled = lr * gamma ** sum(iteration >= m for m in milestones)
    return min(warmup_lr, scheduled) if warming_up else scheduled


def warmup_applies(depth: int, min_depth: int | None) -> bool:
    return min_depth is not None and depth >= min_depth


# --- devices and precision ----------------------------------------------------------------------

# Where Linux's NVIDIA driver says it is loaded, and which version it is.
NVIDIA_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
# What to tell a user whose torch cannot use their GPU (PyTorch publishes builds for older CUDA versions).
TORCH_FOR_OLDER_CUDA = ("TORCH_SPEC='torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126' "
                        "bash scripts/install.sh (pick the cuXYZ your driver supports; README, Set-up)")


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA driver's version ("unknown" if unreadable), or None when no NVIDIA driver is loaded."""
    try:
        text = NVIDIA_DRIVER_VERSION_FILE.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return found.group(1) if found else "unknown"


def unusable_gpu_problem() -> str | None:
    """Why torch cannot use the NVIDIA GPU this machine has, or None (no GPU, GPUs hidden on purpose,
    or torch can use it). Without this check ``device=auto`` would quietly train on the CPU."""
    if torch.cuda.is_available():
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return None  # CUDA_VISIBLE_DEVICES= hides the GPUs: the CPU is what was asked for
    driver = nvidia_driver_version()
    if driver is None:
        return None
    if torch.version.cuda is None:
        build = f"torch {torch.__version__} is a CPU-only build"
    else:
        build = (f"torch {torch.__version__} was built for CUDA {torch.version.cuda} and cannot use it "
                 f"(a driver older than that CUDA version needs, or a GPU hidden from this process)")
    return (f"an NVIDIA GPU is present (driver {driver}), but {build}; install a torch that matches the driver: "
            f"{TORCH_FOR_OLDER_CUDA}; or train on the CPU with device=cpu")


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda if torch can use a GPU, else the CPU, but never the CPU by accident when a GPU is there."""
    if name in ("auto", "cuda"):
        problem = unusable_gpu_problem()
        if problem is not None:
            raise UsageError(f"device={name}: {problem}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA GPU is available here; use device=auto or device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        # bf16 on CPUs without native support is many times slower than fp32.
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UsageError("precision=fp16 needs a CUDA GPU; on the CPU use precision=fp32 or bf16")
    return name


def autocast(device: torch.device, precision: str):
    """Mixed precision for ``precision`` (nothing for fp32).

    Autocast's cache of weight casts is off: a CUDA graph must not replay a cast cached outside
    its capture (PyTorch's make_graphed_callables requires it off), and the flag is part of
    torch.compile's guards, so every step, captured or not, must run with the same setting or
    the net is compiled twice. Each weight is cast once per step, so the cache saved nothing.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


# On a CPU, compiling a CIFAR net takes one to two minutes (the first time a machine sees it; seconds
# from its cache after that) and saves ~15% of every step (docs/benchmarks.md): repaid by long runs only.
CPU_COMPILE_MIN_ITERATIONS = 20_000


def resolve_compile(setting, device: torch.device, iterations: int | None = None) -> bool:
    """``compile=auto`` compiles on CUDA, and on a CPU for runs of ``CPU_COMPILE_MIN_ITERATIONS``
    iterations or more (the paper's schedule), where the compile time is a small part of the run."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" or (iterations is not None and iterations >= CPU_COMPILE_MIN_ITERATIONS)


def resolve_cuda_graph(setting, device: torch.device, precision: str) -> bool:
    """``cuda_graph=auto`` captures the step on CUDA unless the run trains in fp16.

    fp16 needs GradScaler, whose step checks the gradients for inf/NaN and skips the update:
    PyTorch documents that check as a host-device sync, which a graph cannot hold.
    """
    if setting is True and device.type != "cuda":
        raise UsageError(f"cuda_graph=true needs a CUDA GPU, but this run trains on the {device.type}; "
                         "use cuda_graph=auto (on when a GPU is used) or cuda_graph=false")
    if setting is True and precision == "fp16":
        raise UsageError("cuda_graph=true cannot capture precision=fp16 (GradScaler checks for overflow on the CPU); "
                         "use precision=bf16, or cuda_graph=auto to train fp16 without a graph")
    if setting == "auto":
        return device.type == "cuda" and precision != "fp16"
    return bool(setting)


def check_machine(cfg: DictConfig) -> None:
    """What the config needs of this machine (a GPU torch can use for device=cuda, one for fp16 or
    cuda_graph=true), checked with the config, before anything trains: the run's own one-line error."""
    device = resolve_device(cfg.device)
    resolve_cuda_graph(cfg.cuda_graph, device, resolve_precision(cfg.precision, device))


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


def configure_backend(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.cuda.reset_peak_memory_stats(device)  # the run's own peak, for the out-of-memory message
    else:
        # An explicit OMP_NUM_THREADS wins (a sweep with gpus=... shares the cores out that way).
        threads = os.environ.get("OMP_NUM_THREADS", "").strip()
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else usable_cores())


def make_optimizer(model, schedule, device: torch.device, lr: torch.Tensor | None = None) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter, as the paper (and fb.resnet.torch) did.

    With ``lr`` (from ``learning_rate_tensor``) in place of the float ``schedule.lr``, every update
    reads the rate from that tensor: the loop sets it with ``lr.fill_(rate)``, which needs no
    host-device sync, and a CUDA-graph step follows the schedule without being captured again.
    Fused CUDA SGD reads the tensor on the GPU; the CPU implementation reads its value.
    After ``optimizer.load_state_dict`` call ``reattach_lr``.
    """
    return torch.optim.SGD(model.parameters(), lr=schedule.lr if lr is None else lr, momentum=schedule.momentum,
                           weight_decay=schedule.weight_decay,
                           fused=True if device.type == "cuda" else None)  # one kernel for all parameters


def learning_rate_tensor(lr: float, device: torch.device) -> torch.Tensor:
    """The learning rate as a 0-d float32 tensor on the training device, for ``make_optimizer``.

    float32 on the parameters' device is what fused CUDA SGD reads in place.
    """
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


def reattach_lr(optimizer: torch.optim.Optimizer, lr: torch.Tensor) -> None:
    """Point every parameter group at the loop's learning-rate tensor again, after ``load_state_dict``.

    Loading a checkpoint replaces each group's settings with the saved ones: the rate becomes a
    CPU copy of the saved tensor, which ``lr.fill_`` no longer reaches and a CUDA graph cannot
    read. The fused/foreach choice is put back too: it belongs to this device, not to the one
    that wrote the checkpoint.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


# --- the training step --------------------------------------------------------------------------

def caused_by_out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is running out of GPU memory.

    torch.compile and graph capture wrap the errors raised inside them; an out-of-memory error
    there is still out of memory, and must not be taken for a failed compile or capture.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError) or "CUDA out of memory" in str(error):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def error_line(error: BaseException) -> str:
    """An exception as one short line, for a warning."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``, without Inductor's warning on CPU-only machines."""
    if not torch.cuda.is_available():
        # Inductor's import looks for a CUDA toolkit and warns on every CPU run that it found none.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(model)


class TrainStep:
    """One SGD step: forward, backward, update.

    Returns the loss and the number of wrong predictions as device tensors, so the loop
    never waits for the GPU. With ``compile_model`` the forward and backward pass run
    through torch.compile; if compiling fails, the step warns once and runs eagerly.
    Running out of memory is not a failed compile: it is raised as it is.
    """

    def __init__(self, model, optimizer, scaler, amp, compile: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.amp = amp
        self.forward = compile_model(model) if compile else model

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._step(x, y)
        except Exception as error:
            if self.forward is self.model or caused_by_out_of_memory(error):
                raise
            print(f"warning: torch.compile failed ({error_line(error)}); training without compiling "
                  "(compile=false skips it)", file=sys.stderr)
            self.forward = self.model
            return self._step(x, y)

    def _step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp:
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), (logits.detach().argmax(1) != y).sum()


class TrainingSnapshot:
    """A copy of everything an SGD step changes: parameters, buffers (BN running statistics and
    their counters) and the optimizer's per-parameter state (momentum buffers).

    ``restore`` writes the copy back in place, so tensors that a captured CUDA graph reads and
    writes keep their addresses. Optimizer state created after the snapshot (the momentum buffers
    of a run's very first step) is zeroed: without dampening, SGD updates a zero buffer exactly as
    a missing one (momentum * 0 + grad = grad). Gradients are left alone: the next step
    overwrites them.
    """

    def __init__(self, model, optimizer):
        self.optimizer = optimizer
        with torch.no_grad():
            self.model_tensors = [(tensor, tensor.clone()) for tensor in (*model.parameters(), *model.buffers())]
            self.optimizer_state = {param: {key: value.clone() if torch.is_tensor(value) else value
                                            for key, value in state.items()}
                                    for param, state in optimizer.state.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in self.model_tensors:
            tensor.copy_(saved)
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state.get(param, {})
                saved = self.optimizer_state.get(param, {})
                for key, value in state.items():
                    if key in saved and isinstance(value, torch.Tensor):
                        value.copy_(saved[key])
                    elif key in saved:
                        state[key] = saved[key]
                    elif key == "momentum_buffer" and group.get("dampening", 0) == 0:
                        value.zero_()
                    else:
                        raise ValueError(f"cannot undo optimizer state {key!r} created after the snapshot")


class GraphedTrainStep:
    """``TrainStep`` captured once into a CUDA graph and replayed: one graph launch per SGD step.

    A CIFAR net's kernels are small, so on a fast GPU the eager step mostly waits for Python and
    kernel launches. This follows PyTorch's whole-network capture recipe (CUDA semantics notes,
    "CUDA Graphs"): static input buffers; warm-up steps on a side stream before capture (cuDNN's
    benchmark and torch.compile must not run inside it, and the momentum buffers must exist);
    gradients set to None before capture, so the captured backward owns static ``.grad`` tensors
    that every replay refills; an optimizer whose inputs all live on the GPU (fused SGD with the
    learning rate as a tensor: a float would be frozen into the graph).

    The warm-up steps (the capture's, not the schedule's) are real SGD steps on the first batch. A
    ``TrainingSnapshot`` taken before them is written back after capture, so the first replay is the
    run's true next step.

    The graph is captured at the first call and keeps the addresses of the parameters, buffers,
    momentum buffers and learning-rate tensor it saw: load checkpoints (and ``reattach_lr``) before
    that. With ``compile`` the graph holds torch.compile's kernels (compiled during warm-up, once:
    warm-up and capture run under the same autocast settings). fp16 runs take the eager step
    (GradScaler's overflow check syncs with the CPU). If capture fails, the step says so in one
    line and runs eagerly; the process is left as before the capture (``capture``).
    """

    warmup_steps = 3  # as in PyTorch's recipe

    def __init__(self, model, optimizer, scaler, amp, compile: bool = False):
        self.eager = TrainStep(model, optimizer, scaler, amp, compile=compile)
        self.model = model
        self.optimizer = optimizer
        self.amp = amp
        self.use_graph = not scaler.is_enabled()
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None and self.use_graph:
            self.use_graph = self._capture(x, y)
        if self.graph is None:
            return self.eager(x, y)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            raise ValueError(f"the CUDA graph was captured for batches of shape {tuple(self.static_x.shape)}; "
                             f"got {tuple(x.shape)}")
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        # The next replay overwrites these two tensors. The loop adds them to its statistics right away
        # (queued on the same stream, so before the next replay runs): handing them out is safe.
        return self.static_loss, self.static_wrong

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Warm up, capture, put the model and optimizer back as they were; False if capture failed."""
        check_capturable(self.optimizer)
        self.static_x = x.clone()  # keeps the channels_last layout
        self.static_y = y.clone()
        snapshot = TrainingSnapshot(self.model, self.optimizer)
        side = torch.cuda.Stream(device=x.device)
        graph = torch.cuda.CUDAGraph()
        try:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                # The first step goes through TrainStep, so that a failing torch.compile falls back there
                # (with its own warning); the others run exactly what is then captured.
                self.eager(self.static_x, self.static_y)
                for _ in range(self.warmup_steps - 1):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._static_step()
            torch.cuda.current_stream().wait_stream(side)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.stream(side):  # warm-up and capture on one stream, the current one put back after
                self.static_loss, self.static_wrong = capture(graph, self._static_step, x.device)
        except Exception as error:
            self.optimizer.zero_grad(set_to_none=True)  # gradients may live in the failed graph's memory
            self.static_x = self.static_y = None
            if caused_by_out_of_memory(error):
                raise
            print(f"warning: CUDA graph capture failed ({error_line(error)}); training without it "
                  "(cuda_graph=false skips the capture)", file=sys.stderr)
            return False
        finally:
            torch.cuda.current_stream().wait_stream(side)
            snapshot.restore()
        self.graph = graph
        return True

    def _static_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and update on the static batch, with no host-device sync."""
        with self.amp:
            logits = self.eager.forward(self.static_x)
            loss = F.cross_entropy(logits.float(), self.static_y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) != self.static_y).sum()


def capture(graph: torch.cuda.CUDAGraph, work, device: torch.device):
    """Capture ``work()`` into ``graph`` on the current stream and return what it returned.

    ``torch.cuda.graph`` does the same, but when the capture fails (an operation that syncs with
    the CPU, say) it leaves the caching allocator sending this stream's allocations to the graph's
    memory pool as if the capture were still under way, and every later capture and step in the
    process suffers. Here a failed capture is ended and the allocator released before the error
    is raised, so the process goes on as before it began.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # as torch.cuda.graph does: free what can be freed for the graph's pool
    pool = torch.cuda.graph_pool_handle()
    graph.capture_begin(pool=pool)
    try:
        result = work()
        graph.capture_end()
    except BaseException:  # in the captured work, or when the capture ends
        abandon_capture(graph, device, pool)
        raise
    return result


def abandon_capture(graph: torch.cuda.CUDAGraph, device: torch.device, pool) -> None:
    """Undo what a failed capture left behind: the stream's capture mode and the allocator's pool."""
    if torch.cuda.is_current_stream_capturing():
        with contextlib.suppress(Exception):  # an invalidated capture ends with an error, but it ends
            graph.capture_end()
    index = device.index if device.index is not None else torch.cuda.current_device()
    # capture_end stops routing allocations to the pool only when it succeeds; when it has, this refuses.
    with contextlib.suppress(Exception):
        torch._C._cuda_endAllocateToPool(index, pool)
    with contextlib.suppress(Exception):
        torch._C._cuda_releasePool(index, pool)
    torch.cuda.synchronize(device)


def check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose update a CUDA graph would get wrong or could not capture."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.is_cuda and lr.dtype == torch.float32):
            raise ValueError("a CUDA-graph step needs the learning rate as a float32 CUDA tensor (make_optimizer with "
                             "lr=learning_rate_tensor(...), and reattach_lr after load_state_dict); "
                             f"got {type(lr).__name__}, which the graph would freeze at its first value")
        if not group.get("fused"):
            raise ValueError("a CUDA-graph step needs fused SGD: the other implementations read a tensor "
                             "learning rate back to the CPU")


def make_train_step(model, optimizer, scaler, amp, *, compile: bool, cuda_graph: bool):
    """The step ``resexp train`` uses: one CUDA graph replay per iteration on a GPU, eager on a CPU.

    A run that compiles starts from a clean compile cache. Dynamo keeps at most ``recompile_limit``
    (8) compiled versions of a function, and every net in a process shares the module-calling code:
    nets trained one after another in one process (a sweep's job process trains one, but tests and
    scripts call ``train`` many times) would use the slots up and train uncompiled after a warning.
    The earlier run's compiled code is of no use to this one.
    """
    if compile:
        torch._dynamo.reset()
    step_class = GraphedTrainStep if cuda_graph else TrainStep
    return step_class(model, optimizer, scaler, amp, compile=compile)


# --- evaluation ---------------------------------------------------------------------------------

def evaluate(model, images, labels, mean, batch_size: int, amp) -> tuple[float, float]:
    """Mean loss and error on a whole (uint8) image set."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=images.device)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size], mean)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[start : start + batch_size]
            with amp:
                logits = model(x)
            totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
            totals[1] += (logits.argmax(1) != y).sum()
    model.train(was_training)
    loss, errors = (totals / len(images)).tolist()
    return loss, errors


# --- the run folder -----------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """What a reader needs to trust or reproduce a run or a benchmark: code version, software, hardware.

    The one record of where something ran: each run's env.json, and the ``environment`` of
    ``resexp bench``'s records (which adds the GPU's peak and the load average).
    """
    import torchvision

    source = Path(__file__).resolve().parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    cpu = cpu_model()
    return {
        "git_sha": sha,
        "git_dirty": bool(git("status", "--porcelain")) if sha else None,
        "command": typed_command(),  # as typed, also in a sweep's job process
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_threads": torch.get_num_threads(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def load_checkpoint(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("unknown checkpoint format")
    except Exception as error:
        raise UsageError(
            f"checkpoint {path} is unreadable ({type(error).__name__}); "
            f"resume=false starts this run over (the checkpoint is replaced), or move the file away"
        ) from error
    return checkpoint


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write the checkpoint atomically; a full disk leaves the previous one intact, and says so.

    torch.save reports a failed write (a full disk) as a RuntimeError from its zip writer, not an OSError.
    """
    try:
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except (OSError, RuntimeError) as error:  # the temporary file is gone, the old checkpoint intact
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error_line(error)
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint yet"
        raise UsageError(f"could not write {path} ({reason}); {kept}; "
                         "free some space and run the same command to resume") from error


class RunInUse(UsageError):
    """Another live process is training this run folder."""


def lock_holder(run_dir: Path) -> dict | None:
    """Who holds the run folder's lock, if that process is alive (or on another host, where it cannot be told)."""
    holder = read_lock(run_dir)
    return holder if holder is not None and holder_alive(holder) else None


def check_not_in_use(run_dir: Path) -> None:
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunInUse(f"run folder {run_dir} is being trained by process {holder['pid']} on {holder['host']} "
                       f"(since {holder.get('since', '?')}): is the same command already running? Wait for it or "
                       f"stop it; if that process is gone (a job killed on another machine), delete {run_dir / LOCK}")


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder for this process while it trains: two processes never train one run."""
    path = run_dir / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            check_not_in_use(run_dir)
            path.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as lock:
            lock.write(json.dumps(mine))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def check_resumable(cfg: DictConfig, run_dir: Path, config: dict | None = None) -> dict | None:
    """The run folder's checkpoint, if any, after checking that it was made under the same config.

    ``resexp train`` asks before Hydra writes anything into the folder, so a refused command changes
    nothing in it; ``train`` asks again as it opens the run.
    """
    check_not_in_use(run_dir)
    path = run_dir / CHECKPOINT
    if not cfg.resume or not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    differences = config_module.config_differences(
        checkpoint["config"], config if config is not None else OmegaConf.to_container(cfg, resolve=True))
    if differences:
        raise UsageError(f"run folder {run_dir} holds a run with another config ({'; '.join(differences[:3])}); "
                         "choose another name=..., or resume=false to start it over")
    check_same_images(checkpoint["config"], cfg, run_dir)
    return checkpoint


def check_same_images(saved: dict, cfg: DictConfig, run_dir: Path) -> None:
    """data.root may change between a run's start and a resume or rerun (config.RESUMABLE_DIFFERENCES): the
    data moved or was copied. An image folder at the old place that holds other images than the new one
    says it is not the same data: refused. An old place that is gone or unreadable cannot tell: allowed."""
    from .data import image_folder_fingerprint

    old_root = (saved.get("data") or {}).get("root")
    if cfg.data.name != "imagefolder" or not isinstance(old_root, str) or \
            Path(old_root).resolve() == Path(cfg.data.root).resolve() or not Path(old_root).is_dir():
        return
    try:
        same = image_folder_fingerprint(old_root) == image_folder_fingerprint(cfg.data.root)
    except UsageError:  # the old folder is no image folder any more
        return
    if not same:
        raise UsageError(f"run folder {run_dir} was trained on data.root={old_root}, and data.root={cfg.data.root} "
                         "holds other images; choose another name=... for a run on them, or resume=false to "
                         "start it over")


def finished_result(cfg: DictConfig, run_dir: Path, checkpoint: dict | None) -> dict | None:
    """The result of a run that has nothing left to train, or None: done or diverged (it would
    diverge again), with its checkpoint (from ``check_resumable``) at the same iteration.
    ``resume=false`` trains every run again. The one rule: sweeps ask it before submitting a job."""
    previous = existing_result(run_dir) if cfg.resume else None
    if previous and previous.get("status") in ("done", "diverged") and \
            (checkpoint is None or previous.get("iterations_done") == checkpoint["iteration"]):
        return previous
    return None


def existing_result(run_dir: Path) -> dict | None:
    """The run's result.json; a damaged one is reported and ignored (the checkpoint decides)."""
    path = run_dir / RESULT
    if not path.exists():
        return None
    try:
        result = read_result(path)
        if "status" not in result:
            raise ValueError("no status")
        return result
    except (OSError, ValueError):
        print(f"warning: {path} is damaged; continuing from the checkpoint, which rewrites it", file=sys.stderr)
        return None


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    try:
        return read_jsonl(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is damaged ({error}); resume=false starts this run over, "
                         "or repair the file by removing the broken lines") from error


def start_over(run_dir: Path) -> None:
    """``resume=false``: remove the run's progress so it trains from iteration 0."""
    for name in (CHECKPOINT, METRICS, RESULT):
        (run_dir / name).unlink(missing_ok=True)


def out_of_memory_message(run: str, batch_size: int, device: torch.device) -> str:
    used = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0
    return (f"{run}: out of GPU memory at batch size {batch_size} (peak {used:.1f} GiB of {total:.1f} GiB); "
            "use a smaller schedule.batch_size or fewer runs per GPU")


class ProgressBar:
    """tqdm's bar with the running training loss and error, read without making the loop wait.

    Every ``every`` iterations the loop's device-side sums are copied to the host asynchronously;
    the bar shows a copy once the device has made it, so reading never waits for the GPU.
    """

    every = 20

    def __init__(self, cfg: DictConfig, label: str, start: int, device: torch.device):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=cfg.schedule.iterations, initial=start, desc=label, unit="it", dynamic_ncols=True,
                        disable=not cfg.progress, file=sys.stderr, mininterval=1.0)
        self.on_cuda = device.type == "cuda"
        self.host = torch.zeros(3, dtype=torch.float64, pin_memory=self.on_cuda)
        self.copied = torch.cuda.Event() if self.on_cuda else None
        self.pending = False
        self.fields: dict[str, str] = {}

    def update(self, iteration: int, sums: torch.Tensor, lr: float) -> None:
        """One step done; ``sums`` holds the interval's loss sum, errors and images so far."""
        self.bar.update(1)
        if self.bar.disable or iteration % self.every:
            return
        if self.pending and self.copied.query():
            self.pending = False
            self.show_running(lr)
        if not self.on_cuda:
            self.host.copy_(sums)
            self.show_running(lr)
        elif not self.pending:
            self.host.copy_(sums, non_blocking=True)
            self.copied.record()
            self.pending = True

    def show_running(self, lr: float) -> None:
        loss_sum, errors, seen = self.host.tolist()
        if seen:
            self.show(lr=f"{lr:.3g}", loss=f"{loss_sum / seen:.3f}", err=f"{errors / seen:.1%}")

    def show(self, **fields: str) -> None:
        self.fields.update(fields)
        self.bar.set_postfix(self.fields, refresh=False)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


# --- the run ------------------------------------------------------------------------------------

def train(cfg: DictConfig, run_dir: str | os.PathLike, *, stop_after: int | None = None) -> dict:
    """Train (or resume, or skip if finished) the run that ``cfg`` describes in ``run_dir``.

    Returns the run's result dict, with ``outcome`` saying what this call did: ``trained``,
    ``resumed``, ``skipped`` (already finished), ``diverged`` or ``stopped`` (``stop_after``
    reached; tests use it to simulate an interruption). A stop signal saves a checkpoint and
    raises ``RunInterrupted``. ``cfg`` was checked (``config.check``, ``check_machine``) by the
    command that started the run.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        return train_locked(cfg, run_dir, stop_after)


def train_locked(cfg: DictConfig, run_dir: Path, stop_after: int | None) -> dict:
    """``train``, in a run folder that this process holds."""
    schedule = cfg.schedule
    config = OmegaConf.to_container(cfg, resolve=True)

    # What the folder holds: a finished run is skipped; a checkpoint resumes only under the same config.
    if not cfg.resume:
        start_over(run_dir)
    checkpoint = check_resumable(cfg, run_dir, config)
    finished = finished_result(cfg, run_dir, checkpoint)
    if finished is not None:
        return {**finished, "outcome": "skipped"}

    # Set-up: device, data, model, optimizer.
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    use_graph = resolve_cuda_graph(cfg.cuda_graph, device, precision)
    configure_backend(device)
    data = load_data(cfg.data.name, cfg.data.root, train_size=cfg.data.train_size, test_size=cfg.data.test_size,
                     val_size=cfg.data.val_size, resize=cfg.data.resize, download=cfg.data.download, seed=cfg.seed)
    mean = pixel_mean(data.train_images).to(device)
    batches = TrainBatches(data.train_images.to(device), data.train_labels.to(device), schedule.batch_size, cfg.seed,
                           mean, padding=cfg.data.augment.padding, flip=cfg.data.augment.flip)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
    torch.manual_seed(cfg.seed)  # model init
    model = build_model_for(cfg, num_classes=len(data.classes)).to(device, memory_format=torch.channels_last)
    parameters = count_parameters(model)
    lr_tensor = learning_rate_tensor(schedule.lr, device)  # the loop fills it every iteration
    optimizer = make_optimizer(model, schedule, device, lr=lr_tensor)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = autocast(device, precision)

    # The state a checkpoint holds, from the checkpoint or fresh.
    iteration = 0
    warmup_done_at = None if warmup_applies(cfg.depth, schedule.warmup.min_depth) else 0
    step_sums = torch.zeros(3, dtype=torch.float64, device=device)    # loss sum, errors, images since last evaluation
    warmup_sums = torch.zeros(2, dtype=torch.float64, device=device)  # errors, images since last warm-up check
    elapsed_before = 0.0  # wall time of earlier sessions of this run
    train_time_s = 0.0    # time spent in training steps (not evaluation), all sessions
    best_test_error = math.inf
    outcome = "trained"
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        reattach_lr(optimizer, lr_tensor)
        scaler.load_state_dict(checkpoint["scaler"])
        iteration = checkpoint["iteration"]
        warmup_done_at = checkpoint["warmup_done_at"]
        step_sums.copy_(checkpoint["step_stats"])
        warmup_sums.copy_(checkpoint["warmup_stats"])
        elapsed_before = checkpoint["elapsed_s"]
        train_time_s = checkpoint["train_time_s"]
        best_test_error = checkpoint["best_test_error"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        # Metrics written after the checkpoint are computed again: drop them so curves have no duplicates.
        write_jsonl(run_dir / METRICS, [m for m in read_metrics(run_dir) if m["iteration"] <= iteration])
        outcome = "resumed"
    else:
        (run_dir / METRICS).unlink(missing_ok=True)
    # Made after the restore: a CUDA graph keeps the addresses of the tensors it captured.
    step = make_train_step(model, optimizer, scaler, amp, cuda_graph=use_graph,
                           compile=resolve_compile(cfg.compile, device, schedule.iterations))

    atomic_write_text(run_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(run_dir / ENV, {**environment(device), "resumed_at_iteration": iteration or None,
                                             "precision": precision})
    session_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

    def checkpoint_now() -> None:
        save_checkpoint(run_dir / CHECKPOINT, {
            "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "iteration": iteration, "warmup_done_at": warmup_done_at,
            "step_stats": step_sums.cpu(), "warmup_stats": warmup_sums.cpu(), "elapsed_s": elapsed(),
            "train_time_s": train_time_s, "best_test_error": best_test_error,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "config": config,
        })

    def write_result(status: str, **extra) -> dict:
        """result.json: the run's status and latest numbers."""
        metrics = read_metrics(run_dir)
        last = metrics[-1] if metrics else {}
        record = {
            "status": status, "run_name": run_dir.name, "arch": cfg.arch, "depth": cfg.depth, "seed": cfg.seed,
            "shortcut": cfg.model.shortcut if cfg.arch == "resnet" else None, "parameters": parameters,
            "iterations": schedule.iterations, "iterations_done": iteration,
            "final_train_error": last.get("train_error"), "final_test_error": last.get("test_error"),
            "final_train_loss": last.get("train_loss"), "final_test_loss": last.get("test_loss"),
            "best_test_error": None if math.isinf(best_test_error) else best_test_error,
            "eval_set": data.eval_set, "wall_time_s": round(elapsed(), 3),
            "images_per_s": round(iteration * schedule.batch_size / train_time_s, 1) if train_time_s else None,
            "device": str(device), "precision": precision, "error": None, "diverged_at": None, **extra,
        }
        atomic_write_json(run_dir / RESULT, record)
        return record

    if not cfg.sweep.size:  # a single run, its data and net in place: say what it will cost (a sweep says it once)
        from .estimate import cost_line, run_cost

        line = cost_line([cfg], [run_cost(cfg, run_dir)])
        if line:
            print(line, file=sys.stderr, flush=True)
    write_result("running")
    progress = ProgressBar(cfg, run_dir.name, iteration, device)
    images_per_step = torch.tensor(float(schedule.batch_size), dtype=torch.float64, device=device)  # made once
    lr = learning_rate(iteration, lr=schedule.lr, milestones=schedule.milestones, gamma=schedule.gamma,
                       warming_up=warmup_done_at is None, warmup_lr=schedule.warmup.lr)
    interval_start = time.perf_counter()
    model.train()
    try:
        with StopSignals() as stop:
            while iteration < schedule.iterations:
                lr = learning_rate(iteration, lr=schedule.lr, milestones=schedule.milestones, gamma=schedule.gamma,
                                   warming_up=warmup_done_at is None, warmup_lr=schedule.warmup.lr)
                lr_tensor.fill_(lr)  # no host-device sync, and a CUDA graph reads the new rate
                x, y = batches.batch(iteration)
                loss, wrong = step(x.contiguous(memory_format=torch.channels_last), y)
                iteration += 1

                # Statistics stay on the device: reading them waits for the GPU, so that happens at checks only.
                counts = torch.stack([loss.double() * schedule.batch_size, wrong.double(), images_per_step])
                step_sums += counts
                progress.update(iteration, step_sums, lr)

                # Warm-up (the paper's 110-layer net): a low rate until the training error is below a threshold.
                if warmup_done_at is None:
                    warmup_sums += counts[1:]
                    if iteration % schedule.warmup.check_every == 0:
                        errors, seen = warmup_sums.tolist()
                        warmup_sums.zero_()
                        if errors / seen < schedule.warmup.until_train_error:
                            warmup_done_at = iteration
                            progress.write(f"{run_dir.name}: warm-up done at iteration {iteration} "
                                           f"(training error {errors / seen:.1%}); lr back to {schedule.lr}")

                finished = iteration == schedule.iterations
                if iteration % schedule.eval_every == 0 or finished:
                    now = time.perf_counter()
                    loss_sum, errors, seen = step_sums.tolist()
                    step_sums.zero_()
                    train_time_s += now - interval_start
                    test_loss, test_error = evaluate(model, test_images, test_labels, mean,
                                                     schedule.eval_batch_size, amp)
                    train_loss = loss_sum / seen
                    append_jsonl(run_dir / METRICS, {
                        "iteration": iteration, "epoch": round(iteration / batches.steps_per_epoch, 3), "lr": lr,
                        "train_loss": train_loss, "train_error": errors / seen,
                        "test_loss": test_loss, "test_error": test_error, "eval_set": data.eval_set,
                        "time_s": round(elapsed(), 3),
                        # Per weighted layer, from the last step's gradients: the vanishing-gradient view.
                        "grad_norms": gradient_norms(model),
                        "images_per_s": round(seen / max(now - interval_start, 1e-9), 1),
                    })
                    progress.show(lr=f"{lr:.3g}", loss=f"{train_loss:.3f}", err=f"{errors / seen:.1%}", test=f"{test_error:.1%}",
                                  ips=f"{seen / max(now - interval_start, 1e-9):.0f}")
                    interval_start = time.perf_counter()
                    if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                        progress.close()
                        checkpoint_now()
                        print(f"{run_dir.name}: diverged at iteration {iteration} (loss {train_loss}); "
                              "the run stops here", file=sys.stderr)
                        return {**write_result("diverged", diverged_at=iteration), "outcome": "diverged"}
                    best_test_error = min(best_test_error, test_error)

                if iteration % schedule.checkpoint_every == 0 or finished:
                    checkpoint_now()

                if stop.received is not None or iteration == stop_after:
                    train_time_s += time.perf_counter() - interval_start
                    checkpoint_now()
                    progress.close()
                    stopped = write_result("interrupted")
                    if stop.received is None:
                        return {**stopped, "outcome": "stopped"}
                    stop.hand_over()
                    raise RunInterrupted(stop.received)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped between checkpoints
        record_ending(progress, write_result, "interrupted")
        raise
    except Exception as error:
        if caused_by_out_of_memory(error):  # raised as it is, or wrapped by torch.compile
            message = out_of_memory_message(run_dir.name, schedule.batch_size, device)
            record_ending(progress, write_result, "failed", message)
            raise UsageError(message) from error
        record_ending(progress, write_result, "failed", str(error) if isinstance(error, UsageError) else
                      error_line(error))
        raise
    progress.close()
    return {**write_result("done"), "outcome": outcome}


def record_ending(progress: ProgressBar, write_result, status: str, error: str | None = None) -> None:
    """Say in result.json how a run that stopped on an error ended, so that no dead run shows as running.
    If even that cannot be written (a full disk), the error that stopped the run is what the user sees."""
    progress.close()
    with contextlib.suppress(Exception):
        write_result(status, error=error)
