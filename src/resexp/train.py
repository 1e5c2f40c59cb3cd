"""One training run, as He et al. 2015 (section 4.2) trained their CIFAR-10 nets.

The loop reads top to bottom: set the learning rate for this iteration, take a
batch, one SGD step; every ``eval_every`` iterations measure the training error
of the interval and the test error, append a line to ``metrics.jsonl``; every
``checkpoint_every`` iterations save everything a resume needs. Batches depend
only on (seed, iteration) and the checkpoint holds the model, optimizer, scaler,
RNG states and step statistics, so a resumed run continues exactly where the
interrupted one stopped.

A run folder holds:
    config.yaml     the resolved config
    env.json        where and with what it ran (git SHA, versions, device, command line)
    metrics.jsonl   one line per evaluation
    checkpoint.pt   the latest checkpoint
    result.json     status and final numbers
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import config as config_module
from .data import TrainBatches, load_data, normalize, pixel_mean
from .errors import UsageError
from .files import (append_jsonl, atomic_write, atomic_write_json, atomic_write_text, read_json, read_jsonl,
                    write_jsonl)
from .models import build_model, count_parameters, gradient_norms
from .signals import RunInterrupted, StopSignals

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"
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

def resolve_device(name: str) -> torch.device:
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
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# On a CPU, compiling a CIFAR net takes one to two minutes (the first time a machine sees it; seconds
# from its cache after that) and saves ~15% of every step (docs/benchmarks.md): repaid by long runs only.
CPU_COMPILE_MIN_ITERATIONS = 20_000


def resolve_compile(setting, device: torch.device, iterations: int | None = None) -> bool:
    """``compile=auto`` compiles on CUDA, and on a CPU for runs of ``CPU_COMPILE_MIN_ITERATIONS``
    iterations or more (the paper's schedule), where the compile time is a small part of the run."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" or (iterations is not None and iterations >= CPU_COMPILE_MIN_ITERATIONS)


def configure_backend(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    else:
        # An explicit OMP_NUM_THREADS wins (a sweep with gpus=... shares the cores out that way); otherwise
        # use the cores this process may run on (a cluster job or taskset may allow fewer than exist).
        threads = os.environ.get("OMP_NUM_THREADS", "").strip()
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        else:
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity")
                                  else torch.get_num_threads())


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


class TrainStep:
    """One SGD step: forward, backward, update.

    Returns the loss and the number of wrong predictions as device tensors, so the loop
    never waits for the GPU. With ``compile_model`` the forward and backward pass run
    through torch.compile; if compiling fails, the step warns once and runs eagerly.
    """

    def __init__(self, model, optimizer, scaler, amp, compile_model: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.amp = amp
        self.forward = torch.compile(model) if compile_model else model

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._step(x, y)
        except Exception as error:
            if self.forward is self.model:
                raise
            print(f"warning: torch.compile failed ({error_line(error)}); training without compiling", file=sys.stderr)
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


def error_line(error: BaseException) -> str:
    """An exception as one short line, for a warning."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


# --- the learning rate as a device tensor, and the CUDA-graph step -------------------------------

def learning_rate_tensor(lr: float, device: torch.device) -> torch.Tensor:
    """The learning rate as a 0-d float32 tensor on the training device, for ``make_optimizer``.

    float32 on the parameters' device is what fused CUDA SGD reads in place.
    """
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


def reattach_lr(optimizer: torch.optim.Optimizer, lr: torch.Tensor) -> None:
    """Point every parameter group at the loop's learning-rate tensor again, after ``load_state_dict``.

    Loading a checkpoint replaces each group's settings with the saved ones: the rate becomes the
    saved float (older checkpoints) or a CPU copy of the saved tensor, which ``lr.fill_`` no longer
    reaches and a CUDA graph cannot read. The fused/foreach choice is put back too: it belongs to
    this device, not to the one that wrote the checkpoint.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


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
    that. With ``compile_model`` the graph holds torch.compile's kernels (compiled during warm-up).
    fp16 runs take the eager step (GradScaler's overflow check syncs with the CPU); if capture
    fails, the step warns once and runs eagerly.
    """

    warmup_steps = 3  # as in PyTorch's recipe

    def __init__(self, model, optimizer, scaler, amp, compile_model: bool = False):
        self.eager = TrainStep(model, optimizer, scaler, amp, compile_model=compile_model)
        self.model = model
        self.optimizer = optimizer
        self.amp = autocast_without_cache(amp)
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
            with torch.cuda.graph(graph, stream=side):  # warm-up and capture on one stream
                self.static_loss, self.static_wrong = self._static_step()
        except Exception as error:
            print(f"warning: CUDA graph capture failed ({error_line(error)}); training without it", file=sys.stderr)
            self.optimizer.zero_grad(set_to_none=True)  # gradients may live in the failed graph's memory
            self.static_x = self.static_y = None
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


def autocast_without_cache(amp):
    """``amp`` with autocast's cache of weight casts off, as PyTorch requires for graph capture
    (make_graphed_callables): a cast cached outside the captured region would be replayed stale.
    Each weight is cast once per step here, so the cache saves nothing."""
    if isinstance(amp, torch.autocast):
        return torch.autocast(amp.device, dtype=amp.fast_dtype, enabled=amp._enabled, cache_enabled=False)
    return amp


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


# --- run folder ---------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """What a reader needs to trust or reproduce a run: code version, software, hardware."""
    source = Path(__file__).resolve().parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    return {
        "git_sha": sha,
        "git_dirty": bool(git("status", "--porcelain")) if sha else None,
        "command": sys.argv,
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
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


def existing_result(run_dir: Path) -> dict | None:
    """The run's result.json; a damaged one is reported and ignored (the checkpoint decides)."""
    path = run_dir / RESULT
    if not path.exists():
        return None
    try:
        result = read_json(path)
        if not isinstance(result, dict) or "status" not in result:
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


# --- the run ------------------------------------------------------------------------------------

class Run:
    """One run: its folder, config, data, model, optimizer and statistics, and the records it writes.

    Opening a run checks its config, resumes it from its checkpoint if it has one (refusing
    a checkpoint made under another config), or finds that it is already finished
    (``finished`` then holds its result and nothing else is built). The training loop
    (``train_runs``) asks it for the learning rate and batch of the current iteration, hands
    it each step's loss and error, and lets it evaluate, checkpoint and report.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike, *, progress: bool | None = None):
        config_module.check(cfg)
        self.cfg = cfg
        self.schedule = schedule = cfg.schedule
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = OmegaConf.to_container(cfg, resolve=True)

        if not cfg.resume:
            start_over(self.dir)
        previous = existing_result(self.dir)
        checkpoint = load_checkpoint(self.dir / CHECKPOINT) if (self.dir / CHECKPOINT).exists() else None
        if checkpoint is not None:
            differences = config_module.config_differences(checkpoint["config"], self.config)
            if differences:
                raise UsageError(
                    f"run folder {self.dir} holds a run with another config ({'; '.join(differences[:3])}); "
                    "choose another name=..., or resume=false to start it over"
                )
        self.finished = None
        if previous and previous.get("status") in ("done", "diverged") and \
                (checkpoint is None or previous.get("iterations_done") == checkpoint["iteration"]):
            self.finished = previous  # finished (a diverged run would diverge again)
            return

        self.device = device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, device)
        self.cuda_graph = resolve_cuda_graph(cfg.cuda_graph, device, self.precision)
        configure_backend(device)

        self.data = data = load_data(
            cfg.data.name, cfg.data.root, train_size=cfg.data.train_size, test_size=cfg.data.test_size,
            val_size=cfg.data.val_size, resize=cfg.data.resize, download=cfg.data.download, seed=cfg.seed,
        )
        self.test_images = data.test_images.to(device)
        self.test_labels = data.test_labels.to(device)
        self.mean = pixel_mean(data.train_images).to(device)
        self.batches = TrainBatches(data.train_images.to(device), data.train_labels.to(device), schedule.batch_size,
                                    cfg.seed, self.mean, padding=cfg.data.augment.padding, flip=cfg.data.augment.flip)

        torch.manual_seed(cfg.seed)  # model init
        self.model = build_model(cfg.arch, cfg.depth, cfg.model.shortcut, num_classes=len(data.classes),
                                 block=cfg.model.block, residual_scale=cfg.model.residual_scale,
                                 family=cfg.model.family, width=cfg.model.width)
        self.model = self.model.to(device, memory_format=torch.channels_last)
        self.parameters = count_parameters(self.model)
        self.lr_tensor = learning_rate_tensor(schedule.lr, device)  # the loop fills it every iteration
        self.optimizer = make_optimizer(self.model, schedule, device, lr=self.lr_tensor)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.amp = autocast(device, self.precision)

        # State that a checkpoint restores.
        self.iteration = 0
        self.warmup_done_at = None if warmup_applies(cfg.depth, schedule.warmup.min_depth) else 0
        self.step_stats = torch.zeros(3, dtype=torch.float64, device=device)    # loss sum, errors, images since last eval
        self.warmup_stats = torch.zeros(2, dtype=torch.float64, device=device)  # errors, images since last warm-up check
        self.elapsed_before = 0.0  # wall time of earlier sessions of this run
        self.train_time_s = 0.0    # time spent in training steps (not evaluation), all sessions
        self.best_test_error = math.inf
        self.outcome = "trained"
        self.image_counts: dict[int, torch.Tensor] = {}  # batch size -> the same number on the device
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            (self.dir / METRICS).unlink(missing_ok=True)
        self.lr = self.learning_rate()

        atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(self.dir / "env.json", {**environment(device), "resumed_at_iteration": self.iteration or None,
                                                  "precision": self.precision})
        self.session_start = time.perf_counter()
        self.result("running")
        self.progress = _progress_bar(cfg, self.dir.name, self.iteration, enabled=progress)
        self.interval_start = time.perf_counter()
        self.model.train()

    def _restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        reattach_lr(self.optimizer, self.lr_tensor)
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.iteration = checkpoint["iteration"]
        self.warmup_done_at = checkpoint["warmup_done_at"]
        self.step_stats.copy_(checkpoint["step_stats"])
        self.warmup_stats.copy_(checkpoint["warmup_stats"])
        self.elapsed_before = checkpoint["elapsed_s"]
        self.train_time_s = checkpoint["train_time_s"]
        self.best_test_error = checkpoint["best_test_error"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)
        # Metrics written after the checkpoint are recomputed: drop them so curves have no duplicates.
        kept = [m for m in read_metrics(self.dir) if m["iteration"] <= self.iteration]
        write_jsonl(self.dir / METRICS, kept)
        self.outcome = "resumed"

    # --- the loop's questions and reports ---

    @property
    def training(self) -> bool:
        return self.iteration < self.schedule.iterations

    def learning_rate(self) -> float:
        schedule = self.schedule
        return learning_rate(self.iteration, lr=schedule.lr, milestones=schedule.milestones, gamma=schedule.gamma,
                             warming_up=self.warmup_done_at is None, warmup_lr=schedule.warmup.lr)

    def record_step(self, loss: torch.Tensor, wrong: torch.Tensor, images: int, lr: float) -> None:
        """Count one finished step. Statistics stay on the device: reading them forces a sync,
        so that happens only at evaluations and warm-up checks."""
        self.iteration += 1
        self.lr = lr
        # Made once: a tensor from a Python number is a host-to-device copy, which would wait every step.
        if images not in self.image_counts:
            self.image_counts[images] = torch.tensor(float(images), dtype=torch.float64, device=self.device)
        seen = self.image_counts[images]
        self.step_stats += torch.stack([loss.double() * images, wrong.double(), seen])
        if self.warmup_done_at is None:
            self.warmup_stats += torch.stack([wrong.double(), seen])
            if self.iteration % self.schedule.warmup.check_every == 0:
                errors, seen = self.warmup_stats.tolist()
                self.warmup_stats.zero_()
                if errors / seen < self.schedule.warmup.until_train_error:
                    self.warmup_done_at = self.iteration
                    self.progress.write(f"{self.dir.name}: warm-up done at iteration {self.iteration} "
                                        f"(training error {errors / seen:.1%}); lr back to {self.schedule.lr}")
        self.progress.update(1)

    def evaluation_due(self) -> bool:
        return self.iteration % self.schedule.eval_every == 0 or not self.training

    def checkpoint_due(self) -> bool:
        return self.iteration % self.schedule.checkpoint_every == 0 or not self.training

    def evaluate(self) -> bool:
        """Test error now, training error since the last evaluation: one line in metrics.jsonl.
        Returns False if the run diverged (then it is recorded as such and should stop)."""
        now = time.perf_counter()
        loss_sum, errors, seen = self.step_stats.tolist()
        self.step_stats.zero_()
        self.train_time_s += now - self.interval_start
        test_loss, test_error = evaluate(self.model, self.test_images, self.test_labels, self.mean,
                                         self.schedule.eval_batch_size, self.amp)
        train_loss = loss_sum / seen
        record = {
            "iteration": self.iteration, "epoch": round(self.iteration / self.batches.steps_per_epoch, 3),
            "lr": self.lr, "train_loss": train_loss, "train_error": errors / seen,
            "test_loss": test_loss, "test_error": test_error, "eval_set": self.data.eval_set,
            "time_s": round(self.elapsed(), 3),
            # Per weighted layer, from the last step's gradients: the vanishing-gradient view.
            "grad_norms": gradient_norms(self.model),
            "images_per_s": round(seen / max(now - self.interval_start, 1e-9), 1),
        }
        append_jsonl(self.dir / METRICS, record)
        self.progress.set_postfix(lr=f"{self.lr:.3g}", loss=f"{train_loss:.3f}", err=f"{errors / seen:.1%}",
                                  test=f"{test_error:.1%}", ips=f"{record['images_per_s']:.0f}")
        self.interval_start = time.perf_counter()
        if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
            self.progress.close()
            self.save_checkpoint()
            print(f"{self.dir.name}: diverged at iteration {self.iteration} (loss {train_loss}); "
                  "the run stops here", file=sys.stderr)
            self.result("diverged", diverged_at=self.iteration)
            return False
        self.best_test_error = min(self.best_test_error, test_error)
        return True

    def pause(self) -> None:
        """Stop between steps: checkpoint now, status ``interrupted``."""
        self.train_time_s += time.perf_counter() - self.interval_start
        self.interval_start = time.perf_counter()
        self.save_checkpoint()
        self.progress.close()
        self.result("interrupted")

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    # --- records ---

    def save_checkpoint(self) -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "iteration": self.iteration, "warmup_done_at": self.warmup_done_at,
            "step_stats": self.step_stats.cpu(), "warmup_stats": self.warmup_stats.cpu(), "elapsed_s": self.elapsed(),
            "train_time_s": self.train_time_s, "best_test_error": self.best_test_error,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "config": self.config,
        }
        path = self.dir / CHECKPOINT
        try:
            atomic_write(path, lambda f: torch.save(state, f))
        except OSError as error:  # e.g. a full disk: the temporary file is gone, the old checkpoint intact
            kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint yet"
            raise UsageError(f"could not write {path} ({error.strerror or error}); {kept}; "
                             "free some space and run the same command to resume") from error

    def result(self, status: str, **extra) -> dict:
        """Write result.json with the run's status and latest numbers; return it."""
        cfg, schedule = self.cfg, self.schedule
        metrics = read_metrics(self.dir)
        last = metrics[-1] if metrics else {}
        record = {
            "status": status, "run_name": self.dir.name, "arch": cfg.arch, "depth": cfg.depth, "seed": cfg.seed,
            "shortcut": cfg.model.shortcut if cfg.arch == "resnet" else None, "parameters": self.parameters,
            "iterations": schedule.iterations, "iterations_done": self.iteration,
            "final_train_error": last.get("train_error"), "final_test_error": last.get("test_error"),
            "final_train_loss": last.get("train_loss"), "final_test_loss": last.get("test_loss"),
            "best_test_error": None if math.isinf(self.best_test_error) else self.best_test_error,
            "eval_set": self.data.eval_set, "wall_time_s": round(self.elapsed(), 3),
            "images_per_s": round(self.iteration * schedule.batch_size / self.train_time_s, 1)
            if self.train_time_s else None,
            "device": str(self.device), "precision": self.precision, "error": None, "diverged_at": None,
        }
        record.update(extra)
        atomic_write_json(self.dir / RESULT, record)
        self.last_result = record
        return record


def train_runs(runs: list[Run], step: Callable[[list[Run]], None], *, stop_after: int | None = None,
               before_records: Callable[[list[Run]], None] = lambda runs: None) -> list[dict]:
    """The training loop, for one run or several trained in lockstep (``resexp.fused``).

    ``step(runs)`` takes one SGD step of every run and reports it with ``Run.record_step``;
    ``before_records(runs)`` brings each run's model and optimizer up to date before they are
    evaluated or checkpointed (fused runs train on stacked copies). Returns each run's result,
    with ``outcome`` saying what this call did: ``trained``, ``resumed``, ``stopped``
    (``stop_after`` reached; tests use it to simulate an interruption) or ``diverged``.
    """
    results: dict[int, dict] = {}
    active = list(runs)
    try:
        with StopSignals() as stop:
            while active and active[0].training:
                step(runs)
                evaluating = [run for run in active if run.evaluation_due()]
                checkpointing = [run for run in active if run.checkpoint_due()]
                stopping = stop.received is not None or (stop_after is not None and active[0].iteration >= stop_after)
                if evaluating or checkpointing or stopping:
                    before_records(runs)
                for run in evaluating:
                    if not run.evaluate():
                        results[id(run)] = {**run.last_result, "outcome": run.outcome}
                        active.remove(run)  # a fused twin keeps its slot in the step, its records stop here
                for run in checkpointing:
                    if run in active:
                        run.save_checkpoint()
                if stopping:
                    for run in active:
                        run.pause()
                    if stop.received is not None:
                        stop.hand_over()
                        raise RunInterrupted(stop.received)
                    for run in active:
                        results[id(run)] = {**run.last_result, "outcome": "stopped"}
                    active = []
    except torch.OutOfMemoryError as error:
        for run in runs:
            run.progress.close()
        run = runs[0]
        raise UsageError(out_of_memory_message(", ".join(r.dir.name for r in runs), run.schedule.batch_size,
                                               run.device)) from error
    for run in active:
        run.progress.close()
        results[id(run)] = {**run.result("done"), "outcome": run.outcome}
    return [results[id(run)] for run in runs]


def eager_step(train_step) -> Callable[[list[Run]], None]:
    """One run's step: set the learning rate, take the iteration's batch, one SGD step."""

    def step(runs: list[Run]) -> None:
        (run,) = runs
        lr = run.learning_rate()
        run.lr_tensor.fill_(lr)
        x, y = run.batches.batch(run.iteration)
        loss, wrong = train_step(x.contiguous(memory_format=torch.channels_last), y)
        run.record_step(loss, wrong, len(y), lr)

    return step


def train(cfg: DictConfig, run_dir: str | os.PathLike, *, stop_after: int | None = None) -> dict:
    """Train (or resume, or skip if finished) the run that ``cfg`` describes in ``run_dir``.

    Returns the run's result dict, with ``outcome`` saying what this call did: ``trained``,
    ``resumed``, ``skipped`` (already finished) or ``stopped`` (``stop_after`` reached).
    """
    run = Run(cfg, run_dir)
    if run.finished is not None:
        return {**run.finished, "outcome": "skipped"}
    (result,) = train_runs([run], eager_step(make_train_step(run)), stop_after=stop_after)
    return result


def make_train_step(run: Run) -> TrainStep:
    """The step ``resexp train`` uses: one CUDA graph replay per iteration on a GPU, eager on a CPU."""
    step_class = GraphedTrainStep if run.cuda_graph else TrainStep
    return step_class(run.model, run.optimizer, run.scaler, run.amp,
                      compile_model=resolve_compile(run.cfg.compile, run.device, run.schedule.iterations))


def _progress_bar(cfg: DictConfig, label: str, start: int, *, enabled: bool | None = None):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.schedule.iterations, initial=start, desc=label, unit="it", dynamic_ncols=True,
                disable=not (cfg.progress if enabled is None else enabled), file=sys.stderr, mininterval=1.0)
