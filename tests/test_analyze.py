"""Architectural variants, and the analyses of trained nets (resexp.analyze) on tiny runs."""

from __future__ import annotations

import csv
import json
import math
import pickle
import re

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from resexp import analyze
from resexp import config as config_module
from resexp.analyze import (
    DEFAULT_MAX_IMAGES,
    NetLoader,
    WithoutBranch,
    analyze_command,
    analyze_gradients,
    analyze_identity,
    analyze_lesion,
    analyze_responses,
    blocks_removed,
    parse_analyze_args,
    trained_runs,
)
from resexp.errors import UsageError
from resexp.models import (
    IMAGE_FEATURES,
    DenseBlock,
    PreActBlock,
    blocks,
    build_model,
    count_parameters,
    gradient_norms,
    response_modules,
    weighted_layers,
)
from resexp.train import train
from test_plots import keep_figures, texts_outside

PAPER_PARAMETERS = {20: 269_722, 1202: 19_421_274}
# A few steps more than schedule=smoke, so that the nets are better than chance.
TINY_RUN = ["data=synthetic", "device=cpu", "schedule=smoke", "progress=false", "depth=8", "data.train_size=256",
            "data.test_size=100", "schedule.iterations=16", "schedule.eval_every=8", "schedule.checkpoint_every=16",
            "schedule.milestones=[]"]


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread per test: with other jobs on the machine, more threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mlp_parameters(depth, width, classes=10):
    """Input layer + BN, (depth - 2) hidden layers + BN, output layer with bias."""
    return IMAGE_FEATURES * width + 2 * width + (depth - 2) * (width * width + 2 * width) + width * classes + classes


# --- variants -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["plain", "resnet"])
@pytest.mark.parametrize("block", ["basic", "preact"])
def test_cifar_variants_keep_the_papers_parameter_count(arch, block):
    # Pre-activation moves BN layers around: the stem's BN (16 channels) and the first BN of the
    # two downsampling blocks (16 and 32 instead of 32 and 64) give way to a final BN of 64 channels.
    model = build_model(arch, 20, block=block, residual_scale=0.5)
    assert count_parameters(model) == PAPER_PARAMETERS[20]


@pytest.mark.parametrize("depth", [2, 3, 6, 9])
@pytest.mark.parametrize("block", ["basic", "preact"])
def test_mlp_parameter_counts(depth, block):
    for arch in ("plain", "resnet"):
        model = build_model(arch, depth, family="mlp", width=32, block=block)
        assert count_parameters(model) == mlp_parameters(depth, 32)
        assert len(weighted_layers(model)) == depth
        assert len(blocks(model)) == (depth - 2) // 2
    projected = build_model("resnet", depth, "C", family="mlp", width=32, block=block)
    assert count_parameters(projected) == mlp_parameters(depth, 32) + (depth - 2) // 2 * (32 * 32 + 2 * 32)


@pytest.mark.parametrize("family,depth", [("cifar", 8), ("mlp", 5)])
@pytest.mark.parametrize("block", ["basic", "preact"])
@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_variant_forward_shapes_and_layer_lists(family, depth, block, arch):
    model = build_model(arch, depth, "B", num_classes=7, block=block, family=family, width=24, residual_scale=0.3)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    assert len(weighted_layers(model)) == depth
    assert len(response_modules(model)) == depth - 1  # every layer but the output layer
    assert all(b.residual_scale == 0.3 for b in blocks(model))
    assert all((b.shortcut is None) == (arch == "plain") for b in blocks(model))
    clone = pickle.loads(pickle.dumps(model.eval()))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), clone(x))


def test_preactivation_block_layout():
    model = build_model("resnet", 8, block="preact").eval()
    assert model.bn1 is None and model.final_bn is not None  # bare stem, BN-ReLU before pooling
    first, downsampling = blocks(model)[0], blocks(model)[1]
    assert isinstance(first, PreActBlock) and first.shortcut_takes_activation  # He et al. 2016, appendix
    assert downsampling.changes_shape and downsampling.shortcut_takes_activation
    x = torch.randn(4, 16, 8, 8)
    branch, shortcut = first.parts(x)
    assert torch.allclose(first(x), branch + shortcut)  # no ReLU after the addition
    assert (first(x) < 0).any()
    assert torch.equal(shortcut, torch.relu(first.bn1(x)))


def test_residual_scale_multiplies_the_branch_only():
    torch.manual_seed(0)
    unscaled = build_model("resnet", 8).eval()
    scaled = build_model("resnet", 8, residual_scale=0.25).eval()
    scaled.load_state_dict(unscaled.state_dict())
    x = torch.randn(2, 16, 32, 32)
    branch, shortcut = blocks(unscaled)[0].parts(x)
    assert torch.allclose(blocks(scaled)[0](x), torch.relu(0.25 * branch + shortcut), atol=1e-6)


def test_mlp_residual_block_is_relu_of_branch_plus_input():
    block = DenseBlock(16).eval()
    a = torch.randn(5, 16)
    z = block.bn2(block.fc2(torch.relu(block.bn1(block.fc1(a)))))
    assert torch.allclose(block(a), torch.relu(z + a))
    odd = build_model("resnet", 5, family="mlp", width=16)  # 3 hidden layers: one unpaired, one block
    assert len(odd.stem) == 2 and len(blocks(odd)) == 1


def test_resnet_1202_preact_builds_and_runs():
    model = build_model("resnet", 1202, block="preact").eval()
    assert count_parameters(model) == PAPER_PARAMETERS[1202]
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_config_checks_the_model_options():
    problems = config_module.problems(config_module.compose(
        ["model.block=bottleneck", "model.family=rnn", "model.width=0", "model.residual_scale=abc"]))
    assert any(p.startswith("model.block must be one of basic, preact") for p in problems)
    assert any(p.startswith("model.family must be one of cifar, mlp") for p in problems)
    assert any(p.startswith("model.width must be a positive integer") for p in problems)
    assert any(p.startswith("model.residual_scale must be a finite number") for p in problems)
    assert config_module.problems(config_module.compose(["model.family=mlp", "depth=5"])) == []
    assert config_module.problems(config_module.compose(["model.family=mlp", "depth=1"])) == [
        "depth must be an integer >= 2 for model.family=mlp; got 1"]
    assert config_module.problems(config_module.compose(["depth=5"])) == [
        "depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); got 5"]
    defaults = config_module.compose([]).model
    assert (defaults.block, defaults.residual_scale, defaults.family, defaults.width) == ("basic", 1.0, "cifar", 256)


# --- gradient norms -----------------------------------------------------------------------------

@pytest.mark.parametrize("family,depth", [("cifar", 8), ("mlp", 4)])
def test_gradient_norms_one_per_weighted_layer(family, depth):
    model = build_model("resnet", depth, "C", family=family, width=16)  # projections are not layers
    assert all(math.isnan(v) for v in gradient_norms(model))  # no backward pass yet
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    norms = gradient_norms(model)
    assert len(norms) == depth == len(weighted_layers(model))
    assert all(v > 0 and math.isfinite(v) for v in norms)
    assert norms[0] == pytest.approx(model.conv1.weight.grad.norm().item() if family == "cifar"
                                     else model.stem[0][0].weight.grad.norm().item())


def fabricated_run(folder, arch, depth, evaluations, layers):
    run = folder / f"{arch}-{depth}-s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"arch: {arch}\ndepth: {depth}\nseed: 0\n")
    rows = [{"iteration": 10 * (i + 1), "train_error": 0.5, "test_error": 0.5,
             "grad_norms": [float((i + 1) * (layer + 1)) for layer in range(layers)]} for i in range(evaluations)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_gradient_figures_from_logged_norms(tmp_path, monkeypatch):
    figures = keep_figures(monkeypatch, analyze)
    fabricated_run(tmp_path, "plain", 8, evaluations=6, layers=8)
    fabricated_run(tmp_path, "resnet", 8, evaluations=6, layers=8)
    fabricated_run(tmp_path, "resnet", 14, evaluations=3, layers=14)
    result = analyze_gradients(tmp_path)
    by_run = {entry["run"]: entry for entry in result["runs"]}
    assert by_run["resnet-14-s0"]["iterations"] == [10, 20, 30]
    assert len(by_run["resnet-14-s0"]["grad_norms"][0]) == 14
    assert by_run["plain-8-s0"]["first_to_last"] == pytest.approx([1 / 8] * 6)
    assert len(read_csv(tmp_path / "gradients.csv")) == 2 * 6 * 8 + 3 * 14
    for name in ("gradients_by_layer.png", "gradients_heatmap.png", "gradients_ratio.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    for fig in figures:
        assert texts_outside(fig) == []
    heatmaps = [ax for ax in figures[1].axes if ax.get_ylabel().startswith("layer")]
    for ax in heatmaps:  # layers are whole numbers, whatever the cell edges
        assert all(tick == int(tick) for tick in ax.get_yticks())
    # No checkpoints here: the other analyses have nothing to look at.
    with pytest.raises(UsageError, match="no trained runs in"):
        analyze_command(["responses", str(tmp_path)])


# --- analyses of trained nets -------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The trainer sizes its thread pool to the machine; tests share the machine and keep to one thread.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "set_num_threads", lambda count: None)
        for arch in ("plain", "resnet"):
            train(config_module.compose([*TINY_RUN, f"arch={arch}"]), folder / f"{arch}-8-s0")
    torch.set_num_threads(threads)
    return folder


def final_test_error(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["test_error"]


def test_responses_one_std_per_layer(sweep_folder):
    result = analyze_responses(sweep_folder)
    assert [entry["run"] for entry in result["runs"]] == ["plain-8-s0", "resnet-8-s0"]
    for entry in result["runs"]:
        assert len(entry["std"]) == 7  # 7 3x3 layers in an 8-layer net
        assert entry["layers"][:3] == ["bn1", "stages.0.0.bn1", "stages.0.0.bn2"]
        assert all(0 < value < 10 for value in entry["std"])
        assert entry["images"] == 100
    rows = read_csv(sweep_folder / "responses.csv")
    assert len(rows) == 2 * 7
    assert (sweep_folder / "responses.png").stat().st_size > 10_000


def test_lesion_with_nothing_removed_reproduces_the_evaluation(sweep_folder, monkeypatch):
    figures = keep_figures(monkeypatch, analyze)
    result = analyze_lesion(sweep_folder)
    plain, resnet = result["runs"]
    for entry in (plain, resnet):
        assert entry["baseline_error"] == final_test_error(sweep_folder / entry["run"])
        assert entry["downsampling"] == [False, True, True]
        assert len(entry["single_errors"]) == 3
    assert plain["removable"] == [True, False, False]
    assert plain["single_errors"][1:] == [None, None]
    assert list(plain["random_errors"]) == [1]
    assert resnet["removable"] == [True, True, True]
    assert all(0 <= error <= 1 for error in resnet["single_errors"])
    assert [len(errors) for errors in resnet["random_errors"].values()] == [3, 3, 1]  # every distinct subset
    rows = read_csv(sweep_folder / "lesion.csv")
    assert [r["test_error"] for r in rows if r["run"] == "plain-8-s0" and r["removed"] == "one block"][1:] == [
        "impossible", "impossible"]
    assert (sweep_folder / "lesion.png").stat().st_size > 10_000
    (fig,) = figures
    assert texts_outside(fig) == []
    plain_panel, resnet_panel = fig.axes[0], fig.axes[1]
    legend = {panel: [text.get_text() for text in panel.get_legend().get_texts()]
              for panel in (plain_panel, resnet_panel)}
    # A plain net's downsampling blocks cannot be removed: no marker there, so no key for one.
    assert "downsampling block" not in legend[plain_panel]
    assert "downsampling block" in legend[resnet_panel]


def test_removing_blocks_is_undone_afterwards(sweep_folder):
    net = NetLoader().load(trained_runs(sweep_folder)[1])
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = net.model(x)
        with blocks_removed(net.model, [0, 2]):
            removed = net.model(x)
            assert sum(isinstance(m, WithoutBranch) for m in net.model.modules()) == 2
        after = net.model(x)
    assert torch.equal(before, after)
    assert not torch.equal(before, removed)


def test_identity_ratios_for_residual_nets_only(sweep_folder):
    result = analyze_identity(sweep_folder, max_images=40)
    (entry,) = result["runs"]
    assert entry["run"] == "resnet-8-s0" and entry["images"] == 40
    assert entry["blocks"] == ["stages.0.0", "stages.1.0", "stages.2.0"]
    assert all(0 < ratio < 100 for ratio in entry["ratio"])
    assert len(read_csv(sweep_folder / "identity.csv")) == 3


def test_analyze_samples_the_test_set_by_default(tmp_path):
    assert parse_analyze_args([str(tmp_path)]) == (["responses", "lesion", "gradients", "identity"], tmp_path,
                                                   DEFAULT_MAX_IMAGES)
    assert parse_analyze_args(["lesion", str(tmp_path), "max_images=all"])[2] is None
    assert parse_analyze_args(["lesion", str(tmp_path), "max_images=50"])[2] == 50


def test_analyze_command(sweep_folder, tmp_path, capsys):
    assert analyze_command(["all", str(sweep_folder), "max_images=30"]) == 0
    out = capsys.readouterr()
    for analysis in ("gradients", "responses", "lesion", "identity"):
        assert f"{analysis}: wrote" in out.out, out.out
    assert "measuring on 30 of the 100 test images" in out.err  # says what it sampled
    assert "lesion: resnet-8-s0: removing each of its 3 blocks" in out.err
    for args, message in [
        (["lesion", str(tmp_path / "missing")], "does not exist"),
        (["wiggle", str(sweep_folder)], "unknown analysis 'wiggle'"),
        (["lesion", str(sweep_folder), "max_images=0"], "max_images must be a positive whole number or all; got '0'"),
        (["lesion", str(sweep_folder), "--fast"], "unknown option --fast"),
        # The spelling of other tools: the message gives resexp's.
        (["lesion", str(sweep_folder), "--max-images", "30"], re.escape("unknown option --max-images; resexp analyze "
                                                                       "takes max_images=N|all")),
        (["lesion", str(sweep_folder), "max_imgs=30"], re.escape("unknown option max_imgs=30; resexp analyze "
                                                                "takes max_images=N|all")),
        (["lesion", str(tmp_path)], "no runs in"),
        ([], "usage: resexp analyze"),
    ]:
        with pytest.raises(UsageError, match=message):
            analyze_command(args)


def test_analysing_an_unfinished_run_says_so(tmp_path, capsys):
    train(config_module.compose([*TINY_RUN, "arch=resnet"]), tmp_path / "resnet-8-s0", stop_after=4)
    assert analyze_command(["identity", str(tmp_path), "max_images=20"]) == 0
    assert "resnet-8-s0 is not finished: analysing its checkpoint at iteration 4 of 16" in capsys.readouterr().err


def test_responses_of_short_runs_say_what_figure_7_compares_and_how_many_images(sweep_folder, monkeypatch, capsys):
    monkeypatch.setattr(analyze, "_SAID", set())  # what was said once in this process is said again here
    figures = keep_figures(monkeypatch, analyze)
    analyze_responses(sweep_folder, max_images=None)
    err = capsys.readouterr().err
    assert "measuring on all 100 test images" in err
    caveat = ("these nets trained at most 16 of the paper's 64,000 iterations: Figure 7's finding (ResNet "
              "responses smaller than plain ones) is for fully trained nets; early in training ResNet responses "
              "can be larger than plain ones")
    assert f"responses: note: {caveat}" in err
    (fig,) = figures
    assert caveat in " ".join(fig._suptitle.get_text().split())


def test_a_checkpoint_of_another_run_is_refused(sweep_folder, tmp_path):
    import shutil

    shutil.copytree(sweep_folder / "resnet-8-s0", tmp_path / "resnet-8-s0")
    shutil.copy(sweep_folder / "plain-8-s0" / "checkpoint.pt", tmp_path / "resnet-8-s0" / "checkpoint.pt")
    with pytest.raises(UsageError, match=re.escape("checkpoint.pt is not the checkpoint of the run in ")
                       + ".*" + re.escape("its config differs from config.yaml in arch: 'resnet' -> 'plain'")):
        analyze_command(["responses", str(tmp_path)])
    assert not (tmp_path / "responses.png").exists()


def test_analysing_a_read_only_run_says_so_in_one_line(sweep_folder, tmp_path, read_only):
    import shutil

    run = tmp_path / "resnet-8-s0"
    shutil.copytree(sweep_folder / "resnet-8-s0", run)
    read_only(run)
    with pytest.raises(UsageError) as refused:
        analyze_command(["gradients", str(run)])
    assert str(refused.value) == (f"cannot write the gradients files: {run} is read-only (Permission denied); "
                                  "make it writable, or copy it somewhere writable")
