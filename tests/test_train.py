"""The trainer: the paper's schedule, warm-up, learning, exact resume, run files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from resexp import config as config_module
from resexp.errors import UsageError
from resexp.step import resolve_compile
from resexp.train import CHECKPOINT, learning_rate, train

SMOKE = ["data=synthetic", "schedule=smoke", "progress=false", "device=cpu"]  # CPU arithmetic: exact resumes
VOLATILE = ("time_s", "images_per_s")  # wall-clock figures differ between runs


def compose(*overrides):
    return config_module.compose([*SMOKE, *overrides])


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def test_paper_schedule_divides_lr_by_ten_at_32k_and_48k():
    paper = dict(lr=0.1, milestones=[32000, 48000], gamma=0.1)
    assert learning_rate(0, **paper) == pytest.approx(0.1)
    assert learning_rate(31999, **paper) == pytest.approx(0.1)
    assert learning_rate(32000, **paper) == pytest.approx(0.01)
    assert learning_rate(47999, **paper) == pytest.approx(0.01)
    assert learning_rate(48000, **paper) == pytest.approx(0.001)
    assert learning_rate(63999, **paper) == pytest.approx(0.001)
    assert learning_rate(10, **paper, warming_up=True, warmup_lr=0.01) == pytest.approx(0.01)


def test_composed_defaults_are_the_papers_recipe():
    cfg = config_module.compose([])
    s = cfg.schedule
    assert (cfg.arch, cfg.depth, cfg.model.shortcut) == ("resnet", 20, "A")
    assert (s.lr, s.momentum, s.weight_decay, s.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (s.iterations, list(s.milestones)) == (64000, [32000, 48000])
    assert (s.warmup.lr, s.warmup.until_train_error, s.warmup.min_depth) == (0.01, 0.8, 110)
    assert (cfg.data.augment.padding, cfg.data.augment.flip) == (4, True)
    quick = config_module.compose(["schedule=quick"]).schedule
    assert quick.iterations / 64000 == pytest.approx(quick.milestones[0] / 32000)
    assert quick.iterations / 64000 == pytest.approx(quick.milestones[1] / 48000)


def test_short_training_on_learnable_data_reduces_loss(tmp_path):
    cfg = compose("arch=resnet", "depth=8", "schedule.iterations=60", "schedule.eval_every=20",
                  "schedule.milestones=[]", "schedule.checkpoint_every=60")
    result = train(cfg, tmp_path / "run")
    evaluations = metrics(tmp_path / "run")
    assert [m["iteration"] for m in evaluations] == [20, 40, 60]
    assert evaluations[-1]["train_loss"] < 0.7 * evaluations[0]["train_loss"]
    assert evaluations[-1]["test_error"] < 0.5  # 10 classes: chance is 0.9
    assert len(evaluations[-1]["grad_norms"]) == 8 and all(norm > 0 for norm in evaluations[-1]["grad_norms"])
    assert result["status"] == "done" and result["parameters"] > 0
    for name in ("config.yaml", "env.json", "metrics.jsonl", "result.json", CHECKPOINT):
        assert (tmp_path / "run" / name).stat().st_size > 0
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "device" in env and "command" in env


def test_warm_up_ends_when_training_error_drops_and_lr_goes_back(tmp_path):
    cfg = compose("depth=8", "schedule.warmup.min_depth=0", "schedule.warmup.until_train_error=0.95",
                  "schedule.warmup.check_every=2", "schedule.eval_every=2", "schedule.milestones=[]")
    train(cfg, tmp_path / "run")
    lrs = [m["lr"] for m in metrics(tmp_path / "run")]
    assert lrs[0] == pytest.approx(0.01)  # warming up
    assert lrs[-1] == pytest.approx(0.1)  # and really back to the base rate


def test_warm_up_holds_while_training_error_stays_high(tmp_path):
    cfg = compose("depth=8", "schedule.warmup.min_depth=0", "schedule.warmup.until_train_error=0.0001",
                  "schedule.warmup.check_every=2", "schedule.eval_every=2", "schedule.milestones=[]")
    train(cfg, tmp_path / "run")
    assert all(m["lr"] == pytest.approx(0.01) for m in metrics(tmp_path / "run"))


def test_no_warm_up_below_min_depth(tmp_path):
    cfg = compose("depth=8", "schedule.eval_every=2", "schedule.milestones=[]")
    train(cfg, tmp_path / "run")
    assert all(m["lr"] == pytest.approx(0.1) for m in metrics(tmp_path / "run"))


@pytest.mark.parametrize("stop_after", [3, 4])  # inside an evaluation interval, and on its boundary
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, stop_after):
    cfg = compose("arch=plain", "depth=8", "schedule.warmup.min_depth=0",
                  "schedule.warmup.until_train_error=0.9", "schedule.warmup.check_every=1")
    straight = train(cfg, tmp_path / "straight")
    stopped = train(cfg, tmp_path / "resumed", stop_after=stop_after)
    assert stopped["outcome"] == "stopped" and stopped["status"] == "interrupted"
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed["outcome"] == "resumed"
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["final_test_error"] == straight["final_test_error"]


def test_a_run_beside_busy_programs_trains_on_the_free_cores_and_resumes_with_its_count(tmp_path, monkeypatch):
    from resexp.machine import OtherPrograms

    monkeypatch.delenv("OMP_NUM_THREADS")
    busy = [1.0]  # cores' worth of other programs' work: one of the two
    monkeypatch.setattr(OtherPrograms, "cores_busy", lambda self: busy[0])
    monkeypatch.setattr("resexp.step.usable_cores", lambda: 2)
    monkeypatch.setattr("resexp.machine.usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        cfg = compose("arch=plain", "depth=8")
        straight = train(cfg, tmp_path / "straight")
        assert [row["cpu_threads"] for row in metrics(tmp_path / "straight")] == [1, 1]
        train(cfg, tmp_path / "resumed", stop_after=4)
        assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["cpu_threads"] == 1
        busy[0] = 0.0  # the other program ended: the resumed run starts with its checkpoint's count all the same
        resumed = train(cfg, tmp_path / "resumed")
        assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")
        assert resumed["final_train_loss"] == straight["final_train_loss"]
        assert torch.get_num_threads() == 2  # and takes both cores at its next evaluation
    finally:
        torch.set_num_threads(before)


def test_finished_run_is_skipped_and_resume_false_starts_over(tmp_path):
    cfg = compose("depth=8")
    first = train(cfg, tmp_path / "run")
    again = train(cfg, tmp_path / "run")
    assert again["outcome"] == "skipped" and again["final_test_error"] == first["final_test_error"]
    cfg.resume = False
    assert train(cfg, tmp_path / "run")["outcome"] == "trained"


def test_resuming_with_another_config_is_refused(tmp_path):
    train(compose("depth=8"), tmp_path / "run", stop_after=2)
    with pytest.raises(UsageError, match="another config.*schedule.lr"):
        train(compose("depth=8", "schedule.lr=0.05"), tmp_path / "run")


def test_corrupt_checkpoint_is_reported_not_discarded(tmp_path):
    train(compose("depth=8"), tmp_path / "run", stop_after=2)
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="unreadable.*resume=false"):
        train(compose("depth=8"), tmp_path / "run")
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == b"not a checkpoint"


def test_killed_process_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL mid-run, start again: the curves equal an uninterrupted run's."""
    overrides = [*SMOKE, "arch=plain", "depth=8", "schedule.iterations=40", "schedule.eval_every=5",
                 "schedule.checkpoint_every=5", "schedule.milestones=[20,30]"]
    command = [sys.executable, "-m", "resexp", "train", *overrides, f"out={tmp_path}"]
    straight = subprocess.run([*command, "name=straight"], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    victim = subprocess.Popen([*command, "name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / CHECKPOINT
    deadline = time.time() + 120
    while not checkpoint.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run([*command, "name=killed"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "straight")


def test_compile_auto_compiles_on_a_cpu_only_runs_long_enough_to_repay_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    paper = config_module.compose([]).schedule.iterations
    quick = config_module.compose(["schedule=quick"]).schedule.iterations
    assert resolve_compile("auto", cpu, paper) is True
    assert resolve_compile("auto", cpu, quick) is False
    assert resolve_compile("auto", cuda, quick) is True
    assert resolve_compile(False, cpu, paper) is False and resolve_compile(True, cpu, quick) is True
