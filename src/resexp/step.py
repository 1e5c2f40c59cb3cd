"""The training step: device, precision, compiling and the CUDA graph.

``train.py`` runs a run (its folder, lock, checkpoint, resume and result); this module is what
one SGD step needs below that, and knows nothing of run folders:

    resolve_device, resolve_precision,    what ``device=``, ``precision=``, ``compile=`` and
    resolve_compile, resolve_cuda_graph   ``cuda_graph=`` mean on this machine
    configure_backend, CpuThreads         cuDNN's autotuner; CPU threads that share the cores
    make_optimizer, learning_rate_tensor  SGD reading its rate from a device tensor
    make_train_step                       ``TrainStep`` (eager, or with compiled blocks), or
                                          ``GraphedTrainStep`` (one CUDA-graph replay per step)
    evaluate                              loss and error on a whole image set

Compiling is regional: each block of the net (``models.blocks``) is compiled in place, and blocks
of one shape share their compiled code, so a 1202-layer net compiles about as fast as a 20-layer
one; the stem and head run eagerly. Only public torch APIs are used: GPU hosts carry other torch
versions than the one pinned here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import normalize
from .errors import UsageError
from .machine import OtherPrograms, threads_beside, usable_cores
from .models import blocks

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
    the blocks are compiled twice. Each weight is cast once per step, so the cache saved nothing.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


# On a CPU, compiling a CIFAR net's blocks takes about a minute (the first time a machine sees them;
# seconds from its cache after that) and saves ~15% of every step (docs/benchmarks.md): repaid by long runs only.
CPU_COMPILE_MIN_ITERATIONS = 20_000


def resolve_compile(setting, device: torch.device, iterations: int | None = None) -> bool:
    """``compile=auto`` compiles on CUDA, and on a CPU for runs of ``CPU_COMPILE_MIN_ITERATIONS``
    iterations or more (the paper's schedule), where the compile time is a small part of the run."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" or (iterations is not None and iterations >= CPU_COMPILE_MIN_ITERATIONS)


def resolve_cuda_graph(setting, device: torch.device, precision: str) -> bool:
    """``cuda_graph=auto`` captures the step on CUDA unless the run trains in fp16.

    fp16 needs GradScaler. With fused SGD its overflow check and update stay on the GPU, so the
    step need not sync; but the scaler's bookkeeping under capture (its lazily made scale, the
    per-step state it keeps in Python) has not been proven on a GPU here, so fp16 keeps the
    eager step, and bf16 (no scaler) gets the graph.
    """
    if setting is True and device.type != "cuda":
        raise UsageError(f"cuda_graph=true needs a CUDA GPU, but this run trains on the {device.type}; "
                         "use cuda_graph=auto (on when a GPU is used) or cuda_graph=false")
    if setting is True and precision == "fp16":
        raise UsageError("cuda_graph=true does not capture precision=fp16 (its gradient scaler is not "
                         "proven under capture); use precision=bf16, or cuda_graph=auto to train fp16 without a graph")
    if setting == "auto":
        return device.type == "cuda" and precision != "fp16"
    return bool(setting)


def check_machine(cfg) -> None:
    """What the config needs of this machine (a GPU torch can use for device=cuda, one for fp16 or
    cuda_graph=true), checked with the config, before anything trains: the run's own one-line error."""
    device = resolve_device(cfg.device)
    resolve_cuda_graph(cfg.cuda_graph, device, resolve_precision(cfg.precision, device))


def configure_backend(device: torch.device, cpu_threads: int | None = None) -> "CpuThreads":
    """cuDNN's autotuner on a GPU; on a CPU, torch's threads (``cpu_threads``: the count a checkpoint kept)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.cuda.reset_peak_memory_stats(device)  # the run's own peak, for the out-of-memory message
    return CpuThreads(device, cpu_threads)


class CpuThreads:
    """torch's CPU threads: as many as the cores that other programs leave free, looked at again by ``settle``.

    A run settles its threads before its first step and at each evaluation, so two runs (or a run and
    ``resexp analyze``) on one machine step down to the cores each can have: threads that outnumber
    the free cores make every parallel operation wait for the one the scheduler put aside (two
    processes of two threads on two cores each kept a fifth of their speed). The count changes the
    order of floating-point sums, so a checkpoint keeps it and a resumed run starts with it. An
    explicit OMP_NUM_THREADS wins and never changes (a sweep with gpus= shares the cores out so).
    """

    def __init__(self, device: torch.device, count: int | None = None):
        explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
        explicit_count = int(explicit) if explicit.isdigit() and int(explicit) > 0 else None
        self.adapts = device.type == "cpu" and explicit_count is None
        self._others = OtherPrograms() if self.adapts else None
        if device.type == "cpu":
            torch.set_num_threads(explicit_count or count or usable_cores())

    def settle(self) -> int:
        """Threads for the steps ahead, from how busy other programs kept the cores since the last call."""
        if self.adapts:
            wanted = threads_beside(self._others.cores_busy())
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)
        return torch.get_num_threads()


# --- the optimizer ------------------------------------------------------------------------------

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


# --- errors -------------------------------------------------------------------------------------

def caused_by_out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is running out of GPU memory.

    torch.compile and graph capture wrap the errors raised inside them; an out-of-memory error
    there is still out of memory, and must not be taken for a failed compile or capture.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(error):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def out_of_memory_message(run: str, batch_size: int, device: torch.device) -> str:
    """The one line a user gets for running out of GPU memory, wherever it happened."""
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    used = torch.cuda.max_memory_reserved(device) / 2**30 if on_cuda else 0
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if on_cuda else 0
    return (f"{run}: out of GPU memory at batch size {batch_size} (peak {used:.1f} GiB of {total:.1f} GiB); "
            "use a smaller schedule.batch_size or fewer runs per GPU")


def error_line(error: BaseException) -> str:
    """An exception as one short line, for a warning."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


# --- compiling ----------------------------------------------------------------------------------

def compile_blocks(model: torch.nn.Module) -> None:
    """Regional compilation: ``torch.compile`` each block of the net in place, not the whole net.

    Blocks of one shape (every block of a stage but its first) share one compiled graph, so a
    CIFAR net compiles five block kinds whatever its depth, and nets of one sweep find each
    other's kernels in Inductor's on-disk cache. ``dynamic=False``: the five shapes are compiled
    as they are, not as one slower kernel for any shape. Parameter names are unchanged, so
    checkpoints do not depend on compiling.
    """
    if not torch.cuda.is_available():
        # Inductor's import looks for a CUDA toolkit and warns on every CPU run that it found none.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for block in blocks(model):
        block.compile(dynamic=False)


def eager_stance():
    """Run compiled blocks as written: after a failed compile, and where a compile would not pay
    (evaluation: the blocks in eval mode would each compile a second time)."""
    return torch.compiler.set_stance("force_eager")


# --- the training step --------------------------------------------------------------------------

class TrainStep:
    """One SGD step: forward, backward, update.

    Returns the loss and the number of wrong predictions as device tensors, so the loop
    never waits for the GPU. With ``compile`` the net's blocks are compiled (``compile_blocks``);
    the first step compiles them, and if that fails the step warns once, puts back what the
    failed step changed (``TrainingSnapshot``) and runs eagerly from then on. Running out of
    memory is not a failed compile: it is raised as it is.
    """

    def __init__(self, model, optimizer, scaler, amp, compile: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.amp = amp
        self.compiled = compile
        self.proven = not compile  # a compiled step is proven once one has run
        if compile:
            compile_blocks(model)

    def stance(self):
        """How the blocks run: compiled, or (after a failed compile) as written."""
        return contextlib.nullcontext() if self.compiled else eager_stance()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.proven:
            return self._step(x, y)
        snapshot = TrainingSnapshot(self.model, self.optimizer)  # the stem's BN may have run before a block failed
        try:
            result = self._step(x, y)
        except Exception as error:
            if caused_by_out_of_memory(error):
                raise
            snapshot.restore()
            print(f"warning: torch.compile failed ({error_line(error)}); training without compiling "
                  "(compile=false skips it)", file=sys.stderr)
            self.compiled = False
            result = self._step(x, y)
        self.proven = True
        return result

    def _step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        with self.stance(), self.amp:
            logits = self.model(x)
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
    learning rate as a tensor: a float would be frozen into the graph). The update is in the
    graph too, which torch.compile's ``mode="reduce-overhead"`` would leave outside.

    The warm-up steps (the capture's, not the schedule's) are real SGD steps on the first batch. A
    ``TrainingSnapshot`` taken before them is written back after capture, so the first replay is the
    run's true next step.

    The graph is captured at the first call and keeps the addresses of the parameters, buffers,
    momentum buffers and learning-rate tensor it saw: load checkpoints (and ``reattach_lr``) before
    that. With ``compile`` the graph holds the compiled blocks' kernels (compiled during warm-up,
    once: warm-up and capture run under the same autocast settings). fp16 runs take the eager step
    (its gradient scaler is not proven under capture). If capture fails, the step says so in one
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
        with self.eager.stance(), self.amp:
            logits = self.model(self.static_x)
            loss = F.cross_entropy(logits.float(), self.static_y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) != self.static_y).sum()


def capture(graph: torch.cuda.CUDAGraph, work, device: torch.device):
    """Capture ``work()`` into ``graph`` (in a memory pool of its own) on the current stream and
    return what it returned.

    ``torch.cuda.graph`` does the same, but a capture that fails inside it (an operation that
    syncs with the CPU, say) leaves the stream capturing, and its exit raises an error of its own
    in place of the real one. Here a failed capture is ended and the graph reset before the
    error is raised, so the process goes on as before it began.
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # as torch.cuda.graph does: free what can be freed for the graph's pool
    graph.capture_begin()
    try:
        result = work()
        graph.capture_end()
    except BaseException:  # in the captured work, or when the capture ends
        abandon_capture(graph, device)
        raise
    return result


def abandon_capture(graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
    """Undo what a failed capture left behind, with public calls only.

    ``capture_end`` ends the stream's capture (an invalidated capture ends with an error, but it
    ends) and stops the allocator from sending this stream's allocations to the graph's pool.
    ``reset`` then frees the graph and, in recent torch, the pool; older torch keeps that pool's
    memory reserved until the process ends, which wastes memory but harms no later step. Nothing
    here releases the pool by hand: ``reset`` (and the graph's destructor) would release it again.
    """
    if torch.cuda.is_current_stream_capturing():
        with contextlib.suppress(Exception):
            graph.capture_end()
    with contextlib.suppress(Exception):
        graph.reset()
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

    A run that compiles starts from a clean compile cache in memory (Inductor's on-disk cache
    stays). Dynamo keeps at most ``recompile_limit`` (8) compiled versions of a function, and
    every compiled block of every net in a process shares the module-calling code: nets trained
    one after another in one process (a sweep's job process trains one, but tests and scripts call
    ``train`` many times) would use the slots up and train uncompiled after a warning.
    """
    if compile:
        torch.compiler.reset()
    step_class = GraphedTrainStep if cuda_graph else TrainStep
    return step_class(model, optimizer, scaler, amp, compile=compile)


# --- evaluation ---------------------------------------------------------------------------------

def evaluate(model, images, labels, mean, batch_size: int, amp) -> tuple[float, float]:
    """Mean loss and error on a whole (uint8) image set, the net's blocks run as written."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=images.device)
    with torch.inference_mode(), eager_stance():
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


# --- warming the compile cache ------------------------------------------------------------------

def compile_families(configs) -> list:
    """One config for each kind of net among ``configs`` whose runs compile on a GPU: nets that differ
    only in depth compile the same blocks (at the same batch size and precision). Each is the
    family's smallest net that still has every block shape its members have: ResNet-14 holds the
    five shapes of any deeper CIFAR net."""
    from omegaconf import OmegaConf

    families: dict[str, list] = {}
    for cfg in configs:
        device = resolve_device(cfg.device)
        if device.type != "cuda" or not resolve_compile(cfg.compile, device, cfg.schedule.iterations):
            continue
        key = repr((cfg.arch, OmegaConf.to_container(cfg.model), cfg.schedule.batch_size,
                    resolve_precision(cfg.precision, device)))
        families.setdefault(key, []).append(cfg)
    representatives = []
    for members in families.values():
        smallest = min(members, key=lambda cfg: cfg.depth)
        if smallest.model.family == "cifar" and smallest.depth < 14 <= max(cfg.depth for cfg in members):
            smallest = OmegaConf.merge(smallest, {"depth": 14})
        representatives.append(smallest)
    return representatives


def step_on_random_data(cfg, *, compile: bool, cuda_graph: bool):
    """``cfg``'s net and step as ``resexp train`` builds them, and one batch of random images to step
    on (the time and memory of a step depend on shapes only): ``(step, x, y)``. For the cost probe
    and for warming the compile cache."""
    from .models import build_model_for

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backend(device)
    model = build_model_for(cfg).to(device, memory_format=torch.channels_last)
    lr = learning_rate_tensor(cfg.schedule.lr, device)
    step = make_train_step(model, make_optimizer(model, cfg.schedule, device, lr=lr),
                           torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                           autocast(device, precision), compile=compile, cuda_graph=cuda_graph)
    batch = cfg.schedule.batch_size
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    return step, x, torch.randint(0, 10, (batch,), device=device)


def warm_compile_cache(cfg) -> None:
    """One compiled training step of ``cfg``'s net on random data: Inductor's on-disk cache then holds
    its blocks, and runs started side by side load them instead of each compiling them cold."""
    step, x, y = step_on_random_data(cfg, compile=True, cuda_graph=False)
    step(x, y)


def warm_compile_cache_apart(configs) -> None:
    """Compile the blocks of every kind of net among ``configs`` once, in a process of its own (no CUDA
    context stays in the caller), before their runs start side by side on GPUs. A failure is a warning:
    each run compiles for itself then."""
    import time

    from omegaconf import OmegaConf

    families = compile_families(configs)
    if not families:
        return
    names = ", ".join(f"{cfg.arch}-{cfg.depth}" for cfg in families)
    print(f"compiling the blocks of {names} once, for the runs to share", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        run_apart("resexp.step", {"configs": [OmegaConf.to_container(cfg, resolve=True) for cfg in families]})
    except RuntimeError as failed:
        print(f"warning: compiling the blocks ahead failed ({failed}); each run compiles its own", file=sys.stderr)
        return
    print(f"compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def run_apart(module: str, document) -> str:
    """``python -m module`` with ``document`` (a config, or a dict of them) as YAML on its stdin: GPU work
    in a process of its own, whose CUDA context and memory go when it ends. Returns its stdout; raises
    RuntimeError with the last line it printed on stderr when it fails."""
    import subprocess

    from omegaconf import OmegaConf

    done = subprocess.run([sys.executable, "-m", module], input=OmegaConf.to_yaml(document, resolve=True),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
    return done.stdout


if __name__ == "__main__":  # warm_compile_cache_apart's process: the configs on stdin
    from omegaconf import OmegaConf

    for family in OmegaConf.create(sys.stdin.read()).configs:
        warm_compile_cache(family)
