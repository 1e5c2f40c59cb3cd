"""The training step's fast path on a CPU: the learning rate as a device tensor, the warm-up snapshot,
compiling once, out of memory reported as such. The GPU side is in test_cuda.py."""

import io
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from resexp import config as config_module
from resexp.errors import UsageError
from resexp.step import (GraphedTrainStep, TrainingSnapshot, TrainStep, autocast, learning_rate_tensor,
                         make_optimizer, reattach_lr, resolve_cuda_graph)
from resexp.models import build_model
from steps import LRS, SCHEDULE, batches, small_net, state

RESEXP = Path(sysconfig.get_path("scripts")) / "resexp"
CPU = torch.device("cpu")


def eager(model, optimizer):
    return TrainStep(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), autocast(CPU, "fp32"))


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"differ: {different[:5]}"


# --- the learning rate as a tensor --------------------------------------------------------------

def test_tensor_lr_trains_exactly_like_float_lr_through_a_schedule():
    float_model, tensor_model = small_net(), small_net()
    float_optimizer = make_optimizer(float_model, SCHEDULE, CPU)
    lr = learning_rate_tensor(SCHEDULE.lr, CPU)
    tensor_optimizer = make_optimizer(tensor_model, SCHEDULE, CPU, lr=lr)
    float_step, tensor_step = eager(float_model, float_optimizer), eager(tensor_model, tensor_optimizer)
    for rate, (x, y) in zip(LRS, batches(len(LRS))):
        for group in float_optimizer.param_groups:
            group["lr"] = rate
        lr.fill_(rate)
        float_loss, float_wrong = float_step(x, y)
        tensor_loss, tensor_wrong = tensor_step(x, y)
        assert torch.equal(float_loss, tensor_loss) and torch.equal(float_wrong, tensor_wrong)
    assert_identical(state(float_model, float_optimizer), state(tensor_model, tensor_optimizer))
    assert tensor_optimizer.param_groups[0]["lr"] is lr


def test_the_update_reads_the_rate_from_the_tensor():
    model = small_net()
    lr = learning_rate_tensor(SCHEDULE.lr, CPU)
    optimizer = make_optimizer(model, SCHEDULE, CPU, lr=lr)
    step = eager(model, optimizer)
    (x, y), (x2, y2) = batches(2)
    step(x, y)
    weights = [p.detach().clone() for p in model.parameters()]
    lr.fill_(0.0)
    step(x2, y2)
    assert all(torch.equal(before, p) for before, p in zip(weights, model.parameters()))


def round_trip(state_dict):
    """A state dict saved and loaded as checkpoints are (weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("checkpoint_lr", ["float", "tensor"])
def test_reattach_lr_after_loading_a_checkpoint(checkpoint_lr):
    """Loading replaces the group's rate with the saved one (a float from older checkpoints, a new
    tensor from newer ones); reattach_lr points it at the loop's tensor again."""
    device = CPU
    saved_model = small_net()
    saved_lr = learning_rate_tensor(0.01, device) if checkpoint_lr == "tensor" else None
    saved_optimizer = make_optimizer(saved_model, SCHEDULE, device, lr=saved_lr)
    x, y = batches(1)[0]
    eager(saved_model, saved_optimizer)(x, y)
    checkpoint = round_trip(saved_optimizer.state_dict())
    checkpoint["param_groups"][0]["fused"] = True  # as a CUDA run writes it

    model = small_net()
    model.load_state_dict(saved_model.state_dict())
    lr = learning_rate_tensor(SCHEDULE.lr, device)
    optimizer = make_optimizer(model, SCHEDULE, device, lr=lr)
    optimizer.load_state_dict(checkpoint)
    assert optimizer.param_groups[0]["lr"] is not lr
    reattach_lr(optimizer, lr)
    group = optimizer.param_groups[0]
    assert group["lr"] is lr and group["fused"] is None  # this device's choice, not the checkpoint's
    assert torch.equal(optimizer.state[next(model.parameters())]["momentum_buffer"],
                       saved_optimizer.state[next(saved_model.parameters())]["momentum_buffer"])
    # The loop's tensor now drives the update: rate 0 leaves the weights alone.
    weights = [p.detach().clone() for p in model.parameters()]
    lr.fill_(0.0)
    eager(model, optimizer)(x, y)
    assert all(torch.equal(before, p) for before, p in zip(weights, model.parameters()))


# --- the warm-up snapshot -----------------------------------------------------------------------

def warm_up(step, x, y, steps=GraphedTrainStep.warmup_steps):
    for _ in range(steps):
        step(x, y)


def test_snapshot_restore_undoes_warm_up_steps_bit_for_bit():
    model = small_net()
    lr = learning_rate_tensor(SCHEDULE.lr, CPU)
    optimizer = make_optimizer(model, SCHEDULE, CPU, lr=lr)
    step = eager(model, optimizer)
    data = batches(3)
    for x, y in data[:2]:
        step(x, y)
    before = state(model, optimizer)
    snapshot = TrainingSnapshot(model, optimizer)
    warm_up(step, *data[2])
    assert not torch.equal(before["model.conv1.weight"], model.conv1.weight)
    assert not torch.equal(before["model.bn1.running_mean"], model.bn1.running_mean)
    snapshot.restore()
    assert_identical(before, state(model, optimizer))


def test_a_run_warmed_up_then_restored_trains_exactly_like_one_that_never_warmed_up():
    """The warm-up before capture must not count: from a fresh run (no momentum buffers yet),
    warm up, restore, then train, and compare with the same run trained directly."""
    device = CPU
    direct_model, warmed_model = small_net(), small_net()
    direct_lr, warmed_lr = learning_rate_tensor(SCHEDULE.lr, device), learning_rate_tensor(SCHEDULE.lr, device)
    direct_optimizer = make_optimizer(direct_model, SCHEDULE, device, lr=direct_lr)
    warmed_optimizer = make_optimizer(warmed_model, SCHEDULE, device, lr=warmed_lr)
    direct_step, warmed_step = eager(direct_model, direct_optimizer), eager(warmed_model, warmed_optimizer)
    data = batches(len(LRS))

    snapshot = TrainingSnapshot(warmed_model, warmed_optimizer)
    warm_up(warmed_step, *data[0])
    snapshot.restore()
    momentum = [warmed_optimizer.state[p]["momentum_buffer"] for p in warmed_model.parameters()]
    assert all(not buffer.any() for buffer in momentum)  # created by the warm-up, zeroed: "none yet"

    for rate, (x, y) in zip(LRS, data):
        direct_lr.fill_(rate)
        warmed_lr.fill_(rate)
        direct_loss, _ = direct_step(x, y)
        warmed_loss, _ = warmed_step(x, y)
        assert torch.equal(direct_loss, warmed_loss)
    assert_identical(state(direct_model, direct_optimizer), state(warmed_model, warmed_optimizer))


def test_snapshot_refuses_to_guess_state_it_cannot_undo():
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    snapshot = TrainingSnapshot(model, optimizer)
    warm_up(eager(model, optimizer), *batches(1)[0], steps=1)
    with pytest.raises(ValueError, match="momentum_buffer"):
        snapshot.restore()  # with dampening a zero buffer is not the same as none


# --- the config key -----------------------------------------------------------------------------

def cuda_graph_problems(*overrides):
    cfg = config_module.compose(["data=synthetic", "schedule=smoke", *overrides])
    return [line for line in config_module.problems(cfg) if "cuda_graph" in line]


def test_cuda_graph_key_defaults_to_auto_and_accepts_its_values():
    assert config_module.compose([]).cuda_graph == "auto"
    for value in ("auto", "true", "false"):
        assert cuda_graph_problems(f"cuda_graph={value}") == []
    assert cuda_graph_problems("cuda_graph=true", "precision=bf16", "device=cuda") == []


@pytest.mark.parametrize(("overrides", "needles"), [
    (["cuda_graph=maybe"], ["cuda_graph must be auto, true or false", "'maybe'"]),
    (["cuda_graph=true", "device=cpu"], ["cuda_graph=true needs a CUDA GPU", "device=cpu"]),
    (["cuda_graph=true", "precision=fp16"], ["cuda_graph=true cannot capture precision=fp16", "cuda_graph=auto"]),
])
def test_bad_cuda_graph_settings_are_one_line_each(overrides, needles):
    (problem,) = cuda_graph_problems(*overrides)
    assert "\n" not in problem
    for needle in needles:
        assert needle in problem


def test_cuda_graph_does_not_block_a_resume():
    saved = {"arch": "resnet", "compile": "auto"}  # a checkpoint from before the key existed
    assert config_module.config_differences(saved, {**saved, "cuda_graph": "auto"}) == []
    assert config_module.config_differences({**saved, "cuda_graph": True}, {**saved, "cuda_graph": False}) == []


def test_resolve_cuda_graph():
    cpu, cuda = CPU, torch.device("cuda")
    assert resolve_cuda_graph("auto", cpu, "fp32") is False
    assert resolve_cuda_graph("auto", cuda, "bf16") is True
    assert resolve_cuda_graph("auto", cuda, "fp16") is False  # GradScaler's step is not capturable
    assert resolve_cuda_graph(False, cuda, "bf16") is False
    assert resolve_cuda_graph(True, cuda, "fp32") is True
    with pytest.raises(UsageError, match="cuda_graph=true needs a CUDA GPU"):
        resolve_cuda_graph(True, cpu, "fp32")  # device=auto on a machine without a GPU
    with pytest.raises(UsageError, match="precision=fp16"):
        resolve_cuda_graph(True, cuda, "fp16")


@pytest.mark.parametrize("overrides", [["cuda_graph=maybe"], ["cuda_graph=true", "device=cpu"]],
                         ids=["unknown-value", "true-on-cpu"])
def test_resexp_train_refuses_a_bad_cuda_graph_setting_in_one_line(tmp_path, cli_env, overrides):
    out = tmp_path / "out"
    done = subprocess.run([str(RESEXP), "train", "data=synthetic", "schedule=smoke", "progress=false", f"out={out}",
                           *overrides], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("resexp: error:") and "cuda_graph" in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists()


# --- compiling once, and out of memory (the GPU's failure modes, on a CPU) ----------------------

SMOKE = ["data=synthetic", "data.train_size=256", "data.test_size=64", "schedule=smoke", "schedule.iterations=6",
         "schedule.milestones=[3]",
         "schedule.eval_every=3", "schedule.batch_size=32", "progress=false", "device=cpu"]


def test_autocast_keeps_no_weight_cache():
    """The cache flag is part of torch.compile's guards: every training step must use the same setting."""
    amp = autocast(CPU, "bf16")
    assert isinstance(amp, torch.autocast) and amp._cache_enabled is False


def block_kinds(depth: int) -> int:
    """Block shapes a CIFAR net has: each stage's first block, and (from n = 2) the rest of each stage."""
    return 3 if depth == 8 else 5


def test_every_net_of_a_nine_net_sweep_in_one_process_compiles_each_block_kind_once(tmp_path, counted_compiles):
    """Dynamo keeps 8 compiled versions of the code every compiled block shares; each run starts clean,
    and evaluation (eval mode, no gradients) runs the blocks as written instead of compiling them again."""
    from resexp.train import train

    nets = [(arch, depth) for depth in (8, 14, 20, 26) for arch in ("plain", "resnet")] + [("resnet", 32)]
    for number, (arch, depth) in enumerate(nets):
        before = len(counted_compiles)
        cfg = config_module.compose([*SMOKE, f"arch={arch}", f"depth={depth}", "compile=true", "precision=bf16"])
        train(cfg, tmp_path / f"{arch}-{depth}")
        assert len(counted_compiles) - before == block_kinds(depth), \
            f"net {number + 1} ({arch}-{depth}) compiled {len(counted_compiles) - before} times"


@pytest.mark.parametrize("depth", [20, 110])
def test_compiling_does_not_grow_with_depth(depth, counted_compiles):
    """Regional compilation: the same five block graphs, of the same size, whatever the depth."""

    def compiled_graph_sizes(depth: int) -> list[int]:
        torch.compiler.reset()
        counted_compiles.clear()
        model = build_model("resnet", depth, "A").to(memory_format=torch.channels_last)
        step = TrainStep(model, make_optimizer(model, SCHEDULE, CPU), torch.amp.GradScaler("cpu", enabled=False),
                         autocast(CPU, "fp32"), compile=True)
        x, y = batches(1)[0]
        step(x[:2], y[:2])
        assert list(model.state_dict()) == list(build_model("resnet", depth, "A").state_dict())  # checkpoints as before
        return sorted(len(graph.graph.nodes) for graph in counted_compiles)

    # ResNet-14 is the shallowest net with all five block shapes.
    assert compiled_graph_sizes(depth) == compiled_graph_sizes(14)
    assert len(counted_compiles) == 5


def test_a_failed_compile_warns_once_puts_back_what_it_changed_and_trains_eagerly(monkeypatch, capsys):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler for this machine")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=failing_backend,
                                                                                 dynamic=False))
    compiled_model, eager_model = small_net(), small_net()
    compiled_optimizer = make_optimizer(compiled_model, SCHEDULE, CPU)
    compiled_step = TrainStep(compiled_model, compiled_optimizer, torch.amp.GradScaler("cpu", enabled=False),
                              autocast(CPU, "fp32"), compile=True)
    eager_optimizer = make_optimizer(eager_model, SCHEDULE, CPU)
    eager_step = eager(eager_model, eager_optimizer)
    try:
        for x, y in batches(3):
            compiled_step(x, y)
            eager_step(x, y)
    finally:
        torch.compiler.reset()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 1 and "compile=false" in warnings[0]
    assert compiled_step.compiled is False
    # The stem's BN ran before the first block failed to compile: undone, so the run is exact.
    assert_identical(state(compiled_model, compiled_optimizer), state(eager_model, eager_optimizer))


class OutOfMemoryNet(torch.nn.Module):
    """Stands in for a compiled net that runs out of GPU memory in its forward pass."""

    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_a_compiled_step_is_not_taken_for_a_failed_compile(counted_compiles, capsys):
    model = small_net()
    optimizer = make_optimizer(model, SCHEDULE, CPU)
    step = TrainStep(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), autocast(CPU, "fp32"),
                     compile=True)
    step.model = OutOfMemoryNet()  # its first compiled step runs out of memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        step(*batches(1)[0])
    assert step.compiled  # still compiled: nothing was switched off
    assert "compile failed" not in capsys.readouterr().err


def test_out_of_memory_wrapped_by_the_compiler_is_still_out_of_memory():
    from resexp.step import caused_by_out_of_memory

    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except torch.cuda.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as wrapped:
        assert caused_by_out_of_memory(wrapped)
    assert not caused_by_out_of_memory(RuntimeError("an ordinary compile error"))


def run_out_of_memory(module, args):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_run_that_runs_out_of_memory_says_so_the_first_time_and_records_it(tmp_path, monkeypatch):
    import json

    from resexp import step as step_module
    from resexp import train as train_module

    # Compiling installs a net that runs out of memory in its first forward pass.
    monkeypatch.setattr(step_module, "compile_blocks", lambda model: model.register_forward_pre_hook(run_out_of_memory))
    cfg = config_module.compose([*SMOKE, "compile=true"])
    with pytest.raises(UsageError, match="out of GPU memory at batch size 32"):
        train_module.train(cfg, tmp_path / "run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "failed" and "out of GPU memory" in result["error"]


def test_running_out_of_memory_in_the_cost_probe_is_the_same_one_line(tmp_path, monkeypatch):
    """The cost probe of a single run measures steps at the run's batch size before training starts."""
    import json

    from resexp import estimate
    from resexp import train as train_module

    def probe_out_of_memory(cfg):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(estimate, "seconds_per_cost", probe_out_of_memory)
    cfg = config_module.compose([*SMOKE])
    with pytest.raises(UsageError, match="out of GPU memory at batch size 32"):
        train_module.train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


# --- a GPU that torch cannot use ------------------------------------------------------------------

DRIVER_FILE = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.183.01  Release Build  (dvs-builder@U16)\n"


@pytest.fixture
def unusable_gpu(tmp_path, monkeypatch):
    """A machine whose NVIDIA driver is loaded while torch finds no usable GPU (a driver too old for the build)."""
    from resexp import step as step_module

    version_file = tmp_path / "nvidia-version"
    version_file.write_text(DRIVER_FILE)
    monkeypatch.setattr(step_module, "NVIDIA_DRIVER_VERSION_FILE", version_file)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return step_module


def test_device_auto_refuses_a_gpu_torch_cannot_use(unusable_gpu):
    with pytest.raises(UsageError) as refused:
        unusable_gpu.resolve_device("auto")
    message = str(refused.value)
    assert "535.183.01" in message and (f"CUDA {torch.version.cuda}" in message or "CPU-only" in message)
    assert "TORCH_SPEC" in message and "device=cpu" in message and "\n" not in message
    assert unusable_gpu.resolve_device("cpu") == CPU


def test_hidden_gpus_and_machines_without_a_driver_train_on_the_cpu(unusable_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert unusable_gpu.resolve_device("auto") == CPU  # hidden on purpose
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(unusable_gpu, "NVIDIA_DRIVER_VERSION_FILE", tmp_path / "absent")
    assert unusable_gpu.resolve_device("auto") == CPU


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_resexp_stops_before_training_on_a_gpu_it_cannot_use(unusable_gpu, tmp_path, capsys, command,
                                                              hydra_in_process):
    from resexp import cli

    out = tmp_path / "out"
    code = cli.main([command, "data=synthetic", "schedule=smoke", "depth=8", "progress=false", f"out={out}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and "535.183.01" in lines[0] and "device=cpu" in lines[0], lines
    assert not out.exists()
    assert cli.main(["train", "data=synthetic", "schedule=smoke", "depth=8", "progress=false", "device=cpu",
                     f"out={out}"]) == 0


# --- slots and the progress bar -------------------------------------------------------------------

def test_each_slot_job_gets_its_share_of_compile_workers():
    from resexp.slots import job_environment

    env = job_environment(gpu=1, threads=3)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["OMP_NUM_THREADS"] == env["TORCHINDUCTOR_COMPILE_THREADS"] == "3"


def test_the_progress_bar_shows_running_loss_and_error_before_the_first_evaluation():
    from resexp.train import ProgressBar

    cfg = config_module.compose([*SMOKE, "progress=true"])
    bar = ProgressBar(cfg, "run", 0, CPU)
    sums = torch.tensor([2.5 * 40, 10.0, 40.0], dtype=torch.float64)  # loss sum, errors, images
    for iteration in range(1, ProgressBar.every + 1):
        bar.update(iteration, sums, 0.1)
    bar.close()
    assert bar.fields["loss"] == "2.500" and bar.fields["err"] == "25.0%" and bar.fields["lr"] == "0.1"


# --- code that only a GPU runs, checked on the CPU --------------------------------------------------

def embedded_cuda_scripts() -> dict[str, str]:
    """The Python scripts test_cuda.py runs in processes of their own: its upper-case string constants
    that import something."""
    import test_cuda

    return {name: value for name, value in vars(test_cuda).items()
            if name.isupper() and isinstance(value, str) and "import " in value}


def unbound_names(tree) -> set[str]:
    """Names a script reads but never binds (by assignment, def, class, import, argument or loop) and
    that are not builtins: what would be a NameError when the script runs."""
    import ast
    import builtins

    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound


def test_every_embedded_cuda_script_compiles_and_its_imports_resolve():
    import ast
    import importlib

    scripts = embedded_cuda_scripts()
    assert scripts, "test_cuda.py embeds no scripts: this test looks for the wrong thing"
    for name, source in scripts.items():
        tree = ast.parse(source, filename=name)  # a SyntaxError (an IndentationError) fails here
        compile(tree, name, "exec")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
                assert not missing, f"{name}: {node.module} has no {missing}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
        assert not unbound_names(tree), f"{name} reads names it never defines: {sorted(unbound_names(tree))}"


def test_the_cuda_tests_import_on_a_cpu_and_skip_there():
    """test_cuda.py's own imports resolve (its module is collected everywhere), and without a GPU every
    test in it is marked to skip."""
    import test_cuda

    tests = [value for name, value in vars(test_cuda).items() if name.startswith("test_")]
    assert tests
    if not torch.cuda.is_available():
        assert any(mark.name == "skipif" and mark.args and mark.args[0] for mark in test_cuda.pytestmark)


# --- the cost probe, and how the modules import each other ------------------------------------------

def test_the_cost_probe_runs_in_a_process_of_its_own_where_it_would_use_a_gpu(monkeypatch):
    """On a GPU the sweep's probe must leave no CUDA context behind: it runs as ``python -m resexp.estimate``.
    Here the probe's process is told the device is a GPU, so that path runs on the CPU."""
    from resexp import estimate
    from resexp import step as step_module

    monkeypatch.setattr(step_module, "resolve_device", lambda name: torch.device("cuda"))
    cfg = config_module.compose([*SMOKE, "device=cpu"])
    assert estimate.seconds_per_cost_apart(cfg) > 0
    bad = config_module.compose([*SMOKE, "device=cpu", "schedule.batch_size=0"])  # past the gate: no step to time
    with pytest.raises(UsageError, match="measuring a step of resnet-20 for the cost estimate failed: ZeroDivisionError"):
        estimate.seconds_per_cost_apart(bad)


def test_the_run_the_step_and_the_modules_below_import_each_other_in_one_direction():
    """Imports anywhere in a module (lazy ones too) among config, data, estimate, step and train form no cycle."""
    import ast

    source = Path(__file__).resolve().parents[1] / "src" / "resexp"
    watched = {"config", "data", "estimate", "step", "train", "machine", "models", "files"}
    imports = {}
    for name in watched:
        tree = ast.parse((source / f"{name}.py").read_text())
        imports[name] = {node.module.rsplit(".", 1)[-1] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module
                         and (node.level == 1 or node.module.startswith("resexp."))} & watched

    def reaches(start, goal, seen=()):
        return any(module == goal or (module not in seen and reaches(module, goal, (*seen, module)))
                   for module in imports[start])

    cycles = sorted(name for name in watched if reaches(name, name))
    assert not cycles, f"import cycles through {cycles}: {imports}"
    assert "train" not in imports["step"] and "step" in imports["train"]  # the run sits above the step


def test_a_gpu_sweep_compiles_each_kind_of_net_once_before_its_runs_start(monkeypatch, counted_compiles):
    """Nets that differ only in depth share their compiled blocks: one compile per kind of net, at the
    smallest depth that has every block shape (ResNet-14), warms the cache for the whole sweep."""
    from resexp import step as step_module

    def configs(*overrides):
        return [config_module.compose([*SMOKE, f"arch={arch}", f"depth={depth}", *overrides])
                for arch in ("plain", "resnet") for depth in (8, 20, 56)]

    real_resolve_device = step_module.resolve_device
    monkeypatch.setattr(step_module, "resolve_device", lambda name: torch.device("cuda"))
    families = step_module.compile_families(configs())
    assert sorted((cfg.arch, cfg.depth) for cfg in families) == [("plain", 14), ("resnet", 14)]
    assert [cfg.depth for cfg in step_module.compile_families(configs()[:1])] == [8]  # ResNet-8 alone: its own
    eight_and_fourteen = [config_module.compose([*SMOKE, "arch=resnet", f"depth={depth}"]) for depth in (8, 14)]
    assert [cfg.depth for cfg in step_module.compile_families(eight_and_fourteen)] == [14]  # 14 has 8's shapes too
    assert step_module.compile_families(configs("compile=false")) == []
    assert len(step_module.compile_families(configs("model.shortcut=B"))) == 2  # plain nets have no shortcut
    monkeypatch.setattr(step_module, "resolve_device", real_resolve_device)
    step_module.warm_compile_cache(config_module.compose([*SMOKE, "depth=14", "device=cpu"]))
    assert len(counted_compiles) == 5
