"""The training step's fast path: the learning rate as a device tensor, the warm-up snapshot, and
the CUDA-graph step (its GPU tests are skipped on a machine without one)."""

import io
import subprocess
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from resexp import config as config_module
from resexp.errors import UsageError
from resexp.models import build_model
from resexp.train import (GraphedTrainStep, TrainingSnapshot, TrainStep, autocast, learning_rate_tensor,
                          make_optimizer, reattach_lr, resolve_cuda_graph)

SCHEDULE = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=1e-4)  # the paper's SGD settings
LRS = [0.1, 0.1, 0.01, 0.01, 0.001]  # a schedule with drops between steps
BATCH = 16
RESEXP = Path(sysconfig.get_path("scripts")) / "resexp"
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_net(device="cpu"):
    torch.manual_seed(0)
    return build_model("resnet", 8, "A", num_classes=10).to(device, memory_format=torch.channels_last)


def batches(count, device="cpu"):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=generator).to(device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (BATCH,), generator=generator).to(device)) for _ in range(count)]


def eager(model, optimizer):
    return TrainStep(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), autocast(CPU, "fp32"))


def state(model, optimizer):
    """Everything a step changes, as detached copies: parameters, buffers, momentum buffers."""
    tensors = {f"model.{name}": t.detach().clone() for name, t in model.state_dict().items()}
    for index, param in enumerate(model.parameters()):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().clone()
    return tensors


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


# --- the CUDA graph (GPU only) ------------------------------------------------------------------

def cuda_pair(precision, net=small_net):
    """Two identical models with optimizers and lr tensors, an eager and a graphed step."""
    device = torch.device("cuda")
    steps = []
    for step_class in (TrainStep, GraphedTrainStep):
        model = net(device)
        lr = learning_rate_tensor(SCHEDULE.lr, device)
        optimizer = make_optimizer(model, SCHEDULE, device, lr=lr)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        steps.append((model, optimizer, lr, step_class(model, optimizer, scaler, autocast(device, precision))))
    return steps


def train_both(pair, count=len(LRS)):
    (eager_model, eager_optimizer, eager_lr, eager_step), (graph_model, graph_optimizer, graph_lr, graph_step) = pair
    for rate, (x, y) in zip(LRS * (count // len(LRS) + 1), batches(count, "cuda")):
        eager_lr.fill_(rate)
        graph_lr.fill_(rate)
        eager_loss, eager_wrong = eager_step(x, y)
        graph_loss, graph_wrong = graph_step(x, y)
        torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-3, atol=1e-4)
        assert abs(int(graph_wrong) - int(eager_wrong)) <= 1
    return state(eager_model, eager_optimizer), state(graph_model, graph_optimizer)


@pytest.fixture
def deterministic_cudnn():
    """The eager and graphed step then pick the same convolution algorithms, run to run."""
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = previous


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_step_trains_like_the_eager_step(precision, deterministic_cudnn):
    pair = cuda_pair(precision)
    eager_state, graph_state = train_both(pair)
    assert pair[1][3].graph is not None  # really replayed a graph
    assert eager_state.keys() == graph_state.keys()
    for name in eager_state:
        torch.testing.assert_close(graph_state[name], eager_state[name], rtol=1e-3, atol=1e-4, msg=name)
    # .grad holds the last replay's gradients, for the logged gradient norms.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pair[1][0].parameters())


@needs_cuda
def test_graphed_step_trains_fp16_eagerly(deterministic_cudnn):
    pair = cuda_pair("fp16")
    eager_state, graph_state = train_both(pair)
    assert pair[1][3].graph is None
    for name in eager_state:
        torch.testing.assert_close(graph_state[name], eager_state[name], msg=name)


class SyncingNet(torch.nn.Module):
    """A net whose forward reads a value back to the CPU: trains eagerly, cannot be captured."""

    def __init__(self, device):
        super().__init__()
        torch.manual_seed(0)
        self.net = small_net(device)

    def forward(self, x):
        if x.abs().max().item() < 0:  # never true; the read-back is the point
            x = -x
        return self.net(x)


@needs_cuda
def test_a_failed_capture_warns_once_and_trains_eagerly_from_the_untouched_state(capsys, deterministic_cudnn):
    pair = cuda_pair("fp32", net=SyncingNet)
    eager_state, graph_state = train_both(pair)
    assert pair[1][3].graph is None
    warnings = [line for line in capsys.readouterr().err.splitlines() if "CUDA graph capture failed" in line]
    assert len(warnings) == 1
    for name in eager_state:
        torch.testing.assert_close(graph_state[name], eager_state[name], msg=name)
