"""What the training-step tests share: a small net, fixed batches, the paper's SGD settings, and a copy
of everything a step changes (test_step.py on the CPU, test_cuda.py on a GPU)."""

from types import SimpleNamespace

import torch

from resexp.models import build_model

SCHEDULE = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=1e-4)  # the paper's SGD settings
LRS = [0.1, 0.1, 0.01, 0.01, 0.001]  # a schedule with drops between steps
BATCH = 16


def small_net(device="cpu"):
    torch.manual_seed(0)
    return build_model("resnet", 8, "A", num_classes=10).to(device, memory_format=torch.channels_last)


def batches(count, device="cpu"):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=generator).to(device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (BATCH,), generator=generator).to(device)) for _ in range(count)]


def state(model, optimizer):
    """Everything a step changes, as detached copies: parameters, buffers, momentum buffers."""
    tensors = {f"model.{name}": t.detach().clone() for name, t in model.state_dict().items()}
    for index, param in enumerate(model.parameters()):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().clone()
    return tensors
