"""The CIFAR-10 networks of He et al. 2015, section 4.2, and variants for analysing them.

A 3x3 convolution with 16 filters, then three stages of ``n`` blocks of two
3x3 convolutions each (16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps),
global average pooling and a 10-way linear layer: ``6n + 2`` weighted layers.
Every convolution is followed by batch normalisation. A *plain* net and a
*residual* net have the same layers; the residual net adds a shortcut around
every pair of convolutions.

Shortcut options (the paper's names):
    A  identity; where the shape changes, subsample by 2 and pad the new
       channels with zeros, so no parameters are added (the paper's default
       on CIFAR-10, which keeps plain and residual parameter counts equal).
    B  identity, and a 1x1 projection (+ BN) only where the shape changes.
    C  a 1x1 projection (+ BN) on every shortcut.

Variants (all off by default; the defaults are the paper's nets):
    block="preact"      pre-activation blocks of He et al. 2016 ("Identity Mappings
                        in Deep Residual Networks"): BN-ReLU-conv-BN-ReLU-conv, then
                        the addition with nothing after it; the stem is a bare
                        convolution and a final BN-ReLU comes before the pooling.
    residual_scale=a    the residual branch is multiplied by ``a`` before the addition.
    family="mlp"        fully connected nets on flattened 3x32x32 images, with
                        ``width`` units per hidden layer and BN after each dense layer.

Every block is a ``Block``: ``blocks(model)`` lists them in forward order,
``weighted_layers(model)`` lists the ``depth`` weighted layers (with
``gradient_norms(model)``, one gradient norm each), and ``response_modules(model)``
the modules whose outputs are the layer responses of the paper's Figure 7. The
analyses in ``analyze.py`` use only these.

The constructors trust their arguments: ``config.problems`` checks every value a user
can set before a net is built.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


ARCHS = ("plain", "resnet")
SHORTCUTS = ("A", "B", "C")
BLOCKS = ("basic", "preact")
FAMILIES = ("cifar", "mlp")
STAGE_WIDTHS = (16, 32, 64)
IMAGE_FEATURES = 3 * 32 * 32  # a flattened CIFAR image: the input of the fully connected nets
MLP_MIN_DEPTH = 2  # an input layer and an output layer


def is_cifar_depth(depth) -> bool:
    """Whether the paper's CIFAR nets exist at this depth: ``6n + 2`` weighted layers, n >= 1."""
    return isinstance(depth, int) and not isinstance(depth, bool) and depth >= 8 and (depth - 2) % 6 == 0


def blocks_per_stage(depth: int) -> int:
    """``n`` for a ``6n + 2``-layer net (the config was checked: ``config.problems``)."""
    assert is_cifar_depth(depth), depth
    return (depth - 2) // 6


# --- shortcuts ----------------------------------------------------------------------------------

class ZeroPadShortcut(nn.Module):
    """Option A where the shape changes: take every other pixel, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad the channel dimension: F.pad takes (W, W, H, H, C, C) from the last dim backwards.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class Projection(nn.Sequential):
    """Options B and C: a strided 1x1 convolution followed by BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class DenseProjection(nn.Sequential):
    """Option C in a fully connected net: a dense layer followed by BN."""

    def __init__(self, width: int):
        super().__init__(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width))


def make_shortcut(option: str | None, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The shortcut of one block, or None for a plain block."""
    if option is None:
        return None
    shape_changes = stride != 1 or in_channels != out_channels
    if option == "C" or (option == "B" and shape_changes):
        return Projection(in_channels, out_channels, stride)
    if shape_changes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Identity()


# --- blocks -------------------------------------------------------------------------------------

class Block(nn.Module):
    """Two weighted layers, with a shortcut around them in a residual net.

    Subclasses define ``parts(x)``: the residual branch F(x), already multiplied by
    ``residual_scale``, and what it is added to (None in a plain net); ``forward``
    combines them. ``without_branch(x)`` is the block's output with F removed, which
    is what a lesioned residual block computes.
    """

    shortcut: nn.Module | None
    residual_scale: float
    changes_shape: bool  # stride 2 or more channels: a plain block cannot be replaced by the identity

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def without_branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def response_modules(self) -> list[nn.Module]:
        """For each of the two layers, the module whose output is its response: after
        the layer's BN where one follows it, before any ReLU or addition."""
        raise NotImplementedError

    def _scaled(self, branch: torch.Tensor) -> torch.Tensor:
        # Skipping the multiplication at 1.0 keeps the paper's nets bit-for-bit as they were.
        return branch if self.residual_scale == 1.0 else branch * self.residual_scale


class BasicBlock(Block):
    """conv-BN-ReLU-conv-BN, plus the shortcut if there is one, then ReLU.

    With ``shortcut=None`` this is two layers of the plain net.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str | None = "A",
                 residual_scale: float = 1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)
        self.residual_scale = float(residual_scale)
        self.changes_shape = stride != 1 or in_channels != out_channels

    def parts(self, x):
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is None:
            return branch, None
        return self._scaled(branch), self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch, shortcut = self.parts(x)
        return F.relu(branch if shortcut is None else branch + shortcut)

    def without_branch(self, x):
        return F.relu(self.shortcut(x))

    def response_modules(self):
        return [self.bn1, self.bn2]


class PreActBlock(Block):
    """BN-ReLU-conv-BN-ReLU-conv, plus the shortcut if there is one; no ReLU after the addition.

    As in He et al. 2016, the shortcut takes the pre-activated input (the BN-ReLU is
    shared by both paths) in the first block of the net and where the shape changes;
    elsewhere it takes the block's input unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str | None = "A",
                 residual_scale: float = 1.0, first: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)
        self.residual_scale = float(residual_scale)
        self.changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut_takes_activation = first or self.changes_shape

    def parts(self, x):
        activated = F.relu(self.bn1(x))
        branch = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        if self.shortcut is None:
            return branch, None
        return self._scaled(branch), self.shortcut(activated if self.shortcut_takes_activation else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch, shortcut = self.parts(x)
        return branch if shortcut is None else branch + shortcut

    def without_branch(self, x):
        return self.shortcut(F.relu(self.bn1(x)) if self.shortcut_takes_activation else x)

    def response_modules(self):
        # conv1's output is normalised by bn2; conv2's goes straight into the addition.
        return [self.bn2, self.conv2]


class DenseLayer(nn.Sequential):
    """One hidden layer of a fully connected net: dense-BN-ReLU, or BN-ReLU-dense when pre-activated."""

    def __init__(self, in_features: int, width: int, preactivation: bool = False):
        if preactivation:
            super().__init__(nn.BatchNorm1d(in_features), nn.ReLU(), nn.Linear(in_features, width, bias=False))
        else:
            super().__init__(nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.preactivation = preactivation

    def response_module(self) -> nn.Module:
        return self[2] if self.preactivation else self[1]


class DenseBlock(Block):
    """Two dense layers of equal width with BN after each: a^{l+2} = ReLU(z^{l+2} + a^l).

    With ``preactivation`` the order is BN-ReLU-dense-BN-ReLU-dense and nothing follows
    the addition, as in ``PreActBlock``. Shortcut option C adds a dense projection;
    A and B are the identity (the width never changes).
    """

    def __init__(self, width: int, shortcut: str | None = "A", residual_scale: float = 1.0,
                 preactivation: bool = False, first: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.shortcut = None if shortcut is None else DenseProjection(width) if shortcut == "C" else nn.Identity()
        self.residual_scale = float(residual_scale)
        self.preactivation = preactivation
        self.changes_shape = False
        self.shortcut_takes_activation = preactivation and first

    def parts(self, x):
        if self.preactivation:
            activated = F.relu(self.bn1(x))
            branch = self.fc2(F.relu(self.bn2(self.fc1(activated))))
        else:
            activated = None
            branch = self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))
        if self.shortcut is None:
            return branch, None
        return self._scaled(branch), self.shortcut(activated if self.shortcut_takes_activation else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch, shortcut = self.parts(x)
        out = branch if shortcut is None else branch + shortcut
        return out if self.preactivation else F.relu(out)

    def without_branch(self, x):
        if self.preactivation:
            return self.shortcut(F.relu(self.bn1(x)) if self.shortcut_takes_activation else x)
        return F.relu(self.shortcut(x))

    def response_modules(self):
        return [self.bn2, self.fc2] if self.preactivation else [self.bn1, self.bn2]


# --- networks -----------------------------------------------------------------------------------

class CifarNet(nn.Module):
    """A ``6n+2``-layer CIFAR net; ``shortcut=None`` gives the plain net."""

    def __init__(self, depth: int, shortcut: str | None = "A", num_classes: int = 10, *,
                 block: str = "basic", residual_scale: float = 1.0):
        super().__init__()
        n = blocks_per_stage(depth)
        self.depth = depth
        self.preactivation = block == "preact"
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        # A pre-activated net normalises the stem's output inside the first block instead.
        self.bn1 = None if self.preactivation else nn.BatchNorm2d(STAGE_WIDTHS[0])
        stages = []
        in_channels = STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS):
            stage_blocks = []
            for index in range(n):
                # The first block of stages 2 and 3 halves the map with a stride-2 conv.
                stride = 2 if stage > 0 and index == 0 else 1
                if self.preactivation:
                    stage_blocks.append(PreActBlock(in_channels, width, stride, shortcut, residual_scale,
                                                    first=stage == 0 and index == 0))
                else:
                    stage_blocks.append(BasicBlock(in_channels, width, stride, shortcut, residual_scale))
                in_channels = width
            stages.append(nn.Sequential(*stage_blocks))
        self.stages = nn.Sequential(*stages)
        # Pre-activated blocks end on a convolution (or an addition): normalise before pooling.
        self.final_bn = nn.BatchNorm2d(in_channels) if self.preactivation else None
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = F.relu(self.bn1(x))
        x = self.stages(x)
        if self.final_bn is not None:
            x = F.relu(self.final_bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)

    def response_modules(self) -> list[nn.Module]:
        stem = self.conv1 if self.bn1 is None else self.bn1
        return [stem] + [module for block in blocks(self) for module in block.response_modules()]


class MlpNet(nn.Module):
    """A fully connected net with ``depth`` weighted layers on flattened 3x32x32 images.

    An input layer (3072 -> width), ``depth - 2`` hidden layers of ``width`` units and
    a ``num_classes``-way output layer; BN follows every dense layer but the output.
    Hidden layers are paired into blocks (with a shortcut around each pair in a
    residual net); when ``depth - 2`` is odd, the unpaired hidden layer comes right
    after the input layer, without a shortcut.
    """

    def __init__(self, depth: int, shortcut: str | None = "A", num_classes: int = 10, *,
                 block: str = "basic", residual_scale: float = 1.0, width: int = 256):
        super().__init__()
        assert depth >= MLP_MIN_DEPTH and width >= 1, (depth, width)
        self.depth = depth
        self.width = width
        self.preactivation = block == "preact"
        hidden_layers = depth - 2
        # Pre-activated: the first BN-ReLU belongs to the next layer, so the input layer is a bare dense layer.
        stem = [nn.Linear(IMAGE_FEATURES, width, bias=False) if self.preactivation
                else DenseLayer(IMAGE_FEATURES, width)]
        if hidden_layers % 2:
            stem.append(DenseLayer(width, width, self.preactivation))
        self.stem = nn.Sequential(*stem)
        self.blocks = nn.Sequential(*[
            DenseBlock(width, shortcut, residual_scale, self.preactivation, first=index == 0)
            for index in range(hidden_layers // 2)
        ])
        self.final_bn = nn.BatchNorm1d(width) if self.preactivation else None
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x.flatten(1)))
        if self.final_bn is not None:
            x = F.relu(self.final_bn(x))
        return self.fc(x)

    def response_modules(self) -> list[nn.Module]:
        stem = [layer if isinstance(layer, nn.Linear) else layer.response_module() for layer in self.stem]
        return stem + [module for block in self.blocks for module in block.response_modules()]


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init for convolutions and hidden dense layers, BN as identity: the paper's [13].

    The output layer keeps PyTorch's default init, as in the paper's nets.
    """
    output_layer = getattr(model, "fc", None)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear) and module is not output_layer:
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(arch: str, depth: int, shortcut: str = "A", num_classes: int = 10, *, block: str = "basic",
                residual_scale: float = 1.0, family: str = "cifar", width: int = 256) -> nn.Module:
    """The network a config asks for: ``arch`` is ``plain`` or ``resnet``; the keywords are the
    ``model.*`` options (``shortcut`` and ``residual_scale`` apply to residual nets only,
    ``width`` to ``family="mlp"`` only)."""
    shortcut = shortcut if arch == "resnet" else None
    if family == "mlp":
        return MlpNet(depth, shortcut, num_classes, block=block, residual_scale=residual_scale, width=width)
    return CifarNet(depth, shortcut, num_classes, block=block, residual_scale=residual_scale)


# --- what the analyses look at ------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile'd model wraps the original


def blocks(model: nn.Module) -> list[Block]:
    """The blocks of a net in forward order."""
    return [module for module in _unwrap(model).modules() if isinstance(module, Block)]


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    """The ``depth`` weighted layers (convolutions and dense layers) in forward order.

    Projection shortcuts are left out, as in the paper's layer counts.
    """
    in_shortcuts = {id(m) for block in blocks(model) if block.shortcut is not None for m in block.shortcut.modules()}
    return [module for module in _unwrap(model).modules()
            if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in in_shortcuts]


def response_modules(model: nn.Module) -> list[nn.Module]:
    """For each weighted layer but the output layer, the module whose output is its response."""
    return _unwrap(model).response_modules()


def gradient_norms(model: nn.Module) -> list[float]:
    """The norm of the loss gradient of every weighted layer's weight, in forward order.

    One value per layer of ``weighted_layers(model)`` (``depth`` values); NaN for a layer
    with no gradient yet. The trainer logs it after the last step before each evaluation;
    it only reads ``.grad``.
    """
    norms = [torch.linalg.vector_norm(layer.weight.grad.detach().float()) if layer.weight.grad is not None
             else torch.tensor(float("nan"), device=layer.weight.device) for layer in weighted_layers(model)]
    return torch.stack(norms).tolist() if norms else []  # one device sync for all layers


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_macs(model: nn.Module, image_shape: tuple[int, ...] = (3, 32, 32)) -> int:
    """Multiply-adds of one image's forward pass: the FLOPs torch's ``FlopCounterMode`` counts, halved.

    It counts the convolutions and matrix products (2 FLOPs per multiply-add, biases left out);
    normalisation, activations, pooling, the additions and option A's zero-padding shortcut
    count nothing, as in the usual FLOP counts of these nets.
    """
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    image = torch.zeros(1, *image_shape, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()  # a forward in training mode would update the BN statistics
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def build_model_for(cfg, num_classes: int = 10) -> nn.Module:
    """The net a run's config (``arch``, ``depth``, ``model.*``) describes: each ``model.*`` option
    is the keyword of ``build_model`` with its name."""
    return build_model(cfg.arch, cfg.depth, num_classes=num_classes, **cfg.model)
