"""resexp bench: multiply-add counts, the JSON records of tiny runs (throughput and memory), argument errors."""

import json

import pytest

from resexp.bench import bench_command, bench_config, reference_workers, training_tflops
from resexp.errors import UsageError
from resexp.models import build_model, count_parameters, forward_macs

# Forward multiply-adds of the paper's CIFAR ResNets (shortcut A adds none), in millions.
PAPER_MACS_MILLIONS = {20: 40.6, 56: 125.5, 110: 252.9}


@pytest.mark.parametrize("depth", sorted(PAPER_MACS_MILLIONS))
def test_forward_macs_match_the_paper_nets(depth):
    macs = forward_macs(build_model("resnet", depth))
    assert macs / 1e6 == pytest.approx(PAPER_MACS_MILLIONS[depth], rel=0.01)


def test_plain_and_residual_nets_cost_the_same_and_projections_add_a_little():
    assert forward_macs(build_model("plain", 20)) == forward_macs(build_model("resnet", 20))
    assert forward_macs(build_model("resnet", 20, "B")) > forward_macs(build_model("resnet", 20))


def test_achieved_tflops_counts_forward_and_backward_as_three_forwards():
    assert training_tflops(40_000_000, 10_000) == pytest.approx(3 * 2 * 40e6 * 1e4 / 1e12)


def test_tiny_bench_writes_a_record_with_positive_figures(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = bench_command(["depth=8", "schedule.batch_size=32", "bench.steps=3", "bench.warmup=1", "bench.windows=2",
                          "bench.workers=1", "data=synthetic", "data.train_size=256", "device=cpu", "compile=false",
                          f"bench.json={path}"])
    assert code == 0
    record = json.loads(path.read_text())
    for key in ("resexp_images_per_s", "reference_images_per_s", "ratio"):
        assert record[key] > 0
    for pipeline in ("resexp", "reference"):
        figures = record[pipeline]
        assert len(figures["window_images_per_s"]) == 2
        for key in ("images_per_s", "ms_per_step", "peak_memory_mb", "first_step_s", "achieved_tflops"):
            assert figures[key] > 0
    assert record["ratio"] == pytest.approx(record["resexp_images_per_s"] / record["reference_images_per_s"],
                                            rel=1e-2)
    assert len(record["window_ratios"]) == 2 and record["window_ratio_median"] > 0
    assert record["model"]["forward_macs_per_image"] > 0
    environment = record["environment"]
    assert environment["device"] == "cpu" and environment["cpu_count"] >= 1
    assert environment["torch"] and environment["torchvision"] and environment["started"]
    assert record["settings"]["batch_size"] == 32 and record["settings"]["compile"] is False
    assert record["settings"]["cuda_graph"] is False and record["resexp"]["cuda_graph"] is False  # no GPU here
    grad_norms = record["grad_norms"]
    assert grad_norms["median_ms"] > 0 and grad_norms["fraction_of_step"] > 0
    assert len(grad_norms["call_ms"]) >= 1 and all(ms > 0 for ms in grad_norms["call_ms"])
    overhead = grad_norms["overhead_per_step"]
    assert (overhead["paper"]["eval_every"], overhead["quick"]["eval_every"]) == (500, 100)
    assert overhead["paper"]["fraction"] > 0
    assert overhead["quick"]["fraction"] == pytest.approx(5 * overhead["paper"]["fraction"], rel=1e-3)
    assert overhead["quick"]["fraction"] == pytest.approx(grad_norms["fraction_of_step"] / 100, rel=1e-3)
    out = capsys.readouterr().out
    assert "images/s" in out and "gradient norms" in out


def test_memory_of_a_tiny_net_counts_parameter_state_and_saved_activations(tmp_path, capsys):
    records = {}
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"{precision}.json"
        assert bench_command(["bench.measure=memory", "depth=8", "schedule.batch_size=4", "device=cpu",
                              f"precision={precision}", f"bench.json={path}"]) == 0
        records[precision] = json.loads(path.read_text())
    parameters = count_parameters(build_model("resnet", 8))
    for record in records.values():
        memory = record["memory"]
        assert record["model"]["parameters"] == parameters
        # fp32 weights, gradients and momentum, whatever the precision of the activations.
        assert memory["parameter_state_bytes"] == 3 * 4 * parameters
        assert memory["saved_activation_bytes"] > 0
        assert memory["estimate_bytes"] == memory["parameter_state_bytes"] + memory["saved_activation_bytes"]
        assert memory["cuda_peak_bytes"] is None
    # Under bf16 autocast the saved activations are bf16; only BN's statistics stay fp32.
    assert records["bf16"]["memory"]["saved_activation_bytes"] < records["fp32"]["memory"]["saved_activation_bytes"]
    assert records["bf16"]["memory"]["saved_activation_bytes_by_dtype"]["bfloat16"] > 0
    assert "saved for backward" in capsys.readouterr().out


@pytest.mark.parametrize("args, named", [
    (["schedule.batch_size=0"], ("schedule.batch_size", "got 0")),
    (["bench.steps=many"], ("bench.steps", "'many'")),
    (["precision=fp8"], ("precision", "'fp8'")),
    (["device=tpu"], ("device", "'tpu'")),
    (["compile=maybe"], ("compile", "'maybe'")),
    (["cuda_graph=maybe"], ("cuda_graph", "'maybe'")),
    (["bench.reference=yes"], ("bench.reference", "'yes'")),
    (["data=imagenet"], ("data/imagenet",)),
    (["arch=vgg"], ("arch", "'vgg'")),
    (["bench.workers=-1"], ("bench.workers", "got -1")),
    (["colour=red"], ("colour",)),
    (["depth"], ("depth",)),
    (["depth=20", "depth=56"], ("depth",)),
    (["depth=20,56"], ("depth=20,56",)),
    (["data=imagefolder"], ("data.root",)),
    (["bench.measure=speed"], ("bench.measure", "'speed'")),
    (["steps=5"], ("'steps'", "did you mean bench.steps?")),  # the key's name before it moved under bench.
])
def test_bad_arguments_are_one_line_usage_errors(args, named):
    with pytest.raises(UsageError) as raised:
        bench_config(args)
    message = str(raised.value)
    assert all(part in message for part in named) and "\n" not in message


def test_depth_that_is_not_6n_plus_2_is_a_usage_error():
    with pytest.raises(UsageError, match="6n\\+2"):
        bench_config(["depth=21"])


def test_batch_larger_than_the_training_set_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="batch_size=128"):
        bench_command(["data.train_size=64", "device=cpu", f"bench.json={tmp_path / 'x.json'}"])


def test_defaults_are_the_papers_batch_and_a_resnet_20_on_a_cifar10_sized_synthetic_set():
    cfg = bench_config([])
    assert (cfg.arch, cfg.depth, cfg.schedule.batch_size, cfg.bench.reference) == ("resnet", 20, 128, True)
    assert (cfg.data.name, cfg.data.train_size) == ("synthetic", 50_000)
    assert 1 <= reference_workers(cfg) <= 4


def test_train_keeps_its_synthetic_size_and_has_no_bench_keys():
    from resexp.config import compose

    assert compose(["data=synthetic"]).data.train_size == 2000
    with pytest.raises(UsageError, match="bench.steps"):
        compose(["bench.steps=5"])


def test_help_shows_the_configs_defaults_and_examples_and_cfg_job_the_config(capsys):
    assert bench_command(["--help"]) == 0
    page = capsys.readouterr().out
    assert "examples:" in page and "resexp bench bench.measure=memory" in page
    assert "data.train_size=      50000" in page and "bench.steps=          50" in page
    assert bench_command(["--cfg", "job", "bench.steps=7"]) == 0
    assert "  steps: 7\n" in capsys.readouterr().out


def test_the_cpu_sharing_script_times_a_run_alone_and_beside_a_second_one(tmp_path, cli_env):
    """scripts/cpu-sharing.sh, cut short: both rates and their ratio in one line, nothing left running."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**cli_env, "RESEXP": str(Path(sys.executable).with_name("resexp"))}
    env.pop("OMP_NUM_THREADS")  # threads as a user's run sets them
    done = subprocess.run(["bash", str(root / "scripts" / "cpu-sharing.sh"), "depth=8", "bench.steps=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.fullmatch(r"alone: (\d+) images/s; beside a second resexp process: (\d+) images/s \((\d+) % of alone\)\n",
                         done.stdout)
    assert found, done.stdout
    alone, beside, percent = map(int, found.groups())
    assert alone > 0 and beside > 0 and abs(percent - 100 * beside / alone) <= 1
    running = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            running.append(cmdline.read_bytes())
        except OSError:  # ended meanwhile
            pass
    assert not any(b"bench.windows=1000" in args for args in running)  # the second process was stopped
