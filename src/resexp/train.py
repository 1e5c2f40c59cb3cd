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

The step itself (device, precision, compiled blocks, the CUDA graph) is ``step.py``'s: on
CUDA one graph replay per iteration; elsewhere, or if capture or compiling fails, an eager step.

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
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import config as config_module
from .data import TrainBatches, load_data, pixel_mean
from .errors import UsageError
from .files import (CHECKPOINT, CONFIG, ENV, LOCK, METRICS, READ_ONLY_ERRNOS, RESULT, append_jsonl, atomic_write,
                    atomic_write_json, atomic_write_text, holder_alive, read_jsonl, read_lock, read_result,
                    typed_command, write_error_reason, write_jsonl)
from .machine import cpu_model, usable_cores
from .models import build_model_for, count_parameters, gradient_norms
from .signals import RunInterrupted, StopSignals
from .step import (autocast, caused_by_out_of_memory, configure_backend, error_line, evaluate, learning_rate_tensor,
                   make_optimizer, make_train_step, out_of_memory_message, reattach_lr, resolve_compile,
                   resolve_cuda_graph, resolve_device, resolve_precision)
from .trackers import open_trackers

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
        if isinstance(error, OSError) and error.errno in READ_ONLY_ERRNOS:  # no space to free: say what it is
            raise UsageError(f"could not write {path}: {write_error_reason(error, path.parent)}; {kept}") from error
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

    # What result.json says of the run, filled in as the set-up goes (a failed set-up is recorded too).
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    parameters = eval_set = None
    iteration = 0
    elapsed_before = 0.0  # wall time of earlier sessions of this run
    train_time_s = 0.0    # time spent in steady training steps (not evaluation, compiling or capture), all sessions
    steady_iterations = 0  # the iterations train_time_s timed
    startup_s = 0.0       # each session's first step: compiling, capture, cuDNN's autotuning
    best_test_error = math.inf
    trackers = None  # logger=...: TensorBoard, MLflow; opened once the run's records are written
    session_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

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
            "eval_set": eval_set, "wall_time_s": round(elapsed(), 3),
            # Steady state: the first step of each session (compiling, capture) is startup_s.
            "images_per_s": round(steady_iterations * schedule.batch_size / train_time_s, 1) if train_time_s else None,
            "startup_s": round(startup_s, 3),
            "device": str(device), "precision": precision, "error": None, "diverged_at": None, **extra,
        }
        atomic_write_json(run_dir / RESULT, record)
        if trackers is not None:
            trackers.ended(status, record)
        return record

    progress = None
    try:
        # Set-up: device, data, model, optimizer.
        use_graph = resolve_cuda_graph(cfg.cuda_graph, device, precision)
        threads = configure_backend(device, checkpoint.get("cpu_threads") if checkpoint else None)
        data = load_data(cfg.data.name, cfg.data.root, train_size=cfg.data.train_size,
                         test_size=cfg.data.test_size, val_size=cfg.data.val_size, resize=cfg.data.resize,
                         download=cfg.data.download, seed=cfg.seed)
        eval_set = data.eval_set
        mean = pixel_mean(data.train_images).to(device)
        batches = TrainBatches(data.train_images.to(device), data.train_labels.to(device), schedule.batch_size,
                               cfg.seed, mean, padding=cfg.data.augment.padding, flip=cfg.data.augment.flip)
        test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
        torch.manual_seed(cfg.seed)  # model init
        model = build_model_for(cfg, num_classes=len(data.classes)).to(device, memory_format=torch.channels_last)
        parameters = count_parameters(model)
        lr_tensor = learning_rate_tensor(schedule.lr, device)  # the loop fills it every iteration
        optimizer = make_optimizer(model, schedule, device, lr=lr_tensor)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        amp = autocast(device, precision)

        # The state a checkpoint holds, from the checkpoint or fresh.
        warmup_done_at = None if warmup_applies(cfg.depth, schedule.warmup.min_depth) else 0
        step_sums = torch.zeros(3, dtype=torch.float64, device=device)    # loss sum, errors, images since last evaluation
        warmup_sums = torch.zeros(2, dtype=torch.float64, device=device)  # errors, images since last warm-up check
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
            # Checkpoints written before startup was timed apart: every iteration counted as steady.
            steady_iterations = checkpoint.get("steady_iterations", iteration)
            startup_s = checkpoint.get("startup_s", 0.0)
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
        cpu_threads = threads.settle() if checkpoint is None else torch.get_num_threads()  # a resumed run keeps its count

        atomic_write_text(run_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(run_dir / ENV, {**environment(device), "resumed_at_iteration": iteration or None,
                                          "precision": precision})
        trackers = open_trackers(cfg, run_dir, iteration)  # from this iteration on

        def checkpoint_now() -> None:
            save_checkpoint(run_dir / CHECKPOINT, {
                "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "iteration": iteration, "warmup_done_at": warmup_done_at,
                "step_stats": step_sums.cpu(), "warmup_stats": warmup_sums.cpu(), "elapsed_s": elapsed(),
                "train_time_s": train_time_s, "steady_iterations": steady_iterations, "startup_s": startup_s,
                "best_test_error": best_test_error, "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                "config": config,
            })
            trackers.checkpointed(iteration)

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
        session_first_step = iteration + 1
        interval_start = time.perf_counter()
        interval_images = 0  # images of the interval's steady steps (the session's first step is startup)
        model.train()
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
                if iteration == session_first_step:  # compiling and capture: timed apart from training speed
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    startup_s += time.perf_counter() - interval_start
                    interval_start = time.perf_counter()
                else:
                    interval_images += schedule.batch_size

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
                    loss_sum, errors, seen = step_sums.tolist()  # waits for the device: the interval's steps are done
                    now = time.perf_counter()
                    step_sums.zero_()
                    train_time_s += now - interval_start
                    steady_iterations += interval_images // schedule.batch_size
                    images_per_s = interval_images / max(now - interval_start, 1e-9)
                    test_loss, test_error = evaluate(model, test_images, test_labels, mean,
                                                     schedule.eval_batch_size, amp)
                    train_loss = loss_sum / seen
                    append_jsonl(run_dir / METRICS, evaluation := {
                        "iteration": iteration, "epoch": round(iteration / batches.steps_per_epoch, 3), "lr": lr,
                        "train_loss": train_loss, "train_error": errors / seen,
                        "test_loss": test_loss, "test_error": test_error, "eval_set": data.eval_set,
                        "time_s": round(elapsed(), 3),
                        # Per weighted layer, from the last step's gradients: the vanishing-gradient view.
                        "grad_norms": gradient_norms(model),
                        "images_per_s": round(images_per_s, 1) if interval_images else None,
                        **({"cpu_threads": cpu_threads} if device.type == "cpu" else {}),  # of the interval's steps
                    })
                    trackers.log(evaluation)
                    progress.show(lr=f"{lr:.3g}", loss=f"{train_loss:.3f}", err=f"{errors / seen:.1%}",
                                  test=f"{test_error:.1%}", ips=f"{images_per_s:.0f}")
                    cpu_threads = threads.settle()  # the cores other programs left free in that interval
                    interval_start = time.perf_counter()
                    interval_images = 0
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
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    train_time_s += time.perf_counter() - interval_start
                    steady_iterations += interval_images // schedule.batch_size
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
        if caused_by_out_of_memory(error):  # in the set-up, the cost probe or a step; raised as it is or wrapped
            message = out_of_memory_message(run_dir.name, schedule.batch_size, device)
            record_ending(progress, write_result, "failed", message)
            raise UsageError(message) from error
        if progress is None:  # a set-up that failed before the run started (unreadable data): nothing to record
            raise
        record_ending(progress, write_result, "failed", str(error) if isinstance(error, UsageError) else
                      error_line(error))
        raise
    progress.close()
    return {**write_result("done"), "outcome": outcome}


def record_ending(progress: ProgressBar | None, write_result, status: str, error: str | None = None) -> None:
    """Say in result.json how a run that stopped on an error ended, so that no dead run shows as running.
    If even that cannot be written (a full disk), the error that stopped the run is what the user sees."""
    if progress is not None:
        progress.close()
    with contextlib.suppress(Exception):
        write_result(status, error=error)
