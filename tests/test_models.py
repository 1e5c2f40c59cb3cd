"""The networks match the paper's architecture: parameter counts, shortcuts, shapes."""

import pickle

import pytest
import torch

from resexp.config import compose, problems
from resexp.models import BasicBlock, ZeroPadShortcut, build_model, count_parameters, is_cifar_depth

# He et al. 2015, Table 6 (option A shortcuts add no parameters, so plain nets match).
PAPER_PARAMETERS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMETERS))
@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_parameter_counts_match_the_paper(arch, depth):
    with torch.device("meta"):  # 1202 layers: count without allocating
        model = build_model(arch, depth)
    assert count_parameters(model) == PAPER_PARAMETERS[depth]


def test_weighted_layer_count_is_depth():
    model = build_model("plain", 56)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 56
    assert all(conv.kernel_size == (3, 3) for conv in convs)
    assert sorted({conv.out_channels for conv in convs}) == [16, 32, 64]


def test_option_a_shortcuts_have_no_parameters_and_pad_with_zeros():
    block = BasicBlock(16, 32, stride=2, shortcut="A")
    assert isinstance(block.shortcut, ZeroPadShortcut)
    assert count_parameters(block.shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0


def test_option_b_projects_only_where_the_shape_changes_and_c_everywhere():
    resnet_b = build_model("resnet", 20, shortcut="B")
    resnet_c = build_model("resnet", 20, shortcut="C")
    projections_b = [b for b in resnet_b.modules() if isinstance(b, BasicBlock) and count_parameters(b.shortcut)]
    projections_c = [b for b in resnet_c.modules() if isinstance(b, BasicBlock) and count_parameters(b.shortcut)]
    assert len(projections_b) == 2  # the first block of stages 2 and 3
    assert len(projections_c) == 9  # every block


def test_plain_blocks_have_no_shortcut():
    model = build_model("plain", 20)
    assert all(block.shortcut is None for block in model.modules() if isinstance(block, BasicBlock))


@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_forward_shape_and_stage_resolutions(arch):
    model = build_model(arch, 20)
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape[1:])))
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_models_pickle_and_reload_identically():
    model = build_model("resnet", 8, shortcut="B").eval()
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), clone(x))


def test_he_initialisation_of_convolutions():
    torch.manual_seed(0)
    model = build_model("plain", 56)
    conv = model.stages[2][3].conv1  # 64 -> 64 channels, 3x3: fan_out = 576
    expected_std = (2 / (64 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)


@pytest.mark.parametrize("depth", [21, 0, 2, "abc"])
def test_depth_must_be_6n_plus_2(depth):
    # The nets trust their arguments: the config check is where a bad depth is caught.
    assert f"depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); got {depth}" in problems(compose([f"depth={depth}"]))
    assert not is_cifar_depth(depth)


def test_unknown_arch_and_shortcut_are_errors():
    assert problems(compose(["arch=dense"])) == ["arch must be one of plain, resnet; got 'dense'"]
    assert problems(compose(["model.shortcut=D"])) == ["model.shortcut must be one of A, B, C; got 'D'"]
