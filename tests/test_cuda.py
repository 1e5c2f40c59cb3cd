"""The GPU path: the graphed step against the eager one, the production defaults through ``resexp train``,
a resume followed by a capture, and a failed capture that must not harm what comes after it.

Every test here needs a CUDA GPU and is skipped without one; ``pytest -m cuda`` runs just these
(``scripts/gpu-check.sh`` does). Nets are small and runs short (a few hundred iterations on
generated data), so the module takes well under a minute on one GPU.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from resexp import config as config_module
from resexp.step import GraphedTrainStep, TrainStep, autocast, learning_rate_tensor, make_optimizer
from resexp.train import CHECKPOINT, train
from steps import LRS, SCHEDULE, batches, small_net, state

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RESEXP = [sys.executable, "-m", "resexp"]  # works where the package was installed without its scripts
# A short run on learnable generated data: long enough to learn, short enough for a GPU check.
SHORT = ["data=synthetic", "data.train_size=2560", "data.test_size=512", "arch=resnet", "depth=8",
         "schedule=smoke", "schedule.iterations=300", "schedule.milestones=[150,225]", "schedule.eval_every=50",
         "schedule.checkpoint_every=50", "progress=false"]
# bf16 and fp32 round differently and their paths part over hundreds of SGD steps; what must agree is
# what the run learned: final errors within this many points of the fp32 eager run's.
ERROR_TOLERANCE = 0.05


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


def gpu_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("HYDRA_FULL_ERROR", "RESEXP_TRACEBACK")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    return env


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the step -----------------------------------------------------------------------------------

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


def test_graphed_step_trains_fp16_eagerly(deterministic_cudnn):
    pair = cuda_pair("fp16")
    eager_state, graph_state = train_both(pair)
    assert pair[1][3].graph is None
    for name in eager_state:
        torch.testing.assert_close(graph_state[name], eager_state[name], msg=name)


def test_a_compiled_graphed_net_compiles_each_block_kind_once(deterministic_cudnn, counted_compiles):
    """Warm-up and capture run under the same autocast settings: each block shape compiles once, not twice
    (the small net, a ResNet-8, has three: one block per stage)."""
    device = torch.device("cuda")
    torch.compiler.reset()
    model = small_net(device)
    lr = learning_rate_tensor(SCHEDULE.lr, device)
    optimizer = make_optimizer(model, SCHEDULE, device, lr=lr)
    step = GraphedTrainStep(model, optimizer, torch.amp.GradScaler("cuda", enabled=False), autocast(device, "bf16"),
                            compile=True)
    for x, y in batches(6, "cuda"):
        step(x, y)
    assert step.graph is not None
    assert len(counted_compiles) == 3


# The capture fails in its own process: a failed capture must not harm what the process does next
# (and, run here, it would harm the tests after it if it did).
FAILED_CAPTURE_THEN_ANOTHER_NET = textwrap.dedent("""
    import json, sys, torch
    from resexp.models import build_model
    from resexp.step import GraphedTrainStep, TrainStep, autocast, learning_rate_tensor, make_optimizer
    device = torch.device("cuda")
    schedule = type("S", (), dict(lr=0.1, momentum=0.9, weight_decay=1e-4))

    class SyncingNet(torch.nn.Module):
        # reads a value back to the CPU in forward: trains eagerly, cannot be captured
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = build_model("resnet", 8, "A").to(device, memory_format=torch.channels_last)
        def forward(self, x):
            if x.abs().max().item() < 0:
                x = -x
            return self.net(x)

    def step_for(model, step_class):
        optimizer = make_optimizer(model, schedule, device, lr=learning_rate_tensor(0.1, device))
        return step_class(model, optimizer, torch.amp.GradScaler("cuda", enabled=False), autocast(device, "fp32"))

    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 32, 32, generator=generator).to(device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (16,), generator=generator).to(device)) for _ in range(8)]
    failing = step_for(SyncingNet(), GraphedTrainStep)
    for x, y in data:
        failing(x, y)
    torch.cuda.synchronize()
    stream_back = torch.cuda.current_stream() == torch.cuda.default_stream()
    memory_after_failure = torch.cuda.memory_allocated()

    torch.manual_seed(0)
    graphed = step_for(build_model("resnet", 8, "A").to(device, memory_format=torch.channels_last), GraphedTrainStep)
    torch.manual_seed(0)
    eager = step_for(build_model("resnet", 8, "A").to(device, memory_format=torch.channels_last), TrainStep)
    losses = []
    for x, y in data * 4:
        losses.append((float(graphed(x, y)[0]), float(eager(x, y)[0])))
    print(json.dumps({"failed_graph": failing.graph is not None, "stream_back": stream_back,
                      "second_graph": graphed.graph is not None, "losses": losses,
                      "memory_after_failure": memory_after_failure, "memory_end": torch.cuda.memory_allocated()}))
""")


def test_a_failed_capture_warns_once_and_harms_nothing_after_it():
    done = subprocess.run([sys.executable, "-c", FAILED_CAPTURE_THEN_ANOTHER_NET], env=gpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "CUDA graph capture failed" in line]
    assert len(warnings) == 1 and "cuda_graph=false" in warnings[0], done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failed_graph"] is False  # the syncing net trained eagerly
    assert report["stream_back"] is True    # the capture's side stream is not left current
    assert report["second_graph"] is True   # the next net captured as usual
    for graphed_loss, eager_loss in report["losses"]:
        assert graphed_loss == pytest.approx(eager_loss, rel=1e-3, abs=1e-4)
    # Nothing leaks step after step (a capture left "under way" keeps freed blocks from being reused).
    assert report["memory_end"] <= report["memory_after_failure"] + 64 * 2**20


# --- through resexp train -----------------------------------------------------------------------

def test_resexp_train_with_the_production_defaults_learns_like_an_eager_fp32_run(tmp_path):
    """compile=auto cuda_graph=auto precision=auto (compiled, graphed, bf16) against the plain eager fp32 step."""
    runs = {"defaults": [], "eager": ["compile=false", "cuda_graph=false", "precision=fp32"]}
    for name, extra in runs.items():
        done = subprocess.run([*RESEXP, "train", *SHORT, *extra, f"out={tmp_path}", f"name={name}"],
                              env=gpu_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "failed" not in done.stderr, done.stderr  # no compile or capture fallback
    fast = json.loads((tmp_path / "defaults" / "result.json").read_text())
    eager = json.loads((tmp_path / "eager" / "result.json").read_text())
    assert fast["device"].startswith("cuda") and fast["precision"] == "bf16"
    assert eager["final_train_error"] < 0.5  # it learned: the comparison means something
    assert fast["final_train_error"] == pytest.approx(eager["final_train_error"], abs=ERROR_TOLERANCE)
    assert fast["final_test_error"] == pytest.approx(eager["final_test_error"], abs=ERROR_TOLERANCE)


def test_a_resumed_run_captures_its_graph_after_the_restore_and_trains_on(tmp_path, capfd):
    cfg = config_module.compose(SHORT)
    straight = train(cfg, tmp_path / "straight")
    stopped = train(cfg, tmp_path / "resumed", stop_after=120)
    assert stopped["outcome"] == "stopped"
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed["outcome"] == "resumed" and resumed["iterations_done"] == 300
    assert "failed" not in capfd.readouterr().err
    # cuDNN's autotuner may pick other kernels in the second session: equal to rounding, not bit for bit.
    assert [m["iteration"] for m in metrics(tmp_path / "resumed")] == [m["iteration"] for m in metrics(tmp_path / "straight")]
    assert resumed["final_train_error"] == pytest.approx(straight["final_train_error"], abs=ERROR_TOLERANCE)
    checkpoint = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert checkpoint["iteration"] == 300


def test_out_of_memory_is_one_line_naming_the_batch_size(tmp_path):
    """A batch far too large for the GPU: reported as out of memory the first time, not as a failed compile."""
    free, _ = torch.cuda.mem_get_info()
    # A ResNet-20 saves over 1 MiB of activations per image: a batch of more images than the GPU has
    # free MiB cannot fit. The generated training set must hold one batch.
    batch = 1 << int(free // 2**20).bit_length()
    done = subprocess.run([*RESEXP, "train", "data=synthetic", f"data.train_size={batch}", "data.test_size=100",
                           "depth=20", "schedule=smoke", f"schedule.batch_size={batch}", "progress=false",
                           f"out={tmp_path}", "name=oom"], env=gpu_env(), capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "out of GPU memory" in lines[-1] and f"batch size {batch}" in lines[-1], done.stderr
    assert not any("compile failed" in line or "capture failed" in line for line in lines), done.stderr
    assert json.loads((tmp_path / "oom" / "result.json").read_text())["status"] == "failed"
