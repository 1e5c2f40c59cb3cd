"""Fused training: several runs in one vmap'd step give the metrics of separate runs."""

import json

import pytest
import torch

from resexp import cli
from resexp import config as config_module
from resexp.models import build_model
from resexp.fused import FusedModels, fusion_key, group_runs, train_fused
from resexp.sweep import sweep_name
from resexp.train import CHECKPOINT, Run, train

# Short, with milestones inside it, so the learning rate changes while the runs are fused.
TINY = ["data=synthetic", "data.train_size=400", "data.test_size=200", "schedule=smoke", "schedule.iterations=12",
        "schedule.milestones=[6,9]", "schedule.eval_every=4", "schedule.checkpoint_every=4", "progress=false",
        "depth=8"]
COMPARED = ("iteration", "lr", "train_loss", "train_error", "test_loss", "test_error")


def compose(*overrides):
    return config_module.compose([*TINY, *overrides])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(fused_dir, separate_dir):
    fused, separate = metrics(fused_dir), metrics(separate_dir)
    assert [m["iteration"] for m in fused] == [m["iteration"] for m in separate] == [4, 8, 12]
    for one, other in zip(fused, separate):
        assert one["lr"] == other["lr"]
        for key in ("train_loss", "test_loss"):
            assert one[key] == pytest.approx(other[key], rel=2e-3, abs=1e-4), key
        for key in ("train_error", "test_error"):  # a prediction or two may flip on a near tie
            assert one[key] == pytest.approx(other[key], abs=0.02), key
        # Looser: these small nets are ill-conditioned early on (BatchNorm's backward cancels a nearly
        # uniform gradient), so float32 rounding alone, channels_last against the vmap'd layout, moves
        # some layers' gradients apart by up to ~0.5% a step. test_each_fused_step_is_each_nets_own_sgd_step
        # checks the step itself tightly, in float64.
        assert one["grad_norms"] == pytest.approx(other["grad_norms"], rel=5e-2, abs=1e-5)


RUNS = [("arch=plain", "seed=0"), ("arch=resnet", "seed=0"), ("arch=resnet", "seed=1")]


def test_fused_training_gives_the_metrics_and_weights_of_separate_runs(tmp_path):
    configs = [compose(*overrides) for overrides in RUNS]
    names = [f"{c.arch}-8-s{c.seed}" for c in configs]
    for cfg, name in zip(configs, names):
        train(cfg, tmp_path / "separate" / name)
    results = train_fused(configs, [tmp_path / "fused" / name for name in names])

    assert [r["status"] for r in results] == ["done"] * 3
    assert [r["outcome"] for r in results] == ["trained"] * 3
    for name in names:
        assert_same_metrics(tmp_path / "fused" / name, tmp_path / "separate" / name)
        fused = torch.load(tmp_path / "fused" / name / CHECKPOINT, weights_only=True)
        separate = torch.load(tmp_path / "separate" / name / CHECKPOINT, weights_only=True)
        assert fused["model"].keys() == separate["model"].keys()
        for key, tensor in separate["model"].items():
            # After 12 steps that drift (above) shows in the first layers.
            assert torch.allclose(fused["model"][key].float(), tensor.float(), rtol=5e-2, atol=5e-3), key
        momentum = [s["momentum_buffer"] for s in fused["optimizer"]["state"].values()]
        assert len(momentum) == len(separate["optimizer"]["state"]) and all(m is not None for m in momentum)
    # The plain net really trained without shortcuts: its weights are not its twin's.
    plain = torch.load(tmp_path / "fused" / names[0] / CHECKPOINT, weights_only=True)["model"]
    twin = torch.load(tmp_path / "fused" / names[1] / CHECKPOINT, weights_only=True)["model"]
    assert not torch.allclose(plain["fc.weight"], twin["fc.weight"])


def test_a_fused_run_stopped_halfway_resumes_alone_where_it_stopped(tmp_path):
    configs = [compose(*overrides) for overrides in RUNS[:2]]
    names = ["plain-8-s0", "resnet-8-s0"]
    stopped = train_fused(configs, [tmp_path / "fused" / n for n in names], stop_after=6)
    assert [r["outcome"] for r in stopped] == ["stopped", "stopped"]
    assert [r["iterations_done"] for r in stopped] == [6, 6]
    # The checkpoint is an ordinary run's: train() resumes it, unfused.
    resumed = train(configs[0], tmp_path / "fused" / names[0])
    assert resumed["outcome"] == "resumed" and resumed["status"] == "done"
    train(configs[0], tmp_path / "separate" / names[0])
    assert_same_metrics(tmp_path / "fused" / names[0], tmp_path / "separate" / names[0])
    # The other one resumes fused with nobody: alone, through the same function.
    (alone,) = train_fused(configs[1:], [tmp_path / "fused" / names[1]])
    assert alone["outcome"] == "resumed" and alone["iterations_done"] == 12
    again = train_fused(configs, [tmp_path / "fused" / n for n in names])
    assert [r["outcome"] for r in again] == ["skipped", "skipped"]


def test_runs_are_grouped_by_the_shapes_of_their_layers():
    configs = [compose("arch=plain"), compose("arch=resnet"), compose("arch=resnet", "seed=3"),
               compose("arch=plain", "depth=14"), compose("arch=resnet", "model.shortcut=B"),
               compose("arch=resnet", "model.residual_scale=0.5"), compose("arch=resnet", "compile=true"),
               compose("arch=plain", "model.shortcut=C")]
    assert group_runs(configs) == [[0, 1, 2, 7], [3], [4], [5], [6]]
    assert fusion_key(compose("arch=resnet", "schedule.lr=0.05")) != fusion_key(compose("arch=resnet"))


def test_nets_of_other_shapes_are_refused(tmp_path):
    runs = [Run(compose("arch=plain"), tmp_path / "a"), Run(compose("arch=resnet", "model.shortcut=B"), tmp_path / "b")]
    with pytest.raises(ValueError, match="other layer shapes"):
        FusedModels(runs)


def test_each_fused_step_is_each_nets_own_sgd_step(tmp_path):
    """Three steps with a different learning rate per net, against torch.optim.SGD on each net alone.

    In float64: these small nets are ill-conditioned enough that float32 rounding alone moves two
    computations of the same step apart by ~1e-5, which would hide a wrong weight decay.
    """
    runs = [Run(compose(*overrides), tmp_path / str(index)) for index, overrides in enumerate(RUNS)]
    fused = FusedModels(runs)
    fused.params = {name: p.detach().double().requires_grad_() for name, p in fused.params.items()}
    fused.buffers = {name: b.double() if b.is_floating_point() else b for name, b in fused.buffers.items()}
    copies, optimizers = [], []
    for run in runs:
        model = build_model(run.cfg.arch, 8)
        model.load_state_dict(run.model.state_dict())
        copies.append(model.double())
        optimizers.append(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
    for iteration, lrs in enumerate([[0.1, 0.05, 0.1], [0.1, 0.05, 0.01], [0.01, 0.1, 0.1]]):
        batches = [run.batches.batch(iteration) for run in runs]
        x, y = torch.stack([b[0] for b in batches]).double(), torch.stack([b[1] for b in batches])
        losses, wrong = fused.step(x, y, torch.tensor(lrs, dtype=torch.float64))
        for index, (model, optimizer) in enumerate(zip(copies, optimizers)):
            for group in optimizer.param_groups:
                group["lr"] = lrs[index]
            optimizer.zero_grad()
            logits = model(x[index])
            loss = torch.nn.functional.cross_entropy(logits, y[index])
            loss.backward()
            optimizer.step()
            assert losses[index].item() == pytest.approx(loss.item(), rel=1e-9)
            assert wrong[index].item() == (logits.argmax(1) != y[index]).sum().item()
            for name, p in model.named_parameters():
                assert torch.allclose(fused.params[name][index], p, rtol=1e-7, atol=1e-10), (iteration, index, name)
                assert torch.allclose(fused.momentum[name][index], optimizer.state[p]["momentum_buffer"],
                                      rtol=1e-7, atol=1e-10), (iteration, index, name)
            for name, b in model.named_buffers():
                assert torch.allclose(fused.buffers[name][index].to(b.dtype), b, rtol=1e-7), (iteration, index, name)


# --- resexp sweep fuse=true -----------------------------------------------------------------------

SWEEP = ["depth=8", "data=synthetic", "data.train_size=400", "data.test_size=200", "schedule=smoke",
         "progress=false", "device=cpu"]


def sweep_runs(sweep_dir):
    return {job["run"]: job for job in json.loads((sweep_dir / "sweep.json").read_text())["runs"]}


@pytest.mark.parametrize("where", [[], ["gpus=0"]], ids=["in-process", "in-a-slot"])
def test_sweep_fuse_trains_plain_and_resnet_together_in_the_usual_folders(tmp_path, capsys, monkeypatch, where,
                                                                           hydra_in_process):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    arguments = [*SWEEP, "seed=0,1", "fuse=true", *where, f"out={tmp_path}"]
    assert cli.main(["sweep", *arguments]) == 0
    err = capsys.readouterr().err
    (sweep_dir,) = tmp_path.iterdir()
    # fuse and gpus say how a sweep runs, not what it trains: the folder is the same sweep's without them.
    assert sweep_dir.name == sweep_name([a for a in arguments if not a.startswith(("fuse=", "gpus="))])
    runs = sweep_runs(sweep_dir)
    assert sorted(runs) == ["plain-8-s0", "plain-8-s1", "resnet-8-s0", "resnet-8-s1"]
    assert {job["outcome"] for job in runs.values()} == {"trained"}
    assert {job["result"]["status"] for job in runs.values()} == {"done"}
    assert "plain-8-s0 + plain-8-s1 + resnet-8-s0 + resnet-8-s1 (fused)" in err
    for name in runs:
        assert [m["iteration"] for m in metrics(sweep_dir / name)] == [4, 8]
    assert (sweep_dir / "curves.png").exists()
    # The same command again: nothing to do.
    assert cli.main(["sweep", *arguments]) == 0
    assert {job["outcome"] for job in sweep_runs(sweep_dir).values()} == {"skipped"}


@pytest.mark.parametrize("arguments, needle", [
    (["fuse=maybe"], "fuse must be true or false"),
    (["fuse=true", "launcher=submitit_local"], "launcher=submitit_local"),
])
def test_bad_fuse_settings_are_one_line_errors(tmp_path, capsys, arguments, needle, hydra_in_process):
    assert cli.main(["sweep", *SWEEP, *arguments, f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())
