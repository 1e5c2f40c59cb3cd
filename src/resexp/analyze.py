"""Inside the networks: measurements that test the explanations of degradation.

He et al. 2015 argue that deep plain nets are hard to *optimise*, not that their
gradients vanish (BN keeps the forward signal alive) and not that they overfit;
that residual functions stay close to zero, so layers act near the identity; and
Veit et al. 2016 add that a ResNet behaves like an ensemble of shallower paths,
so one block can be removed at test time without ruining it. Each analysis here
turns one of those claims into numbers for the runs in a sweep (or run) folder:

    gradients   the gradient norm of every weighted layer, as the trainer logged it
                at each evaluation (``grad_norms`` in metrics.jsonl, computed by
                ``models.gradient_norms``): by layer, as a layer-by-iteration heatmap,
                and the first-to-last-layer ratio;
    responses   the paper's Figure 7: the std of each layer's response (after BN,
                before the ReLU or addition) on the test set;
    lesion      test error with each block removed in turn, and with k random blocks
                removed (a residual block keeps its shortcut; a plain block becomes
                the identity where its input and output shapes match);
    identity    ||F(x)|| / ||x|| of every residual branch on the test set.

Each ``analyze_*`` function writes PNG figures and a CSV into the folder and
returns the numbers it drew (errors as fractions, as in metrics.jsonl), so tests
check data rather than pixels. ``analyze_command`` is ``resexp analyze``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator
from omegaconf import OmegaConf
from torch import nn

from .data import load_data, normalize, pixel_mean, stratified_indices
from .config import config_differences, paper_schedule
from .errors import UsageError
from .files import (CHECKPOINT, CONFIG, atomic_write, atomic_write_text, existing_folder, parse_folder_args,
                    unusable_folder_reason, write_error_reason)
from .models import ARCHS, Block, blocks, build_model_for, response_modules
from .plots import (DEPTH_PALETTE, DPI, FIGURE_STYLE, RunRecord, family_of, fit_titles, load_runs, net_prefix,
                    panel_title)
from .step import autocast, evaluate, resolve_precision

ANALYSES = ("responses", "lesion", "gradients", "identity")
LESION_DRAWS = 5  # random subsets of blocks removed per count k
LESION_SEED = 0  # the same subsets for every run with the same number of blocks
GRADIENT_SNAPSHOTS = 4  # evaluations shown in the gradient-by-layer figure
LINE_STYLES = ("-", "--", ":", "-.")  # runs of one depth in one panel (seeds, variants)
# A lesion study evaluates the test set once per block and per random draw: about 55 passes for a
# 20-layer net. On a stratified sample of this size that takes about a minute on a CPU.
DEFAULT_MAX_IMAGES = 1000

USAGE = """\
usage: resexp analyze [responses|lesion|gradients|identity|all] DIR [max_images=N|all]

Measure what happens inside the trained nets of a sweep (or run) folder DIR and write
figures (PNG) and a CSV per analysis into DIR:

  responses   std of each layer's response on the test set (He et al. 2015, Figure 7)
  lesion      test error with each block removed, and with k random blocks removed
  gradients   gradient norm per layer over training (from metrics.jsonl's grad_norms)
  identity    ||F(x)|| / ||x|| of each residual branch on the test set
  all         every analysis that applies (the default when only DIR is given)

options:
  max_images=N    measure on N test images, a stratified sample that is the same for every
                  run (default: {default}, about a minute per 20-layer net on a CPU)
  max_images=all  measure on the whole test set (on a CPU, a quarter of an hour and more per net)

examples:
  resexp analyze outputs/depth20-56-110                        every analysis, on {default} test images
  resexp analyze lesion outputs/depth20-56-110 max_images=all   the lesion study, on every test image
""".format(default=DEFAULT_MAX_IMAGES)


class NotApplicable(UsageError):
    """The folder's runs cannot show this analysis (e.g. no residual nets); ``all`` skips it."""


# --- trained nets -------------------------------------------------------------------------------

@dataclass
class TrainedNet:
    """A run's final model on the analysis device, with the images it is measured on."""

    run: RunRecord
    model: nn.Module
    images: torch.Tensor  # uint8 [N, 3, 32, 32] on the device
    labels: torch.Tensor
    mean: torch.Tensor  # the training set's per-pixel mean, as the trainer subtracted it
    batch_size: int
    precision: str  # the run's evaluation precision on this device
    eval_set: str  # "test", or "val" when the run held out a validation split
    iteration: int | None  # the checkpoint's iteration


def trained_runs(folder: str | os.PathLike) -> list[RunRecord]:
    """The runs under ``folder`` that have a checkpoint to analyse (diverged runs are left out)."""
    folder = existing_folder(folder)
    runs = [run for run in load_runs(folder)
            if (run.path / CHECKPOINT).is_file() and run.status != "diverged"]
    if not runs:
        raise UsageError(f"no trained runs in {folder} (no run folder with a {CHECKPOINT} that did not diverge)")
    return runs


def analysis_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class NetLoader:
    """Loads trained nets one at a time, reading each data set only once."""

    def __init__(self, max_images: int | None = None, device: torch.device | None = None):
        self.max_images = max_images
        self.device = device or analysis_device()
        self._data: dict[tuple, tuple] = {}

    def load(self, run: RunRecord) -> TrainedNet:
        path = run.path / CHECKPOINT
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            state, config = checkpoint["model"], checkpoint["config"]
        except Exception as error:
            raise UsageError(f"{path}: unreadable checkpoint ({type(error).__name__})") from error
        if run.path.joinpath(CONFIG).is_file() and (differences := config_differences(run.config, config)):
            raise UsageError(f"{path} is not the checkpoint of the run in {run.path}: its config differs from "
                             f"{CONFIG} in {'; '.join(differences)}; analyse the folder it was trained in")
        done, planned = checkpoint.get("iteration"), config.get("schedule", {}).get("iterations")
        if isinstance(done, int) and isinstance(planned, int) and done < planned:
            print(f"note: {run.name} is not finished: analysing its checkpoint at iteration {done} of {planned}",
                  file=sys.stderr)
        images, labels, mean, classes, eval_set = self._images(config)
        model = build_model_for(OmegaConf.create(config), num_classes=len(classes))
        try:
            # A torch.compile'd model saves its weights under "_orig_mod.".
            model.load_state_dict({key.removeprefix("_orig_mod."): value for key, value in state.items()})
        except RuntimeError as error:
            raise UsageError(f"{path}: the weights do not fit the net that the run's config describes "
                             f"({str(error).splitlines()[0]})") from error
        model = model.to(self.device, memory_format=torch.channels_last).eval()
        try:
            precision = resolve_precision(config.get("precision", "auto"), self.device)
        except UsageError:  # fp16 asked for on a CPU
            precision = "fp32"
        batch_size = int((config.get("schedule") or {}).get("eval_batch_size") or 1000)
        return TrainedNet(run, model, images, labels, mean, batch_size, precision, eval_set,
                          done if isinstance(done, int) else None)

    def _images(self, config: dict):
        data_config = config["data"]
        key = (data_config["name"], data_config.get("root"), data_config.get("train_size"),
               data_config.get("test_size"), data_config.get("val_size"), data_config.get("resize", False),
               config["seed"])
        if key not in self._data:
            data = load_data(data_config["name"], data_config.get("root"), train_size=data_config.get("train_size"),
                             test_size=data_config.get("test_size"), val_size=data_config.get("val_size"),
                             resize=data_config.get("resize", False), download=False, seed=config["seed"])
            images, labels = data.test_images, data.test_labels
            if self.max_images is not None and self.max_images < len(labels):
                chosen = stratified_indices(labels, self.max_images, seed=0)
                _say_once(f"measuring on {self.max_images:,} of the {len(labels):,} {data.eval_set} images "
                     "(a stratified sample, the same for every run; max_images=all for every image)")
                images, labels = images[chosen], labels[chosen]
            else:
                _say_once(f"measuring on all {len(labels):,} {data.eval_set} images")
            self._data[key] = (images.to(self.device), labels.to(self.device),
                               pixel_mean(data.train_images).to(self.device), data.classes, data.eval_set)
        return self._data[key]


def eval_batches(net: TrainedNet):
    """The measured images as normalised float batches, as the trainer evaluates them."""
    for start in range(0, len(net.images), net.batch_size):
        x = normalize(net.images[start : start + net.batch_size], net.mean)
        yield x.contiguous(memory_format=torch.channels_last)


def run_with_hooks(net, modules, make_hook) -> None:
    """Run the evaluation images through the net with ``make_hook(index)`` on each module."""
    handles = [module.register_forward_hook(make_hook(index)) for index, module in enumerate(modules)]
    try:
        with torch.inference_mode():
            for x in eval_batches(net):
                net.model(x)
    finally:
        for handle in handles:
            handle.remove()


def run_row(run: RunRecord) -> dict:
    return {"run": run.name, "arch": run.arch, "depth": run.depth, "seed": run.seed, "family": family_of(run.config)}


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


# --- layer responses (He et al. 2015, Figure 7) -------------------------------------------------

def layer_response_stds(net: TrainedNet) -> tuple[list[str], list[float]]:
    """The std of each layer's response over all measured images (and channels and pixels).

    A response is the output of a weighted layer after its BN, before the ReLU or the
    addition (``models.response_modules``); one per layer but the output layer.
    """
    modules = response_modules(net.model)
    names = module_names(net.model)
    # Sums in float64: the std comes from sum and sum of squares over millions of values.
    sums = torch.zeros(len(modules), 3, dtype=torch.float64, device=net.images.device)

    def recorder(index):
        def record(module, inputs, output):
            values = output.detach().double()
            sums[index, 0] += values.sum()
            sums[index, 1] += values.square().sum()
            sums[index, 2] += values.numel()
        return record

    run_with_hooks(net, modules, recorder)
    total, total_squares, count = sums.T
    variance = (total_squares / count - (total / count).square()).clamp_min(0)
    return [names[id(module)] for module in modules], variance.sqrt().tolist()


def analyze_responses(folder: str | os.PathLike, max_images: int | None = None) -> dict:
    """Figure 7 for every trained run: response std by layer and sorted by magnitude."""
    folder = Path(folder)
    loader = NetLoader(max_images)
    measured = []
    for run in trained_runs(folder):
        _say(f"responses: {run.name}")
        net = loader.load(run)
        layers, stds = layer_response_stds(net)
        measured.append({**run_row(run), "layers": layers, "std": stds, **measured_on(net)})

    rows = [{**run_row_of(entry), "layer": index, "module": layer, "std": std}
            for entry in measured for index, (layer, std) in enumerate(zip(entry["layers"], entry["std"]), start=1)]
    csv_path = folder / "responses.csv"
    write_csv(csv_path, rows, ["run", "arch", "depth", "seed", "layer", "module", "std"])
    if caveat := responses_caveat(measured):
        _say(f"responses: note: {caveat}")

    archs = arch_columns(measured)
    with matplotlib.rc_context(FIGURE_STYLE):
        fig = Figure(figsize=(6.0 * len(archs), 7.6), layout="constrained")
        axes = fig.subplots(2, len(archs), sharey="row", squeeze=False)
        for column, arch in enumerate(archs):
            entries = [e for e in measured if e["arch"] == arch]
            for entry, style in line_styles(entries, measured):
                stds = np.asarray(entry["std"])
                axes[0, column].plot(np.arange(1, len(stds) + 1), stds, **style)
                axes[1, column].plot(np.arange(1, len(stds) + 1), np.sort(stds)[::-1], **style)
            axes[0, column].set_title(arch_title(arch, measured))
            axes[0, column].set_xlabel("layer index (original order)")
            axes[1, column].set_xlabel("layer index (sorted by magnitude)")
            for ax in axes[:, column]:
                ax.set_xlim(left=0)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if entries:
                    ax.legend(loc="best", framealpha=0.9)
        largest = max((max(e["std"]) for e in measured if e["std"]), default=1.0)
        for ax in axes[:, 0]:  # the rows share their y range
            ax.set_ylim(0, 1.08 * largest if math.isfinite(largest) and largest > 0 else 1.0)
            ax.set_ylabel("std of layer response")
        caveat = responses_caveat(measured)
        fig.suptitle(f"Layer responses on {image_count_text(measured)}: after BN, before ReLU/addition"
                     + (f"\n{caveat}" if caveat else ""))
        png = save_png(fig, folder / "responses.png")
    return {"runs": measured, "rows": rows, "files": [png, str(csv_path)]}


# --- lesion study (Veit et al. 2016) ------------------------------------------------------------

class WithoutBranch(nn.Module):
    """A residual block with its residual branch removed: only the shortcut remains."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.without_branch(x)


def removable(block: Block) -> bool:
    """A residual block can always lose its branch; a plain block only where the identity fits."""
    return block.shortcut is not None or not block.changes_shape


@contextlib.contextmanager
def blocks_removed(model: nn.Module, indices):
    """Within the context, the blocks at ``indices`` (of ``blocks(model)``) are removed."""
    block_list = blocks(model)
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    swapped = []
    try:
        for index in indices:
            block = block_list[index]
            if not removable(block):
                raise ValueError(f"block {index} of a plain net changes the shape and cannot be removed")
            parent, name = parents[id(block)]
            setattr(parent, name, WithoutBranch(block) if block.shortcut is not None else nn.Identity())
            swapped.append((parent, name, block))
        yield
    finally:
        for parent, name, block in swapped:
            setattr(parent, name, block)


def error_without(net: TrainedNet, removed=()) -> float:
    """Test error (a fraction) with the blocks at ``removed`` taken out; with none removed
    it is computed exactly as the trainer's evaluation."""
    with blocks_removed(net.model, removed):
        _, error = evaluate(net.model, net.images, net.labels, net.mean, net.batch_size,
                            autocast(net.images.device, net.precision))
    return error


def lesion_study(net: TrainedNet, draws: int = LESION_DRAWS, seed: int = LESION_SEED) -> dict:
    """Errors with nothing removed, with each block removed, and with k random removable blocks
    removed for k = 1 .. (number of removable blocks), ``draws`` distinct subsets per k."""
    block_list = blocks(net.model)
    names = module_names(net.model)
    can_remove = [removable(block) for block in block_list]
    single_errors = [error_without(net, [index]) if ok else None for index, ok in enumerate(can_remove)]
    candidates = [index for index, ok in enumerate(can_remove) if ok]
    generator = np.random.default_rng(seed)
    random_errors: dict[int, list[float]] = {}
    total = sum(min(draws, math.comb(len(candidates), count)) for count in range(1, len(candidates) + 1))
    done = 0
    for count in range(1, len(candidates) + 1):
        subsets: list[tuple] = []
        while len(subsets) < min(draws, math.comb(len(candidates), count)):
            subset = tuple(sorted(generator.choice(candidates, size=count, replace=False).tolist()))
            if subset not in subsets:
                subsets.append(subset)
        random_errors[count] = [error_without(net, subset) for subset in subsets]
        done += len(subsets)
        # A deep net takes hundreds of evaluations: a line about every quarter of them.
        if done < total and done * 4 // total > (done - len(subsets)) * 4 // total:
            _say(f"lesion: {net.run.name}: {done} of {total} random removals")
    return {
        "blocks": [names[id(block)] for block in block_list],
        "downsampling": [block.changes_shape for block in block_list],
        "removable": can_remove,
        "baseline_error": error_without(net),
        "single_errors": single_errors,
        "random_errors": random_errors,
    }


def analyze_lesion(folder: str | os.PathLike, max_images: int | None = None, draws: int = LESION_DRAWS) -> dict:
    """Remove blocks at test time from every trained net; figure and CSV of the test errors."""
    folder = Path(folder)
    loader = NetLoader(max_images)
    measured = []
    for run in trained_runs(folder):
        net = loader.load(run)
        removals = len(blocks(net.model))
        _say(f"lesion: {run.name}: removing each of its {removals} blocks, then random sets of blocks")
        measured.append({**run_row(run), **lesion_study(net, draws), **measured_on(net),
                         "chance_error": 1 - 1 / net.model.fc.out_features})

    rows = []
    for entry in measured:
        base = run_row_of(entry)
        rows.append({**base, "removed": "none", "count": 0, "draw": "", "block": "", "module": "",
                     "downsampling": "", "test_error": entry["baseline_error"]})
        for index, error in enumerate(entry["single_errors"]):
            rows.append({**base, "removed": "one block", "count": 1, "draw": "", "block": index + 1,
                         "module": entry["blocks"][index], "downsampling": entry["downsampling"][index],
                         "test_error": "impossible" if error is None else error})
        for count, errors in entry["random_errors"].items():
            for draw, error in enumerate(errors):
                rows.append({**base, "removed": "random blocks", "count": count, "draw": draw, "block": "",
                             "module": "", "downsampling": "", "test_error": error})
    csv_path = folder / "lesion.csv"
    write_csv(csv_path, rows, ["run", "arch", "depth", "seed", "removed", "count", "draw", "block", "module",
                               "downsampling", "test_error"])

    archs = arch_columns(measured)
    with matplotlib.rc_context(FIGURE_STYLE):
        fig = Figure(figsize=(6.0 * len(archs), 8.0), layout="constrained")
        axes = fig.subplots(2, len(archs), sharey=True, squeeze=False)
        for column, arch in enumerate(archs):
            entries = [e for e in measured if e["arch"] == arch]
            draw_single_lesions(axes[0, column], entries, measured)
            draw_random_lesions(axes[1, column], entries, measured)
            # Room above the panel for the markers of blocks that cannot be removed.
            axes[0, column].set_title(f"{arch_title(arch, measured)}: one block removed", pad=12)
            axes[1, column].set_title(f"{arch_title(arch, measured)}: k random blocks removed")
        for ax in axes[:, 0]:
            ax.set_ylabel(f"{eval_set_name(measured)} error (%)")
        fig.suptitle(f"Lesion study on {image_count_text(measured)} "
                     f"(dotted: error with no block removed; mean ± std over up to {draws} random draws)")
        png = save_png(fig, folder / "lesion.png")
    return {"runs": measured, "rows": rows, "files": [png, str(csv_path)]}


def draw_single_lesions(ax, entries: list[dict], measured: list[dict]) -> None:
    marked = False  # a plain net's downsampling blocks cannot be removed: nothing to mark, nothing to explain
    for entry, style in line_styles(entries, measured):
        errors = np.array([math.nan if e is None else 100 * e for e in entry["single_errors"]])
        positions = np.arange(1, len(errors) + 1)
        # Visible markers: in a plain net the removable blocks may be isolated points between gaps.
        (line,) = ax.plot(positions, errors, marker="o", markersize=4, **style)
        ax.axhline(100 * entry["baseline_error"], color=line.get_color(), linestyle=":", linewidth=1.2)
        downsampling = np.asarray(entry["downsampling"], dtype=bool) & np.isfinite(errors)
        mark_downsampling(ax, positions[downsampling], errors[downsampling], line.get_color())
        marked |= bool(downsampling.any())
        impossible = ~np.asarray(entry["removable"], dtype=bool)
        if impossible.any():  # drawn on the top edge, where no error can hide them
            ax.plot(positions[impossible], np.full(impossible.sum(), 100.0), linestyle="none", marker="x",
                    markersize=9, markeredgewidth=2.2, color=line.get_color(), clip_on=False)
    draw_chance(ax, entries)
    ax.set_xlabel("removed block (1 = nearest the input)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, _ = ax.get_legend_handles_labels()
    if marked:
        handles.append(downsampling_key())
    if not all(all(e["removable"]) for e in entries):
        handles.append(Line2D([], [], linestyle="none", marker="x", color="0.3", markersize=9, markeredgewidth=2.2,
                              label="cannot be removed (shape changes)"))
    if handles:
        ax.legend(handles=handles, loc="best", framealpha=0.9)


def draw_random_lesions(ax, entries: list[dict], measured: list[dict]) -> None:
    for entry, style in line_styles(entries, measured):
        counts = np.array([0] + list(entry["random_errors"]))
        errors = [[entry["baseline_error"]]] + list(entry["random_errors"].values())
        means = np.array([100 * np.mean(e) for e in errors])
        stds = np.array([100 * np.std(e) for e in errors])
        (line,) = ax.plot(counts, means, marker=".", **style)
        ax.fill_between(counts, means - stds, means + stds, color=line.get_color(), alpha=0.15, linewidth=0)
    draw_chance(ax, entries)
    ax.set_xlabel("number of blocks removed at random")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if entries:
        ax.legend(loc="best", framealpha=0.9)


def downsampling_key() -> Line2D:
    return Line2D([], [], linestyle="none", marker="s", markerfacecolor="none", markeredgecolor="0.3",
                  markersize=9, label="downsampling block")


def mark_downsampling(ax, positions: np.ndarray, values: np.ndarray, colour) -> None:
    """Hollow squares on the blocks that halve the map (and widen it)."""
    if len(positions):  # an empty line would still take part in the layout
        ax.plot(positions, values, linestyle="none", marker="s", markersize=9, markerfacecolor="none",
                markeredgecolor=colour, markeredgewidth=1.8)


def draw_chance(ax, entries: list[dict]) -> None:
    for chance in sorted({e["chance_error"] for e in entries}):
        ax.axhline(100 * chance, color="0.5", linestyle="-.", linewidth=1.0)
        ax.annotate("chance", (1.0, 100 * chance), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", va="bottom", color="0.4", fontsize=8)


# --- how close residual blocks are to the identity ----------------------------------------------

def branch_ratios(net: TrainedNet) -> dict:
    """For each residual block: the mean over images of ||F(x)|| / ||shortcut(x)||.

    F(x) is the residual branch as it is added (times ``residual_scale``); the
    shortcut's output is x itself except where it subsamples, pads or projects.
    Norms are per image, over channels and pixels.
    """
    residual_blocks = [block for block in blocks(net.model) if block.shortcut is not None]
    names = module_names(net.model)
    # Per block: sum of ratios, sum of ||F(x)||, sum of ||shortcut(x)||.
    sums = torch.zeros(len(residual_blocks), 3, dtype=torch.float64, device=net.images.device)

    def recorder(index):
        def record(block, inputs, output):
            branch, shortcut = block.parts(inputs[0])
            branch_norm = branch.flatten(1).double().norm(dim=1)
            shortcut_norm = shortcut.flatten(1).double().norm(dim=1)
            ratio = branch_norm / shortcut_norm.clamp_min(1e-12)
            sums[index] += torch.stack([ratio.sum(), branch_norm.sum(), shortcut_norm.sum()])
        return record

    run_with_hooks(net, residual_blocks, recorder)
    means = (sums / len(net.images)).T.tolist() if residual_blocks else [[], [], []]
    return {
        "blocks": [names[id(block)] for block in residual_blocks],
        "downsampling": [block.changes_shape for block in residual_blocks],
        "ratio": means[0], "branch_norm": means[1], "shortcut_norm": means[2],
    }


def analyze_identity(folder: str | os.PathLike, max_images: int | None = None) -> dict:
    """||F(x)|| / ||x|| of every residual block of every trained residual net."""
    folder = Path(folder)
    runs = [run for run in trained_runs(folder) if run.arch == "resnet"]
    if not runs:
        raise NotApplicable(f"no trained residual nets in {folder}: the identity analysis needs arch=resnet runs")
    loader = NetLoader(max_images)
    measured = []
    for run in runs:
        _say(f"identity: {run.name}")
        net = loader.load(run)
        measured.append({**run_row(run), **branch_ratios(net), **measured_on(net)})

    rows = [{**run_row_of(entry), "block": index + 1, "module": entry["blocks"][index],
             "downsampling": entry["downsampling"][index], "ratio": entry["ratio"][index],
             "branch_norm": entry["branch_norm"][index], "shortcut_norm": entry["shortcut_norm"][index]}
            for entry in measured for index in range(len(entry["blocks"]))]
    csv_path = folder / "identity.csv"
    write_csv(csv_path, rows, ["run", "arch", "depth", "seed", "block", "module", "downsampling", "ratio",
                               "branch_norm", "shortcut_norm"])

    with matplotlib.rc_context(FIGURE_STYLE):
        fig = Figure(figsize=(7.5, 4.8), layout="constrained")
        ax = fig.subplots()
        for entry, style in line_styles(measured, measured):
            ratios = np.asarray(entry["ratio"])
            positions = np.arange(1, len(ratios) + 1)
            (line,) = ax.plot(positions, ratios, marker=".", **style)
            downsampling = np.asarray(entry["downsampling"], dtype=bool)
            mark_downsampling(ax, positions[downsampling], ratios[downsampling], line.get_color())
        handles, _ = ax.get_legend_handles_labels()
        if any(any(e["downsampling"]) for e in measured):
            handles.append(downsampling_key())
        ax.legend(handles=handles, loc="best", framealpha=0.9)
        ax.set_xlabel("residual block (1 = nearest the input)")
        ax.set_ylabel("||F(x)|| / ||x||  (mean over images)")
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.set_title(f"Size of each residual branch relative to its input, on {image_count_text(measured)}")
        png = save_png(fig, folder / "identity.png")
    return {"runs": measured, "rows": rows, "files": [png, str(csv_path)]}


# --- gradient norms over training ---------------------------------------------------------------

def gradient_history(run: RunRecord) -> dict | None:
    """The ``grad_norms`` a run logged: iterations and an [evaluations x layers] array."""
    logged = [row for row in run.metrics if isinstance(row.get("grad_norms"), list) and row["grad_norms"]]
    if not logged:
        return None
    layers = max(len(row["grad_norms"]) for row in logged)
    logged = [row for row in logged if len(row["grad_norms"]) == layers]
    norms = np.array([[math.nan if v is None else float(v) for v in row["grad_norms"]] for row in logged])
    with np.errstate(divide="ignore", invalid="ignore"):
        first_to_last = norms[:, 0] / norms[:, -1]
    return {**run_row(run), "iterations": [int(row["iteration"]) for row in logged],
            "grad_norms": norms.tolist(), "first_to_last": first_to_last.tolist()}


def analyze_gradients(folder: str | os.PathLike) -> dict:
    """Figures from the gradient norms logged during training: by layer at a few iterations,
    a layer-by-iteration heatmap, and the first-to-last-layer ratio over training."""
    folder = existing_folder(folder)
    measured = [history for run in load_runs(folder) if (history := gradient_history(run)) is not None]
    if not measured:
        raise NotApplicable(f"no run in {folder} logged gradient norms (grad_norms in metrics.jsonl)")

    rows = [{**run_row_of(entry), "iteration": iteration, "layer": layer, "grad_norm": norm}
            for entry in measured for iteration, norms in zip(entry["iterations"], entry["grad_norms"])
            for layer, norm in enumerate(norms, start=1)]
    csv_path = folder / "gradients.csv"
    write_csv(csv_path, rows, ["run", "arch", "depth", "seed", "iteration", "layer", "grad_norm"])
    files = [draw_gradients_by_layer(measured, folder / "gradients_by_layer.png"),
             draw_gradient_heatmaps(measured, folder / "gradients_heatmap.png"),
             draw_gradient_ratio(measured, folder / "gradients_ratio.png"), str(csv_path)]
    return {"runs": measured, "rows": rows, "files": files}


def snapshot_indices(count: int, wanted: int = GRADIENT_SNAPSHOTS) -> list[int]:
    """Up to ``wanted`` evaluations spread evenly from the first to the last."""
    return sorted(set(np.linspace(0, count - 1, min(wanted, count)).round().astype(int).tolist()))


def run_grid(measured: list[dict]) -> tuple[list[str], list[list[dict | None]]]:
    """Runs laid out with one column per arch and one row per everything else (depth, seed,
    variant), so that the plain and residual twins sit side by side."""
    archs = arch_columns(measured)
    twins: dict[str, dict[str, dict]] = {}
    for entry in sorted(measured, key=lambda e: (e["depth"], e["run"])):
        twins.setdefault(name_without_arch(entry), {})[entry["arch"]] = entry
    return archs, [[row.get(arch) for arch in archs] for row in twins.values()]


def filled_panels(grid: list[list], axes):
    """(run, panel) for each filled cell of a ``run_grid``; the panels of empty cells are switched off."""
    for grid_row, row_axes in zip(grid, axes):
        for entry, ax in zip(grid_row, row_axes):
            if entry is None:
                ax.set_axis_off()
            else:
                yield entry, ax


def draw_gradients_by_layer(measured: list[dict], path: Path) -> str:
    archs, grid = run_grid(measured)
    with matplotlib.rc_context(FIGURE_STYLE):
        fig = Figure(figsize=(6.0 * len(archs), 0.8 + 3.4 * len(grid)), layout="constrained")
        axes = fig.subplots(len(grid), len(archs), squeeze=False, sharey=True)
        for entry, ax in filled_panels(grid, axes):
            norms = np.asarray(entry["grad_norms"])
            picked = snapshot_indices(len(norms))
            colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(picked)))
            for colour, index in zip(colours, picked):
                ax.plot(np.arange(1, norms.shape[1] + 1), norms[index], color=colour, marker=".",
                        label=f"iteration {entry['iterations'][index]}")
            ax.set_yscale("log")
            ax.set_title(run_title(entry))
            ax.set_xlabel("layer (1 = input side)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(loc="best", framealpha=0.9)
        for ax in axes[:, 0]:
            ax.set_ylabel("gradient norm")
        fig.suptitle("Gradient norm of each weighted layer at a few iterations (last training step before the "
                     "evaluation)")
        return save_png(fig, path)


def draw_gradient_heatmaps(measured: list[dict], path: Path) -> str:
    archs, grid = run_grid(measured)
    finite = np.concatenate([np.asarray(e["grad_norms"]).ravel() for e in measured])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    with matplotlib.rc_context(FIGURE_STYLE):
        fig = Figure(figsize=(6.0 * len(archs) + 1.0, 0.8 + 3.4 * len(grid)), layout="constrained")
        axes = fig.subplots(len(grid), len(archs), squeeze=False)
        mesh = None
        for entry, ax in filled_panels(grid, axes):
            norms = np.asarray(entry["grad_norms"])
            masked = np.ma.masked_where(~(np.isfinite(norms) & (norms > 0)), norms)
            mesh = ax.pcolormesh(cell_edges(entry["iterations"]), np.arange(0.5, norms.shape[1] + 1),
                                 masked.T, norm=norm, cmap="magma", shading="flat")
            ax.set_title(run_title(entry))
            ax.set_xlabel("iteration")
            ax.set_ylabel("layer (1 = input side)")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
            ax.grid(False)
        if mesh is not None:
            fig.colorbar(mesh, ax=axes, label="gradient norm (log scale)", shrink=0.9)
        fig.suptitle("Gradient norm by layer and iteration")
        return save_png(fig, path)


def draw_gradient_ratio(measured: list[dict], path: Path) -> str:
    archs = arch_columns(measured)
    with matplotlib.rc_context(FIGURE_STYLE):
        fig = Figure(figsize=(6.0 * len(archs), 4.8), layout="constrained")
        axes = fig.subplots(1, len(archs), squeeze=False, sharey=True)[0]
        for ax, arch in zip(axes, archs):
            entries = [e for e in measured if e["arch"] == arch]
            for entry, style in line_styles(entries, measured):
                ax.plot(entry["iterations"], entry["first_to_last"], marker=".", **style)
            ax.axhline(1.0, color="0.5", linestyle=":", linewidth=1.0)
            ax.set_yscale("log")
            decimal_log_labels(ax)
            ax.set_title(arch_title(arch, measured))
            ax.set_xlabel("iteration")
            ax.legend(loc="best", framealpha=0.9)
        axes[0].set_ylabel("gradient norm: first layer / last layer")
        fig.suptitle("How much gradient reaches the first layer, relative to the last (1 = equal, dotted)")
        return save_png(fig, path)


def decimal_log_labels(ax) -> None:
    """Label a log y axis 0.2, 0.5, 1, 2, 5 ...: ratios near 1 read better so than as 2x10^-1."""
    def label(value, position, minor=False):
        if value <= 0:
            return ""
        leading = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        return f"{value:g}" if not minor or leading in (2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, position: label(value, position, minor=True)))


def cell_edges(centres: list[int]) -> np.ndarray:
    """Cell boundaries around evaluation iterations, so uneven intervals draw true to scale."""
    centres = np.asarray(centres, dtype=float)
    if len(centres) == 1:
        return np.array([0.0, 2 * centres[0]]) if centres[0] > 0 else np.array([-0.5, 0.5])
    middles = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[max(0.0, 2 * centres[0] - middles[0])], middles, [2 * centres[-1] - middles[-1]]])


# --- drawing and writing helpers ----------------------------------------------------------------

def arch_columns(measured: list[dict]) -> list[str]:
    """Plain first, then residual, then anything else: one figure column each."""
    present = {e["arch"] for e in measured}
    return [a for a in ARCHS if a in present] + sorted(present - set(ARCHS))


def name_without_arch(entry: dict) -> str:
    return entry["run"].removeprefix(f"{entry['arch']}-")


def arch_title(arch: str, measured: list[dict]) -> str:
    return panel_title(arch, {e["family"] for e in measured if e["arch"] == arch})


def net_name(entry: dict) -> str:
    """'ResNet-20', 'plain MLP-10': as the sweep's figures name the net."""
    return f"{net_prefix(entry['arch'], entry['family'])}-{entry['depth']}"


def run_title(entry: dict) -> str:
    return f"{net_name(entry)} ({entry['run']})"


def line_styles(entries: list[dict], measured: list[dict]):
    """(entry, plot style) per run: one colour per depth across the whole figure, and a
    dash pattern for each further run of that depth in the panel (seeds, variants)."""
    depths = sorted({e["depth"] for e in measured})
    seen: dict[int, int] = {}
    for entry in sorted(entries, key=lambda e: (e["depth"], e["run"])):
        nth = seen.get(entry["depth"], 0)
        seen[entry["depth"]] = nth + 1
        yield entry, {"color": DEPTH_PALETTE[depths.index(entry["depth"]) % len(DEPTH_PALETTE)],
                      "linestyle": LINE_STYLES[nth % len(LINE_STYLES)], "linewidth": 1.8,
                      "label": line_label(entry, entries)}


def line_label(entry: dict, entries: list[dict]) -> str:
    """'ResNet-20', plus what else the run folder's name says (swept keys such as
    'block_preact'), and the seed when the panel holds several seeds of this net."""
    label = net_name(entry)
    parts = name_without_arch(entry).removeprefix(f"{entry['depth']}-").split("-")
    seeds = {e["seed"] for e in entries if e["arch"] == entry["arch"] and e["depth"] == entry["depth"]}
    if len(seeds) <= 1 and parts[0] == f"s{entry['seed']}":
        parts = parts[1:]
    return f"{label} ({', '.join(parts)})" if parts else label


def measured_on(net: TrainedNet) -> dict:
    return {"images": len(net.images), "eval_set": net.eval_set, "iteration": net.iteration}


def responses_caveat(measured: list[dict]) -> str | None:
    """For nets trained less than the paper's schedule: what Figure 7's comparison holds for."""
    full = int(paper_schedule()["iterations"])
    trained = [e["iteration"] for e in measured]
    if all(isinstance(i, int) and i >= full for i in trained):
        return None
    most = max((i for i in trained if isinstance(i, int)), default=0)
    return (f"these nets trained at most {most:,} of the paper's {full:,} iterations: Figure 7's finding "
            "(ResNet responses smaller than plain ones) is for fully trained nets; early in training "
            "ResNet responses can be larger than plain ones")


def eval_set_name(measured: list[dict]) -> str:
    return "validation" if {e["eval_set"] for e in measured} == {"val"} else "test"


def image_count_text(measured: list[dict]) -> str:
    counts = sorted({e["images"] for e in measured})
    return f"{' / '.join(f'{c:,}' for c in counts)} {eval_set_name(measured)} images"


def run_row_of(entry: dict) -> dict:
    return {key: entry[key] for key in ("run", "arch", "depth", "seed")}


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def save_png(fig: Figure, path: Path) -> str:
    fit_titles(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return str(path)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """For what holds for every analysis of a command (the sample measured on): said once."""
    if message not in _SAID:
        _SAID.add(message)
        _say(message)


# --- the command --------------------------------------------------------------------------------

def parse_analyze_args(args: list[str]) -> tuple[list[str], Path, int | None]:
    """``[ANALYSIS] DIR [max_images=N|all]`` -> (analyses to run, folder, max images; None for all)."""
    given = parse_folder_args("analyze", USAGE.splitlines()[0], args, options={"max_images": "N|all"},
                              max_words=1)
    analysis = given.words[0] if given.words else "all"
    if analysis not in (*ANALYSES, "all"):
        raise UsageError(f"unknown analysis {analysis!r}; choose one of {', '.join(ANALYSES)}, all")
    analyses = list(ANALYSES) if analysis == "all" else [analysis]
    return analyses, given.folder, max_images_option(given.options.get("max_images"))


def max_images_option(value: str | None) -> int | None:
    """``max_images`` as typed -> how many test images to measure on; None: all of them."""
    if value is None:
        return DEFAULT_MAX_IMAGES
    if value == "all":
        return None
    # isdecimal, not isdigit: int() reads every decimal digit, but not a superscript '²'
    if not value.isdecimal() or int(value) < 1:
        raise UsageError(f"max_images must be a positive whole number or all; got {value!r}")
    return int(value)


def analyze_command(args: list[str]) -> int:
    """``resexp analyze``: run the chosen analyses on a sweep or run folder; print what it wrote."""
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE, end="")
        return 0
    analyses, folder, max_images = parse_analyze_args(args)
    if reason := unusable_folder_reason(folder):  # before minutes of measuring
        raise UsageError(f"cannot write the analyses into {folder}: {reason}; copy it somewhere writable "
                         "(cp -r) and analyse the copy")
    if analyses != ["gradients"]:
        trained_runs(folder)  # fail early, with one line, when there is nothing to analyse
    for analysis in analyses:
        try:
            if analysis == "gradients":
                result = analyze_gradients(folder)
            elif analysis == "responses":
                result = analyze_responses(folder, max_images)
            elif analysis == "lesion":
                result = analyze_lesion(folder, max_images)
            else:
                result = analyze_identity(folder, max_images)
        except NotApplicable as error:
            if len(analyses) == 1:
                raise
            _say(f"{analysis}: skipped: {error}")  # `all` runs what applies to these runs
            continue
        except OSError as error:  # a read-only folder (even to root, on a read-only mount) or a full disk
            raise UsageError(f"cannot write the {analysis} files: {write_error_reason(error, folder)}") from error
        print(f"{analysis}: wrote {', '.join(result['files'])}")
    return 0
