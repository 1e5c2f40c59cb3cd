"""Fused training: runs whose nets have the same layer shapes, trained together in one step.

The seeds of one net, and a plain net beside its residual twin, have parameters of the same
shapes: the only difference between plain-n and ResNet-n (shortcut option A) is the
addition of the shortcut, which here becomes a per-run switch (``shortcut_gate``: 0 for the
plain net, 1 for the ResNet). ``torch.func`` stacks the runs' parameters **and** BatchNorm
buffers along a new first dimension and ``vmap`` runs one forward and backward pass for
all of them. SGD with momentum and weight decay is elementwise, so one update of the
stacked tensors, with each run's own learning rate, is each run's own update.

Every run keeps everything else of its own (``train.Run``): data order and augmentation
(its seed), warm-up, statistics, metrics.jsonl, checkpoint and folder. Before an
evaluation or a checkpoint the stacked state is copied into each run's own model and
optimizer, so a fused run writes exactly the checkpoint an unfused run would: either kind
of run resumes the other. The numbers match separate runs to float rounding, not bit for
bit (a batched convolution adds up in another order).

On a GPU this turns many tiny kernels into fewer, larger ones; on a CPU it saves little.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.func import functional_call, vmap

from .models import blocks
from .train import Run, eager_step, make_train_step, train_runs

# Config keys that may differ between fused runs; every other key must be equal.
PER_RUN_KEYS = ("arch", "seed", "name", "sweep", "progress", "resume", "out", "hydra")


def fusion_key(cfg: DictConfig) -> str | None:
    """Runs with the same key can train together; None for a run that trains alone.

    A plain net joins ResNets of its depth only where its residual twin adds no parameters
    and no scaling (shortcut A, residual scale 1); otherwise it joins other plain nets.
    """
    if cfg.compile is True:  # a compiled step is what was asked for: train it as asked
        return None
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in PER_RUN_KEYS:
        config.pop(key, None)
    model = config["model"]
    twin_of_plain = model["shortcut"] in ("A", "B") if model["family"] == "mlp" else model["shortcut"] == "A"
    if cfg.arch == "plain" or (twin_of_plain and model["residual_scale"] == 1.0):
        model.update(shortcut="A", residual_scale=1.0)  # the shape a plain net shares with its twin
        shape = "shared"
    else:
        shape = "resnet"
    return repr(sorted({**config, "model": model, "shape": shape}.items()))


def group_runs(configs: list[DictConfig]) -> list[list[int]]:
    """Indices of ``configs`` in groups that can be fused, in first-seen order (singletons too)."""
    groups: dict[str, list[int]] = {}
    alone = []
    for index, cfg in enumerate(configs):
        key = fusion_key(cfg)
        if key is None:
            alone.append([index])
        else:
            groups.setdefault(key, []).append(index)
    return sorted([*groups.values(), *alone], key=lambda group: group[0])


class FusedModels:
    """The stacked parameters, buffers and momentum of several runs' nets, and their SGD step."""

    def __init__(self, runs: list[Run]):
        models = [run.model for run in runs]
        gated = len({run.cfg.arch for run in runs}) > 1
        # The net every run is an instance of: a ResNet's, with a shortcut gate per block if plain nets join.
        template = next((run for run in runs if run.cfg.arch == "resnet"), runs[0]).model
        self.base = copy.deepcopy(template).to("meta")
        if gated:
            for block in blocks(self.base):
                block.register_buffer("shortcut_gate", torch.ones((), device="meta"), persistent=False)
        shapes = {name: tensor.shape for name, tensor in self.base.state_dict().items()}
        for run in runs:
            own = {name: tensor.shape for name, tensor in run.model.state_dict().items()}
            if own != shapes:
                raise ValueError(f"{run.dir.name} has other layer shapes than {runs[0].dir.name}; it cannot be fused")

        def stacked(tensors):
            return torch.stack([t.detach() for t in tensors]).contiguous()

        self.params = {name: stacked(dict(m.named_parameters())[name] for m in models).requires_grad_()
                       for name, _ in self.base.named_parameters()}
        self.buffers = {name: stacked(dict(m.named_buffers())[name] for m in models)
                        for name, _ in self.base.named_buffers() if not name.endswith("shortcut_gate")}
        if gated:
            device = runs[0].device
            gates = torch.tensor([1.0 if run.cfg.arch == "resnet" else 0.0 for run in runs], device=device)
            for name, _ in self.base.named_buffers():
                if name.endswith("shortcut_gate"):
                    self.buffers[name] = gates
        self.momentum = self._stacked_momentum(runs)
        schedule = runs[0].schedule
        self.momentum_factor, self.weight_decay = schedule.momentum, schedule.weight_decay
        self.amp = runs[0].amp

    def _stacked_momentum(self, runs: list[Run]) -> dict[str, torch.Tensor] | None:
        """The runs' momentum buffers (None before the first step, as in torch.optim.SGD)."""
        per_run = []
        for run in runs:
            state = run.optimizer.state
            buffers = {name: state[p].get("momentum_buffer") for name, p in run.model.named_parameters()
                       if p in state}
            per_run.append(buffers if buffers and all(b is not None for b in buffers.values()) else None)
        if all(b is None for b in per_run):
            return None
        if any(b is None for b in per_run):
            raise ValueError("some runs have taken optimizer steps and others have not; they cannot be fused")
        return {name: torch.stack([b[name] for b in per_run]).contiguous() for name in self.params}

    def _loss_and_wrong(self, params, buffers, x, y):
        logits = functional_call(self.base, (params, buffers), (x,))
        # The loss in float32 at least (autocast gives bf16 logits), as TrainStep computes it.
        loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)
        return loss, (logits.argmax(1) != y).sum()

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of every net: x is (runs, batch, ...), y (runs, batch), lr (runs,).

        Returns each run's loss and number of wrong predictions, as device tensors.
        """
        for p in self.params.values():
            p.grad = None
        with self.amp:
            losses, wrong = vmap(self._loss_and_wrong)(self.params, self.buffers, x, y)
        # The runs are independent, so the gradient of the sum is each run's own gradient.
        losses.sum().backward()
        with torch.no_grad():
            first_step = self.momentum is None
            if first_step:
                self.momentum = {}
            for name, p in self.params.items():
                # torch.optim.SGD's update (dampening 0, no Nesterov), with a learning rate per run.
                grad = p.grad.add(p, alpha=self.weight_decay)
                if first_step:
                    self.momentum[name] = grad.clone()
                else:
                    self.momentum[name].mul_(self.momentum_factor).add_(grad)
                p.sub_(self.momentum[name] * lr.view(-1, *[1] * (p.dim() - 1)))
        return losses.detach(), wrong

    def copy_into(self, index: int, run: Run) -> None:
        """Give run ``index`` its own model, gradients and optimizer state back, for its records."""
        with torch.no_grad():
            for name, p in run.model.named_parameters():
                p.copy_(self.params[name][index])
                grad = self.params[name].grad
                p.grad = None if grad is None else grad[index].clone().to(memory_format=_layout(p))
                if self.momentum is not None:
                    run.optimizer.state[p]["momentum_buffer"] = \
                        self.momentum[name][index].clone().to(memory_format=_layout(p))
            for name, b in run.model.named_buffers():
                b.copy_(self.buffers[name][index])
        run.lr_tensor.fill_(run.lr)


def _layout(p: torch.Tensor) -> torch.memory_format:
    """A parameter's memory format, so copies into the optimizer keep the layout of its own steps."""
    if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def fused_step(fused: FusedModels):
    """The lockstep training step for ``train_runs``: every run's own lr and batch, one update."""

    lr_tensors: dict[tuple, torch.Tensor] = {}  # made once per set of rates: a host-to-device copy waits

    def step(runs: list[Run]) -> None:
        lrs = [run.learning_rate() for run in runs]
        batches = [run.batches.batch(run.iteration) for run in runs]
        x = torch.stack([images for images, _ in batches])
        y = torch.stack([labels for _, labels in batches])
        if tuple(lrs) not in lr_tensors:
            lr_tensors[tuple(lrs)] = torch.tensor(lrs, dtype=x.dtype, device=x.device)
        losses, wrong = fused.step(x, y, lr_tensors[tuple(lrs)])
        for index, run in enumerate(runs):
            run.record_step(losses[index], wrong[index], y.shape[1], lrs[index])

    return step


def train_fused(configs: list[DictConfig], run_dirs: list[str | os.PathLike], *,
                stop_after: int | None = None) -> list[dict]:
    """Train the runs together where they can be fused (same layer shapes, same point in training),
    each alone otherwise. Returns each run's result, in order, like ``train.train``."""
    runs = [Run(cfg, run_dir, progress=cfg.progress and index == 0)
            for index, (cfg, run_dir) in enumerate(zip(configs, run_dirs))]
    results: dict[int, dict] = {index: {**run.finished, "outcome": "skipped"}
                                for index, run in enumerate(runs) if run.finished is not None}
    pending = [index for index in range(len(runs)) if index not in results]
    # Runs resumed at different iterations cannot step in lockstep: those beyond the first step alone.
    together = [index for index in pending if runs[index].iteration == runs[pending[0]].iteration] if pending else []
    if len(together) > 1 and len({fusion_key(configs[index]) for index in together}) == 1:
        fused_runs = [runs[index] for index in together]
        fused = FusedModels(fused_runs)

        def bring_up_to_date(runs_to_record: list[Run]) -> None:
            for index, run in enumerate(fused_runs):
                fused.copy_into(index, run)

        outcomes = train_runs(fused_runs, fused_step(fused), stop_after=stop_after, before_records=bring_up_to_date)
        results.update(zip(together, outcomes))
        pending = [index for index in pending if index not in together]
    for index in pending:
        run = runs[index]
        (results[index],) = train_runs([run], eager_step(make_train_step(run)), stop_after=stop_after)
    return [results[index] for index in range(len(runs))]

