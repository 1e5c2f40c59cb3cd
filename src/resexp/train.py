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
import signal
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
from .files import (append_jsonl, atomic_write, atomic_write_json, atomic_write_text, read_json, read_jsonl,
                    write_jsonl)
from .models import build_model, count_parameters, gradient_norms

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"
CHECKPOINT_FORMAT = 1


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM arrived; the run saved a checkpoint and can be resumed.

    A BaseException, like KeyboardInterrupt, so that it stops a whole sweep rather than
    being recorded as one failed job.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


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


def resolve_compile(setting, device: torch.device) -> bool:
    """``compile=auto`` compiles on CUDA only: on a CPU the compile time outweighs short runs."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def configure_backend(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    else:
        # Use the cores this process may run on (a cluster job or taskset may allow fewer than exist).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity")
                              else torch.get_num_threads())


def make_optimizer(model, schedule, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter, as the paper (and fb.resnet.torch) did."""
    return torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
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
            print(f"warning: torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                  "training without compiling", file=sys.stderr)
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


class StopSignals:
    """SIGINT/SIGTERM/SIGUSR2 set a flag the loop checks after each step; a second signal stops at once.

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
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr)

    def hand_over(self) -> None:
        """Give SIGUSR2 to the handler it displaced, if any (submitit's: requeue the job and exit)."""
        previous = self._previous.get(self.received)
        if self.received == signal.SIGUSR2 and callable(previous):
            previous(self.received, None)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def out_of_memory_message(run: str, batch_size: int, device: torch.device) -> str:
    used = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0
    return (f"{run}: out of GPU memory at batch size {batch_size} (peak {used:.1f} GiB of {total:.1f} GiB); "
            "use a smaller schedule.batch_size or fewer runs per GPU")


# --- the run ------------------------------------------------------------------------------------

def train(cfg: DictConfig, run_dir: str | os.PathLike, *, stop_after: int | None = None) -> dict:
    """Train (or resume, or skip if finished) the run that ``cfg`` describes in ``run_dir``.

    Returns the run's result dict, with ``outcome`` saying what this call did: ``trained``,
    ``resumed``, ``skipped`` (already finished) or ``stopped`` (``stop_after`` reached; tests
    use it to simulate an interruption).
    """
    config_module.check(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    schedule = cfg.schedule

    if not cfg.resume:
        start_over(run_dir)
    previous = existing_result(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).exists() else None
    if checkpoint is not None:
        differences = config_module.config_differences(checkpoint["config"], config)
        if differences:
            raise UsageError(
                f"run folder {run_dir} holds a run with another config ({'; '.join(differences[:3])}); "
                "choose another name=..., or resume=false to start it over"
            )
    if previous and previous.get("status") in ("done", "diverged") and \
            (checkpoint is None or previous.get("iterations_done") == checkpoint["iteration"]):
        return {**previous, "outcome": "skipped"}  # finished (a diverged run would diverge again)

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backend(device)

    data = load_data(
        cfg.data.name, cfg.data.root, train_size=cfg.data.train_size, test_size=cfg.data.test_size,
        val_size=cfg.data.val_size, resize=cfg.data.resize, download=cfg.data.download, seed=cfg.seed,
    )
    train_images = data.train_images.to(device)
    train_labels = data.train_labels.to(device)
    test_images = data.test_images.to(device)
    test_labels = data.test_labels.to(device)
    mean = pixel_mean(data.train_images).to(device)
    batches = TrainBatches(train_images, train_labels, schedule.batch_size, cfg.seed, mean,
                           padding=cfg.data.augment.padding, flip=cfg.data.augment.flip)

    torch.manual_seed(cfg.seed)  # model init
    model = build_model(cfg.arch, cfg.depth, cfg.model.shortcut, num_classes=len(data.classes),
                        block=cfg.model.block, residual_scale=cfg.model.residual_scale,
                        family=cfg.model.family, width=cfg.model.width)
    model = model.to(device, memory_format=torch.channels_last)
    parameters = count_parameters(model)
    optimizer = make_optimizer(model, schedule, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = autocast(device, precision)
    step = TrainStep(model, optimizer, scaler, amp, compile_model=resolve_compile(cfg.compile, device))

    # State that a checkpoint restores.
    iteration = 0
    warmup_done_at = None if warmup_applies(cfg.depth, schedule.warmup.min_depth) else 0
    step_stats = torch.zeros(3, dtype=torch.float64, device=device)    # loss sum, errors, images since last eval
    warmup_stats = torch.zeros(2, dtype=torch.float64, device=device)  # errors, images since last warm-up check
    elapsed_before = 0.0  # wall time of earlier sessions of this run
    train_time_s = 0.0    # time spent in training steps (not evaluation), all sessions
    best_test_error = math.inf
    outcome = "trained"
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        iteration = checkpoint["iteration"]
        warmup_done_at = checkpoint["warmup_done_at"]
        step_stats.copy_(checkpoint["step_stats"])
        warmup_stats.copy_(checkpoint["warmup_stats"])
        elapsed_before = checkpoint["elapsed_s"]
        train_time_s = checkpoint["train_time_s"]
        best_test_error = checkpoint["best_test_error"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        # Metrics written after the checkpoint are recomputed: drop them so curves have no duplicates.
        kept = [m for m in read_metrics(run_dir) if m["iteration"] <= iteration]
        write_jsonl(run_dir / METRICS, kept)
        outcome = "resumed"
    else:
        (run_dir / METRICS).unlink(missing_ok=True)

    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(run_dir / "env.json", {**environment(device), "resumed_at_iteration": iteration or None,
                                              "precision": precision})

    def result(status: str, **extra) -> dict:
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
            "device": str(device), "precision": precision, "error": None, "diverged_at": None,
        }
        record.update(extra)
        atomic_write_json(run_dir / RESULT, record)
        return record

    def save_checkpoint() -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "iteration": iteration, "warmup_done_at": warmup_done_at,
            "step_stats": step_stats.cpu(), "warmup_stats": warmup_stats.cpu(), "elapsed_s": elapsed(),
            "train_time_s": train_time_s, "best_test_error": best_test_error,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "config": config,
        }
        try:
            atomic_write(run_dir / CHECKPOINT, lambda f: torch.save(state, f))
        except OSError as error:  # e.g. a full disk: the temporary file is gone, the old checkpoint intact
            kept = "the previous checkpoint is intact" if (run_dir / CHECKPOINT).exists() else "no checkpoint yet"
            raise UsageError(f"could not write {run_dir / CHECKPOINT} ({error.strerror or error}); {kept}; "
                             "free some space and run the same command to resume") from error

    session_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

    result("running")
    progress = _progress_bar(cfg, run_dir.name, iteration)
    interval_start = time.perf_counter()
    model.train()

    try:
        with StopSignals() as stop:
            while iteration < schedule.iterations:
                warming_up = warmup_done_at is None
                lr = learning_rate(iteration, lr=schedule.lr, milestones=schedule.milestones, gamma=schedule.gamma,
                                   warming_up=warming_up, warmup_lr=schedule.warmup.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                x, y = batches.batch(iteration)
                loss, wrong = step(x.contiguous(memory_format=torch.channels_last), y)
                iteration += 1

                # Statistics stay on the device; reading them forces a sync, so that happens only at checks.
                step_stats += torch.stack([loss.double() * len(y), wrong.double(),
                                           torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
                if warming_up:
                    warmup_stats += torch.stack([wrong.double(), torch.tensor(float(len(y)), dtype=torch.float64,
                                                                              device=device)])
                    if iteration % schedule.warmup.check_every == 0:
                        errors, seen = warmup_stats.tolist()
                        warmup_stats.zero_()
                        if errors / seen < schedule.warmup.until_train_error:
                            warmup_done_at = iteration
                            progress.write(f"{run_dir.name}: warm-up done at iteration {iteration} "
                                           f"(training error {errors / seen:.1%}); lr back to {schedule.lr}")
                progress.update(1)

                is_last = iteration == schedule.iterations
                if iteration % schedule.eval_every == 0 or is_last:
                    now = time.perf_counter()
                    loss_sum, errors, seen = step_stats.tolist()
                    step_stats.zero_()
                    train_time_s += now - interval_start
                    test_loss, test_error = evaluate(model, test_images, test_labels, mean,
                                                     schedule.eval_batch_size, amp)
                    train_loss = loss_sum / seen
                    record = {
                        "iteration": iteration, "epoch": round(iteration / batches.steps_per_epoch, 3), "lr": lr,
                        "train_loss": train_loss, "train_error": errors / seen,
                        "test_loss": test_loss, "test_error": test_error, "eval_set": data.eval_set,
                        "time_s": round(elapsed(), 3),
                        # Per weighted layer, from the last step's gradients: the vanishing-gradient view.
                        "grad_norms": gradient_norms(model),
                        "images_per_s": round(seen / max(now - interval_start, 1e-9), 1),
                    }
                    append_jsonl(run_dir / METRICS, record)
                    progress.set_postfix(lr=f"{lr:.3g}", loss=f"{train_loss:.3f}", err=f"{errors / seen:.1%}",
                                         test=f"{test_error:.1%}", ips=f"{record['images_per_s']:.0f}")
                    interval_start = time.perf_counter()
                    if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                        progress.close()
                        save_checkpoint()
                        print(f"{run_dir.name}: diverged at iteration {iteration} (loss {train_loss}); "
                              "the run stops here", file=sys.stderr)
                        return {**result("diverged", diverged_at=iteration), "outcome": outcome}
                    best_test_error = min(best_test_error, test_error)

                if iteration % schedule.checkpoint_every == 0 or is_last:
                    save_checkpoint()
                if stop.received is not None or (stop_after is not None and iteration >= stop_after):
                    train_time_s += time.perf_counter() - interval_start
                    interval_start = time.perf_counter()
                    save_checkpoint()
                    progress.close()
                    if stop.received is not None:
                        result("interrupted")
                        stop.hand_over()
                        raise RunInterrupted(stop.received)
                    return {**result("interrupted"), "outcome": "stopped"}

    except torch.OutOfMemoryError as error:
        progress.close()
        raise UsageError(out_of_memory_message(run_dir.name, schedule.batch_size, device)) from error
    progress.close()
    return {**result("done"), "outcome": outcome}


def _progress_bar(cfg: DictConfig, label: str, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.schedule.iterations, initial=start, desc=label, unit="it", dynamic_ncols=True,
                disable=not cfg.progress, file=sys.stderr, mininterval=1.0)
