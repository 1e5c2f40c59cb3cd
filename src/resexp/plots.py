"""Figures and tables for a sweep of runs, in the style of He et al. 2015, section 4.2.

Input is a sweep folder holding one folder per run (or a single run folder).
A run folder contains any of ``files.RUN_FILES`` (``config.yaml``,
``result.json``, ``metrics.jsonl``, ``checkpoint.pt``); whichever are missing,
the run is still shown as far as its files allow (a run may be running, interrupted, failed, or copied half-way).

Outputs (``render_all``):

- ``curves.png``/``.pdf``: training (thin dashed) and test (solid) error against
  iterations, one panel per architecture, like the paper's Figure 6; colour = depth,
  learning-rate drops as dotted grey lines (both said in the legend);
- ``error_vs_depth.png``/``.pdf``: error against number of layers, at the end
  of training and just before the first learning-rate drop, both panels on one
  y range; colour = architecture (said in the legend);
- ``summary.md``/``.csv``: one row per configuration, with the paper's Table 6
  numbers for the paper's nets trained as the paper trained them (``paper_comparison_gap``).

Every figure and table says how much of the paper's schedule its runs trained
(``schedule_scale``: iterations, and epochs = iterations x batch / training-set size).

Every ``*_data`` function returns exactly what the matching figure draws, with
errors in percent, so tests can check numbers instead of pixels.

Runs are grouped as follows. A configuration is an arch, a depth and the values
of the keys the sweep varied (``sweep.keys``); for runs that no single sweep made,
also of the trained-section keys that differ (see ``TRAINED_SECTIONS``). Seeds of
one configuration are averaged. A run
that diverged is shown as diverged and left out of every mean. When some seeds
of a configuration are done and others are not, the means use the done ones
(numbers "at the end of training" should come from finished training); when
none is done, they use the latest evaluation of each run, and the status
column says so.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from resexp.errors import UsageError
from resexp.files import CONFIG, METRICS, RESULT, RUN_FILES, atomic_write, atomic_write_text, read_jsonl, read_result
from resexp.status import format_duration
from resexp.trackers import log_figures

# He et al. 2015, Table 6 (CIFAR-10 test error %, option-A shortcuts). For
# ResNet-110 the paper gives the best of 5 runs, 6.43 (mean 6.61 +- 0.16).
PAPER_RESNET_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}

ARCH_ORDER = ("plain", "resnet")
# Names by (model.family, arch): the paper's conv nets are "plain-20" and "ResNet-20";
# fully connected nets must never pass for them.
PANEL_TITLES = {("cifar", "plain"): "plain networks", ("cifar", "resnet"): "residual networks (ResNet)",
                ("mlp", "plain"): "plain MLPs (fully connected)", ("mlp", "resnet"): "residual MLPs (fully connected)"}
LINE_PREFIXES = {("cifar", "plain"): "plain", ("cifar", "resnet"): "ResNet",
                 ("mlp", "plain"): "plain MLP", ("mlp", "resnet"): "residual MLP"}
# Said on every figure that shows both errors: readers expect training error below test error.
TRAIN_ERROR_NOTE = ("training error is measured on the augmented training batches while the net learns, "
                    "so it can sit above the test error")

# One colour per depth, in depth order, the same in every panel.
DEPTH_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]
# One colour per line of the error-vs-depth figure (plain first, then ResNet).
# What colour means differs between the two figures: each legend's title says it.
CURVES_LEGEND_TITLE = "colour = depth"
DEPTH_LEGEND_TITLE = "colour = architecture"
# Learning-rate drops: dotted grey, unlike any error curve (training dashed, test solid).
MILESTONE_STYLE = dict(color="0.6", linestyle=":", linewidth=1.2, zorder=0)
MILESTONE_LABEL = "learning-rate drop (dotted grey)"
SERIES_PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
# Lines of the same depth that differ in another config value get markers.
VARIANT_MARKERS = [None, "o", "s", "^", "D", "v"]

DPI = 150
FIGURE_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.titlesize": 12,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "pdf.fonttype": 42,  # embed TrueType so the text stays editable and searchable
}

# Runs are grouped by the config keys their sweep varied (``sweep.keys`` in each run's
# config.yaml). Runs that no single sweep made (loose ``resexp train`` runs, or runs of
# several sweeps copied into one folder) are also told apart by any of these keys that
# differs between them: the sections of resexp's config that say what was trained. The
# rest of the config says where and how a run ran (out, name, device, resume, ...).
TRAINED_SECTIONS = ("model.", "schedule.", "data.")
UNTRAINED_KEYS = {"data.root", "data.download", "schedule.checkpoint_every"}  # where files are, how often saved
IDENTITY_KEYS = ("arch", "depth", "seed")  # a group is one arch and depth; seeds are averaged


@dataclass
class RunRecord:
    """Everything one run folder holds, read tolerantly."""

    path: Path
    name: str
    arch: str
    depth: int
    seed: int | None
    status: str
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    result: dict | None = None


def family_of(config: dict) -> str:
    """``model.family`` of a run's config: "cifar" (the paper's conv nets) or "mlp"."""
    return str((config.get("model") or {}).get("family") or "cifar")


def net_prefix(arch: str, family: str = "cifar") -> str:
    """'ResNet', 'plain', 'residual MLP', ...: what a net is called in labels and tables."""
    return LINE_PREFIXES.get((family, arch), f"{arch} {family}" if family != "cifar" else arch)


def panel_title(arch: str, families: Iterable[str] = ("cifar",)) -> str:
    """The title of a panel of one arch; nets of several families get a neutral one."""
    families = set(families) or {"cifar"}
    if len(families) == 1:
        family = families.pop()
        return PANEL_TITLES.get((family, arch), f"{net_prefix(arch, family)} networks")
    return f"{net_prefix(arch)} networks ({', '.join(sorted(families))})"


# ---------------------------------------------------------------------------
# Fitting text into a figure


def fit_titles(fig: Figure, passes: int = 3) -> None:
    """Wrap the figure's title, each panel's title and each panel's notes onto more lines
    until each is no wider than its figure or panel; constrained layout then makes room.

    Measured on the rendered figure, so it holds at any number of panels and any font.
    """
    canvas = FigureCanvasAgg(fig)
    for _ in range(passes):
        canvas.draw()
        renderer = canvas.get_renderer()
        targets = [(fig._suptitle, fig.bbox.width * 0.98)] if fig._suptitle is not None else []
        for ax in fig.axes:
            width = ax.get_window_extent(renderer).width
            targets += [(ax.title, max(width, fig.bbox.width / max(1, len(fig.axes))) * 1.05)]
            targets += [(text, width * 0.98) for text in ax.texts if text.get_transform() == ax.transAxes]
        changed = False
        for text, available in targets:
            if not text.get_text() or text.get_window_extent(renderer).width <= available:
                continue
            text.set_text(_wrapped(text.get_text(), available / text.get_window_extent(renderer).width))
            changed = True
        if not changed:
            return


def _wrapped(text: str, fraction: float) -> str:
    """``text`` with its longest line cut to about ``fraction`` of its length, at spaces
    (never inside "a = b": no-break spaces hold it together, and draw as spaces)."""
    lines = text.replace(" = ", "\u00a0=\u00a0").split("\n")
    width = max(8, int(max(len(line) for line in lines) * fraction * 0.95))
    return "\n".join(textwrap.fill(line, width, break_long_words=False) or line for line in lines)


# ---------------------------------------------------------------------------
# Loading


def load_runs(folder: str | os.PathLike) -> list[RunRecord]:
    """Read every run under ``folder`` (a sweep folder or one run folder).

    Sorted by (arch, depth, seed, name). Raises UsageError when the folder does
    not exist or holds no run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"no such folder: {folder}")
    # Hidden folders (.hydra holds a config.yaml of its own) are never runs.
    run_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_run_dir(p))
    has_run_output = any((folder / name).is_file() for name in (RESULT, METRICS))
    if has_run_output or (not run_dirs and _is_run_dir(folder)):
        run_dirs = [folder]
    if not run_dirs:
        raise UsageError(
            f"no runs in {folder} (expected folders containing config.yaml, metrics.jsonl or result.json)"
        )
    runs = [run for run in map(_load_run, run_dirs) if run is not None]
    if not runs:
        raise UsageError(f"no readable runs in {folder} (each was left out, as said above)")
    return sorted(runs, key=lambda r: (r.arch, r.depth, -1 if r.seed is None else r.seed, r.name))


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def _load_run(path: Path) -> RunRecord | None:
    """The run in ``path``; None, with one warning line, when its arch, depth or seed is not what
    a run's can be (a hand-edited config.yaml): the other runs are drawn."""
    config = _read_config(path / CONFIG)
    result = None
    if (path / RESULT).is_file():
        # One damaged file must not stop the figures of a whole sweep: warn and draw the rest.
        try:
            result = read_result(path / RESULT)
        except (ValueError, OSError) as e:
            print(f"warning: {path / RESULT} is unreadable ({e}); its run is shown from its metrics",
                  file=sys.stderr)
            result = None
    try:
        metrics = read_jsonl(path / METRICS)
    except (ValueError, OSError) as e:
        print(f"warning: {path / METRICS} is unreadable ({e}); its curves are left out", file=sys.stderr)
        metrics = []
    metrics = _clean_metrics(metrics)

    def pick(key):
        if config.get(key) is not None:
            return config[key]
        if result and result.get(key) is not None:
            return result[key]
        return None

    arch = str(pick("arch") or "unknown")
    depth, seed = pick("depth") or 0, pick("seed")
    for key, value in (("depth", depth), ("seed", seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            print(f"warning: {path / CONFIG}: {key} is {value!r}, not a whole number; this run is left out",
                  file=sys.stderr)
            return None
    if result and result.get("status"):
        status = str(result["status"])
    elif metrics:
        status = "running"  # no result.json yet: running, or stopped without a word
    else:
        status = "pending"
    if not config and result:
        # Without config.yaml the shortcut type is the only variant we can know.
        config = {"arch": arch, "depth": depth, "seed": seed}
        if result.get("shortcut") is not None:
            config["model"] = {"shortcut": result["shortcut"]}
    return RunRecord(path=path, name=path.name, arch=arch, depth=depth, seed=seed,
                     status=status, config=config, metrics=metrics, result=result)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{path}: unreadable ({reason})") from None
    try:
        config = OmegaConf.to_container(loaded, resolve=True)
    except Exception:  # interpolations that only resolve inside the trainer
        config = OmegaConf.to_container(loaded, resolve=False)
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping at the top level")
    return config


def _clean_metrics(rows: list[dict]) -> list[dict]:
    """Sort by iteration; when a resumed run logged an iteration twice, keep the latest."""
    by_iteration: dict[int, dict] = {}
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("iteration"), int) and not isinstance(row["iteration"], bool):
            by_iteration[row["iteration"]] = row
    return [by_iteration[i] for i in sorted(by_iteration)]


def _number(value: Any) -> float:
    """A metric value as float; null or garbage becomes NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ---------------------------------------------------------------------------
# Grouping runs into configurations


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        elif isinstance(value, list):
            flat[dotted] = tuple(_hashable(v) for v in value)
        else:
            flat[dotted] = _hashable(value)
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


@dataclass
class _Group:
    """The seeds of one configuration: same arch, depth and variant."""

    arch: str
    depth: int
    variant: tuple  # ((dotted key, value), ...) for config values that set this group apart
    label_variant: tuple  # the part of the variant worth printing (non-default values)
    variant_index: int  # 0 for the most common variant of the arch
    runs: list[RunRecord]

    @property
    def family(self) -> str:
        return family_of(self.runs[0].config)


def _variant_keys(runs: list[RunRecord]) -> dict[str, list[str]]:
    """Per arch, the config keys that set its runs apart: those their sweep recorded as varying,
    and any trained-section key (see TRAINED_SECTIONS) whose value differs between runs of one depth.

    A key that changes only with depth (e.g. blocks per stage) is derived from the depth and
    not a variant; one that changes among runs of one depth (e.g. the shortcut type) is.
    """
    flats = {id(r): _flatten(r.config) for r in runs}
    keys_by_arch: dict[str, set[str]] = {}
    cells: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        found = keys_by_arch.setdefault(run.arch, set())
        for key in (run.config.get("sweep") or {}).get("keys") or []:
            # A swept config group (schedule=quick,paper) is told by the name of its choice.
            found.add(f"{key}.name" if isinstance(run.config.get(key), dict) else str(key))
        cells.setdefault((run.arch, run.depth), []).append(run)
    for (arch, _depth), cell in cells.items():
        for key in set().union(*(flats[id(r)] for r in cell)):
            if key.startswith(TRAINED_SECTIONS) and key not in UNTRAINED_KEYS and \
                    len({repr(flats[id(r)].get(key)) for r in cell}) > 1:
                keys_by_arch[arch].add(key)
    return {arch: sorted(keys - set(IDENTITY_KEYS)) for arch, keys in keys_by_arch.items()}


def _group_runs(runs: list[RunRecord]) -> list[_Group]:
    variant_keys = _variant_keys(runs)
    flats = {id(r): _flatten(r.config) for r in runs}
    by_key: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        keys = variant_keys.get(run.arch, [])
        variant = tuple((k, flats[id(run)].get(k)) for k in keys)
        by_key.setdefault((run.arch, run.depth, variant), []).append(run)

    # The most common value of each variant key is the default and goes unlabelled.
    defaults: dict[tuple, Any] = {}
    for arch, keys in variant_keys.items():
        arch_runs = [r for r in runs if r.arch == arch]
        for key in keys:
            counts = Counter(repr(flats[id(r)].get(key)) for r in arch_runs)
            defaults[(arch, key)] = counts.most_common(1)[0][0]

    groups = []
    for (arch, depth, variant), members in by_key.items():
        label_variant = tuple((k, v) for k, v in variant if repr(v) != defaults[(arch, k)])
        groups.append(_Group(arch, depth, variant, label_variant, 0, members))
    # Number the variants of each arch so that lines of one depth can be told apart.
    for arch in {g.arch for g in groups}:
        labelled = sorted({g.label_variant for g in groups if g.arch == arch}, key=repr)
        labelled = [()] + [v for v in labelled if v != ()]
        for g in groups:
            if g.arch == arch:
                g.variant_index = labelled.index(g.label_variant)
    return sorted(groups, key=lambda g: (_arch_rank(g.arch), g.depth, g.variant_index, repr(g.variant)))


def _arch_rank(arch: str) -> tuple:
    return (ARCH_ORDER.index(arch), "") if arch in ARCH_ORDER else (len(ARCH_ORDER), arch)


def _variant_text(label_variant: tuple) -> str:
    """'shortcut B', 'schedule=paper': short enough for a legend."""
    # A changed schedule/data name implies its other values; print the name only.
    named_sections = {k.rsplit(".", 1)[0] for k, _ in label_variant if k.endswith(".name") and "." in k}
    parts = []
    for key, value in label_variant:
        section, _, last = key.rpartition(".")
        if (section in named_sections and last != "name") or key == "model.family":  # the name says the family
            continue
        if last == "name" and section:
            parts.append(f"{section.rsplit('.', 1)[-1]} {value}")
        elif last == "shortcut":
            parts.append(f"shortcut {value}")
        else:
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            parts.append(f"{last}={value}")
    return ", ".join(parts)


def _line_label(group: _Group) -> str:
    label = f"{net_prefix(group.arch, group.family)}-{group.depth}"
    variant = _variant_text(group.label_variant)
    return f"{label} ({variant})" if variant else label


def _series_label(arch: str, family: str, label_variant: tuple) -> str:
    prefix = net_prefix(arch, family)
    variant = _variant_text(label_variant)
    return f"{prefix} ({variant})" if variant else prefix


def _counted_runs(group: _Group) -> list[RunRecord]:
    """The seeds whose numbers enter the means (see the module docstring)."""
    healthy = [r for r in group.runs if r.status != "diverged"]
    done = [r for r in healthy if r.status == "done"]
    if done:
        return done
    return [r for r in healthy if any(math.isfinite(v) for v in _final_errors(r))]


def _latest(run: RunRecord, result_key: str, metrics_key: str) -> float:
    """A number from result.json for a finished run, else from the latest evaluation.

    result.json of an unfinished run was written when it started (or resumed),
    so its numbers lag behind metrics.jsonl.
    """
    from_result = _number((run.result or {}).get(result_key))
    from_metrics = _number(run.metrics[-1].get(metrics_key)) if run.metrics else math.nan
    first, second = (from_result, from_metrics) if run.status == "done" else (from_metrics, from_result)
    return first if math.isfinite(first) else second


def _final_errors(run: RunRecord) -> tuple[float, float]:
    """(train, test) error fraction at the end of training, or at the latest evaluation."""
    return (_latest(run, "final_train_error", "train_error"),
            _latest(run, "final_test_error", "test_error"))


def _best_test_error(run: RunRecord) -> float:
    values = [_number(m.get("test_error")) for m in run.metrics]
    values = [v for v in values if math.isfinite(v)]
    if values:
        return min(values)
    return _number((run.result or {}).get("best_test_error"))


def _iterations_done(run: RunRecord) -> int | None:
    done = _latest(run, "iterations_done", "iteration")
    if not math.isfinite(done) and run.status == "done":
        done = _number((run.result or {}).get("iterations"))
    return int(done) if math.isfinite(done) else None


def _iterations_planned(run: RunRecord) -> int | None:
    planned = (run.config.get("schedule") or {}).get("iterations")
    if planned is None:
        planned = (run.result or {}).get("iterations")
    return int(planned) if planned is not None else None


def _milestones(run: RunRecord) -> list[int]:
    schedule = run.config.get("schedule") or {}
    milestones = schedule.get("milestones") or []
    try:
        return sorted(int(m) for m in milestones)
    except (TypeError, ValueError):
        return []


def _eval_set_name(runs: Iterable[RunRecord]) -> str:
    """'test' or 'validation': which set the 'test_error' numbers come from."""
    sets = {m.get("eval_set", "test") for r in runs for m in r.metrics}
    if sets == {"val"}:
        return "validation"
    if "val" in sets:
        return "test/validation"
    return "test"


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1; 0 for a single value) and count of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    mean = float(np.mean(finite))
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return mean, std, len(finite)



# ---------------------------------------------------------------------------
# How much of the paper's schedule the runs trained, and when Table 6 applies


def _training_images(run: RunRecord) -> int | None:
    """How many images a run trained on, from its config (None when the config does not say)."""
    from resexp.data import CIFAR10_TRAIN_IMAGES

    data = run.config.get("data") or {}
    size = data.get("train_size")
    if size is None and data.get("name") == "cifar10":
        size = CIFAR10_TRAIN_IMAGES
    if not isinstance(size, int):
        return None
    return size - int(data.get("val_size") or 0)


def _epochs(run: RunRecord, iterations: int) -> float | None:
    """``iterations`` of this run in epochs: iterations x batch / training-set size (from the
    logged epochs when the config does not give the set's size, e.g. an image folder)."""
    batch = (run.config.get("schedule") or {}).get("batch_size")
    images = _training_images(run)
    if isinstance(batch, int) and images:
        return iterations * batch / images
    for row in reversed(run.metrics):
        epoch = _number(row.get("epoch"))
        if row["iteration"] > 0 and math.isfinite(epoch) and epoch > 0:
            return iterations * epoch / row["iteration"]
    return None


def _format_epochs(epochs: float) -> str:
    if epochs >= 10:
        return f"{epochs:,.0f} epochs"
    return f"{epochs:.2g} epochs" if epochs < 0.1 else f"{epochs:.1f} epochs"


def schedule_scale(runs: list[RunRecord]) -> str:
    """How much of the paper's schedule the runs trained: '1,000 of the paper's 64,000 iterations
    (0.6 epochs)'; several schedules are joined with ' / '; '' when no run says."""
    from resexp.config import paper_schedule

    paper_iterations = int(paper_schedule()["iterations"])
    texts = []
    for run in runs:
        planned = _iterations_planned(run)
        if planned is None:
            continue
        text = f"{planned:,} of the paper's {paper_iterations:,} iterations"
        epochs = _epochs(run, planned)
        if epochs is not None:
            text += f" ({_format_epochs(epochs)})"
        if text not in texts:
            texts.append(text)
    return " / ".join(texts)


def paper_comparison_gap(runs: list[RunRecord]) -> str | None:
    """Why the paper's Table 6 does not apply to these runs' numbers, or None when it does: Table 6
    is for nets trained on all of CIFAR-10's training set for the paper's whole schedule."""
    from resexp.config import paper_schedule

    for run in runs:  # the first run that differs from the paper's training, with every way it does
        data = run.config.get("data") or {}
        schedule = run.config.get("schedule") or {}
        if not schedule:
            return f"{run.name} has no config.yaml, so its schedule is unknown"
        reasons = []
        if data.get("name") != "cifar10":
            reasons.append(f"trained on {_dataset_name(str(data.get('name')))}, not the paper's CIFAR-10")
        if data.get("train_size") is not None or data.get("val_size") is not None:
            from resexp.data import CIFAR10_TRAIN_IMAGES

            images = _training_images(run)
            reasons.append(f"trained on {images:,} of the training images, the paper on all {CIFAR10_TRAIN_IMAGES:,}"
                           if images else "trained on part of CIFAR-10's training set, the paper on all of it")
        changed = [key for key, value in paper_schedule().items()
                   if not isinstance(value, dict) and key not in ("name", "eval_every", "checkpoint_every",
                                                                  "eval_batch_size")
                   and _hashable(schedule.get(key)) != _hashable(value)]
        if "iterations" in changed and _iterations_planned(run) is not None:
            reasons.append(f"trained {schedule_scale([run])}, not the whole schedule")
        elif changed:
            reasons.append("changed the paper's schedule (" + ", ".join(f"schedule.{k}" for k in changed) + ")")
        if reasons:
            return "the runs " + ", and ".join(reasons)
    return None


# ---------------------------------------------------------------------------
# Error curves (Figure 6)


def curves_data(runs: list[RunRecord], ymax: float | None = None) -> dict:
    """What ``plot_curves`` draws, errors in percent.

    Returns ``{"title", "eval_set", "ymax", "x_unit", "panels": [{"arch",
    "title", "milestones", "lines": [...]}]}``; each line has "arch", "depth",
    "variant" (config values that set it apart), "label", "colour", "marker",
    "runs", "seeds", "n_seeds", "status", "diverged", "iterations",
    "train_error", "test_error". Several seeds are averaged on the iterations
    they all reached. ``ymax=None`` picks the y range automatically.
    """
    groups = _group_runs(runs)
    depths = sorted({g.depth for g in groups})
    colours = {d: DEPTH_PALETTE[i % len(DEPTH_PALETTE)] for i, d in enumerate(depths)}

    panels = []
    for arch in sorted({g.arch for g in groups}, key=_arch_rank):
        arch_groups = [g for g in groups if g.arch == arch]
        lines = [_curve_line(g, colours[g.depth]) for g in arch_groups]
        lines = [line for line in lines if line is not None]
        milestones = sorted({m for g in arch_groups for r in g.runs for m in _milestones(r)})
        panels.append({
            "arch": arch,
            "title": panel_title(arch, {g.family for g in arch_groups}),
            "milestones": milestones,
            "lines": lines,
        })

    all_lines = [line for p in panels for line in p["lines"]]
    max_iteration = max((line["iterations"][-1] for line in all_lines if line["iterations"]), default=0)
    # The x-axis spans the whole schedule, so a partial sweep shows how far it has come.
    planned = max((_iterations_planned(r) or 0 for r in runs), default=0)
    x_max = max(max_iteration, planned)
    eval_set = _eval_set_name(runs)
    return {
        "title": _figure_title(runs, eval_set),
        "eval_set": eval_set,
        "ymax": float(ymax) if ymax is not None else auto_ymax(all_lines),
        "x_unit": _x_unit(x_max),
        "x_max": x_max,
        "panels": panels,
    }


def _curve_line(group: _Group, colour: str) -> dict | None:
    averaged = _counted_runs(group)
    diverged = False
    if not averaged:  # every seed diverged: draw them up to where they stopped
        averaged = [r for r in group.runs if r.metrics]
        diverged = any(r.status == "diverged" for r in averaged)
    averaged = [r for r in averaged if r.metrics]
    if not averaged:
        return None

    common = set(m["iteration"] for m in averaged[0].metrics)
    for run in averaged[1:]:
        common &= {m["iteration"] for m in run.metrics}
    iterations = sorted(common)

    def seed_mean(metric: str) -> list[float]:
        if not iterations:
            return []
        per_run = []
        for run in averaged:
            values = {m["iteration"]: _number(m.get(metric)) for m in run.metrics}
            per_run.append([values[i] for i in iterations])
        # A NaN in any seed stays NaN: a mean over a broken curve is not a number.
        return [float(v) * 100.0 for v in np.mean(np.array(per_run, dtype=float), axis=0)]

    statuses = sorted({r.status for r in averaged})
    label = _line_label(group)
    flagged = [s for s in statuses if s in ("diverged", "failed", "interrupted")]
    if flagged:
        label += f" ({', '.join(flagged)})"
    return {
        "arch": group.arch,
        "depth": group.depth,
        "variant": dict(group.variant),
        "label": label,
        "colour": colour,
        "marker": VARIANT_MARKERS[group.variant_index % len(VARIANT_MARKERS)],
        "runs": [r.name for r in averaged],
        "seeds": [r.seed for r in averaged],
        "n_seeds": len(averaged),
        "status": ", ".join(statuses),
        "diverged": diverged,
        "iterations": iterations,
        "train_error": seed_mean("train_error"),
        "test_error": seed_mean("test_error"),
    }


def auto_ymax(lines: list[dict], paper_ymax: float = 20.0) -> float:
    """The paper's 0-20 % range when the final errors fit (under 15 %), else room for them.

    Otherwise 1.5 x the largest final error rounded up to a multiple of 10,
    at most 100.
    """
    finals = []
    for line in lines:
        if line.get("diverged"):
            continue  # where a run blew up says nothing about the range the others need
        for metric in ("train_error", "test_error"):
            finite = [v for v in line[metric] if math.isfinite(v)]
            if finite:
                finals.append(finite[-1])
    if not finals or max(finals) <= 0.75 * paper_ymax:
        return paper_ymax
    return float(min(100, max(paper_ymax, math.ceil(max(finals) * 1.5 / 10.0) * 10)))


def _x_unit(max_iteration: int) -> int:
    """Iterations per x-axis unit: 1e4 as in the paper, smaller for short runs."""
    if max_iteration >= 20_000:
        return 10_000
    if max_iteration >= 2_000:
        return 1_000
    return 1


def _short_count(n: int) -> str:
    """32000 -> '32k', 1500 -> '1.5k', 8 -> '8'."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def _dataset_name(name: str) -> str:
    if name == "cifar10":
        return "CIFAR-10"
    if name == "imagefolder":  # the offline copy of CIFAR-10 as image files
        return "CIFAR-10 (imagefolder)"
    if name == "synthetic":
        return "synthetic data"
    return f"data set {name}"


def _figure_title(runs: list[RunRecord], eval_set: str) -> str:
    key = f"dashed = training error, solid = {eval_set} error; {TRAIN_ERROR_NOTE}"
    head = _runs_heading(runs)
    return f"{head}\n{key}" if head else key


def _runs_heading(runs: list[RunRecord]) -> str:
    """What the runs trained on and for how long, for a figure's title: 'CIFAR-10, 5,000 training
    images, 1,250 of the paper's 64,000 iterations (16 epochs), lr drops at 900, 1.1k'."""
    datasets = sorted({str((r.config.get("data") or {}).get("name")) for r in runs
                       if (r.config.get("data") or {}).get("name")})
    presets = sorted({str(p) for r in runs if (p := (r.config.get("sweep") or {}).get("experiment"))})
    parts = [f"experiment={p}" for p in presets]
    if datasets:
        parts.append(" / ".join(_dataset_name(d) for d in datasets))
    subsets = {_training_images(r) if (r.config.get("data") or {}).get("train_size") is not None else None
               for r in runs}
    if len(subsets) == 1 and isinstance(size := subsets.pop(), int):  # a part of the training set, said with its size
        parts.append(f"{size:,} training images")
    scale = schedule_scale(runs)
    if scale:
        milestones = {tuple(_milestones(r)) for r in runs}
        if len(milestones) == 1 and (m := milestones.pop()):
            scale += ", lr drops at " + ", ".join(_short_count(x) for x in m)
        parts.append(scale)
    return ", ".join(parts)


def plot_curves(runs: list[RunRecord], path: str | os.PathLike, ymax: float | None = None) -> dict:
    """Draw the error curves; write ``path`` as PNG and a PDF beside it.

    ``ymax`` is the top of the y range in percent; None picks it automatically
    (20 like the paper when the errors fit). Returns ``curves_data`` plus
    "files".
    """
    data = curves_data(runs, ymax=ymax)
    panels = data["panels"] or [{"arch": "", "title": "", "milestones": [], "lines": []}]
    x_unit = data["x_unit"]
    with matplotlib.rc_context(FIGURE_STYLE):
        fig = Figure(figsize=(6.0 * len(panels) + 0.5, 5.2), layout="constrained")
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            _draw_curve_panel(ax, panel, data["ymax"], x_unit, data["x_max"])
        axes[0].set_ylabel("error (%)")
        fig.suptitle(data["title"])
        files = _save(fig, path)
    data["files"] = files
    return data


def _draw_curve_panel(ax, panel: dict, ymax: float, x_unit: int, x_max: int) -> None:
    drops = [ax.axvline(milestone / x_unit, **MILESTONE_STYLE, label=MILESTONE_LABEL)
             for milestone in panel["milestones"]]
    handles = []
    for line in panel["lines"]:
        x = np.asarray(line["iterations"], dtype=float) / x_unit
        train = np.asarray(line["train_error"], dtype=float)
        test = np.asarray(line["test_error"], dtype=float)
        marker_every = max(1, len(x) // 8)
        style = dict(color=line["colour"], marker=line["marker"], markevery=marker_every, markersize=5)
        ax.plot(x, train, linestyle="--", linewidth=0.9, alpha=0.9, **style)
        (handle,) = ax.plot(x, test, linestyle="-", linewidth=2.0, label=line["label"], **style)
        handles.append(handle)
        if line["diverged"]:
            finite = np.flatnonzero(np.isfinite(test))
            if finite.size:
                last = finite[-1]
                # Keep the mark visible when the run blew up above the y range.
                ax.plot([x[last]], [min(test[last], ymax * 0.98)], marker="x", color=line["colour"],
                        markersize=10, markeredgewidth=2.5, linestyle="none", clip_on=False, zorder=5)
    ax.set_ylim(0, ymax)
    if x_max:
        ax.set_xlim(0, x_max / x_unit)
    else:
        ax.set_xlim(left=0)
    ax.set_xlabel("iter. (1e4)" if x_unit == 10_000 else ("iter. (1e3)" if x_unit == 1_000 else "iter."))
    ax.set_title(panel["title"])
    if handles:
        ax.legend(handles=handles + drops[:1], loc="best", framealpha=0.9, title=CURVES_LEGEND_TITLE)
    else:
        ax.text(0.5, 0.5, "no evaluations yet", transform=ax.transAxes, ha="center", va="center", color="0.4")


# ---------------------------------------------------------------------------
# Error against depth


def depth_data(runs: list[RunRecord], at_iteration: int | None = None) -> dict:
    """Training and test error (percent) against depth, per arch.

    ``at_iteration=None``: at the end of training (the final numbers of the
    summary). Otherwise: each run's last evaluation with iteration <=
    ``at_iteration``, for runs that got that far.

    Returns ``{"at_iteration", "iterations_used", "series": [{"arch", "label",
    "variant", "depths", "train_mean", "train_std", "test_mean", "test_std",
    "n", "unfinished", "left_out"}]}``; std is the sample std (ddof=1), 0 for one seed;
    "unfinished" (one per depth, end of training only) is the latest iteration of a
    point whose runs have not finished, else None; "left_out" lists depths with no
    usable run (e.g. every seed diverged).
    """
    groups = _group_runs(runs)
    series: dict[tuple, dict] = {}
    iterations_used: set[int] = set()
    for group in groups:
        entry = series.setdefault((group.arch, group.label_variant), {
            "arch": group.arch,
            "label": _series_label(group.arch, group.family, group.label_variant),
            "variant": dict(group.label_variant),
            "depths": [], "train_mean": [], "train_std": [], "test_mean": [], "test_std": [],
            "n": [], "unfinished": [], "left_out": [],
        })
        trains, tests = [], []
        unfinished = None
        if at_iteration is None:
            for run in _counted_runs(group):
                train, test = _final_errors(run)
                trains.append(train)
                tests.append(test)
                if run.status != "done" and run.metrics:  # its latest evaluation stands in for the end
                    unfinished = max(unfinished or 0, int(run.metrics[-1]["iteration"]))
        else:
            for run in group.runs:
                if run.status == "diverged":
                    continue
                row = _evaluation_at(run, at_iteration)
                if row is not None:
                    trains.append(_number(row.get("train_error")))
                    tests.append(_number(row.get("test_error")))
                    iterations_used.add(int(row["iteration"]))
        train_mean, train_std, n_train = _mean_std(trains)
        test_mean, test_std, n_test = _mean_std(tests)
        if n_train == 0 and n_test == 0:
            reason = "diverged" if any(r.status == "diverged" for r in group.runs) else "no data"
            entry["left_out"].append({"depth": group.depth, "reason": reason})
            continue
        entry["depths"].append(group.depth)
        entry["train_mean"].append(train_mean * 100.0)
        entry["train_std"].append(train_std * 100.0)
        entry["test_mean"].append(test_mean * 100.0)
        entry["test_std"].append(test_std * 100.0)
        entry["n"].append(max(n_train, n_test))
        entry["unfinished"].append(unfinished)
    return {
        "at_iteration": at_iteration,
        "iterations_used": sorted(iterations_used),
        "series": list(series.values()),
        # For a panel with nothing to draw yet: the sweep's depths and what its runs did.
        "depths_planned": sorted({r.depth for r in runs if r.depth}),
        "statuses": dict(sorted(Counter(r.status for r in runs).items())),
    }


def _evaluation_at(run: RunRecord, at_iteration: int) -> dict | None:
    """The last evaluation at or before ``at_iteration``, if the run got that far."""
    before = [m for m in run.metrics if m["iteration"] <= at_iteration]
    if not before:
        return None
    reached = run.status == "done" or run.metrics[-1]["iteration"] >= at_iteration
    return before[-1] if reached else None


def default_depth_iteration(runs: list[RunRecord]) -> int | None:
    """The first learning-rate milestone (most common one across runs), or None."""
    firsts = Counter(_milestones(r)[0] for r in runs if _milestones(r))
    return firsts.most_common(1)[0][0] if firsts else None


def error_vs_depth_data(runs: list[RunRecord], at_iteration: int | None = None) -> dict:
    """What ``plot_error_vs_depth`` draws: ``{"title", "eval_set", "end", "at"}``.

    "end" and "at" are ``depth_data`` results with a panel "title" added; "at"
    is at ``at_iteration``, by default the first learning-rate milestone, and
    None when there is no milestone or no run got that far.
    """
    if at_iteration is None:
        at_iteration = default_depth_iteration(runs)
        before_drop = at_iteration is not None
    else:
        before_drop = at_iteration in {(_milestones(r) or [None])[0] for r in runs}
    end = depth_data(runs)
    end["title"] = _end_title(runs)
    at = depth_data(runs, at_iteration) if at_iteration is not None else None
    if at is not None and not any(s["depths"] for s in at["series"]):
        at = None
    if at is not None:
        at["title"] = _at_title(at, before_drop)
    eval_set = _eval_set_name(runs)
    head = _runs_heading(runs)
    return {
        "title": f"Error vs. depth{': ' + head if head else ''}\n"
                 f"dashed = training error, solid = {eval_set} error; {TRAIN_ERROR_NOTE}",
        "eval_set": eval_set,
        "end": end,
        "at": at,
    }


def plot_error_vs_depth(runs: list[RunRecord], path: str | os.PathLike,
                        at_iteration: int | None = None) -> dict:
    """Error against depth: (a) end of training, (b) at ``at_iteration``.

    ``at_iteration=None`` means just before the first learning-rate drop.
    Panel (b) is left out when there is no milestone or no evaluation before
    it. Returns ``error_vs_depth_data`` plus "files".
    """
    data = error_vs_depth_data(runs, at_iteration)
    panels = [p for p in (data["end"], data["at"]) if p is not None]
    with matplotlib.rc_context(FIGURE_STYLE):
        fig = Figure(figsize=(5.6 * len(panels) + 0.6, 4.8), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        top = _depth_ylim_top(panels)
        for ax, panel in zip(axes, panels):
            _draw_depth_panel(ax, panel, data["eval_set"], top)
        fig.suptitle(data["title"])
        data["files"] = _save(fig, path)
    return data


def _end_title(runs: list[RunRecord]) -> str:
    planned = {_iterations_planned(r) for r in runs} - {None}
    if len(planned) == 1:
        return f"(a) end of training ({_short_count(planned.pop())} iter.)"
    return "(a) end of training"


def _at_title(data: dict, before_drop: bool) -> str:
    used = data["iterations_used"]
    where = f"iteration {_short_count(used[0])}" if len(used) == 1 else \
        f"last evaluation <= {_short_count(data['at_iteration'])}"
    return f"(b) {where}" + (", before the first lr drop" if before_drop else "")


def _depth_ylim_top(panels: list[dict]) -> float:
    """One top of the y range for every panel of error_vs_depth: room above the highest point (and
    its error bar) for the legend; 100 % when nothing is drawn (or every error is 0)."""
    highest = max((m + sd for data in panels for s in data["series"] for key in ("train", "test")
                   for m, sd in zip(s[f"{key}_mean"], s[f"{key}_std"]) if math.isfinite(m + sd)), default=0.0)
    if highest <= 0:
        return 100.0
    return highest * 1.15 if highest * 1.15 <= 100 else max(100.0, highest + 2)


def _draw_depth_panel(ax, data: dict, eval_set: str, top: float) -> None:
    all_depths = sorted({d for s in data["series"] for d in s["depths"]})
    for index, series in enumerate(data["series"]):
        if not series["depths"]:
            continue
        colour = SERIES_PALETTE[index % len(SERIES_PALETTE)]
        several_seeds = any(n > 1 for n in series["n"])
        for metric, style, name in (("train", "--", "training"), ("test", "-", eval_set)):
            ax.errorbar(
                series["depths"], series[f"{metric}_mean"],
                yerr=series[f"{metric}_std"] if several_seeds else None,
                color=colour, linestyle=style, linewidth=2.0 if metric == "test" else 1.2,
                marker="o", markersize=6,
                markerfacecolor=colour if metric == "test" else "white",
                capsize=4, label=f"{series['label']}: {name}",
            )
    if all_depths and all_depths[-1] / all_depths[0] > 8:
        ax.set_xscale("log")  # e.g. 20 ... 1202 layers
    if all_depths:
        ax.set_xticks(all_depths)
        ax.set_xticklabels([str(d) for d in all_depths])
        ax.minorticks_off()
        ax.set_ylim(0, top)
        ax.legend(loc="best", framealpha=0.9, title=DEPTH_LEGEND_TITLE)
    else:
        # Nothing to draw: keep the axes of the sweep (its depths, 0-100 %) and say what its runs did.
        depths = data["depths_planned"]
        if depths:
            ax.set_xlim(depths[0] - 2, depths[-1] + 2)
            ax.set_xticks(depths)
        ax.set_ylim(0, top)
        runs_text = ", ".join(f"{count} {status}" for status, count in data["statuses"].items())
        ax.text(0.5, 0.5, f"no evaluations yet ({runs_text})", transform=ax.transAxes, ha="center",
                va="center", color="0.4")
    # An unfinished run's latest evaluation is not its end of training: say so at its point.
    for series in data["series"]:
        for depth, test_mean, iteration in zip(series["depths"], series["test_mean"], series.get("unfinished", [])):
            if iteration is not None:
                ax.annotate(f"unfinished\n(iter. {_short_count(iteration)})", (depth, test_mean),
                            textcoords="offset points", xytext=(6, 6), fontsize=8, color="0.3")
    left_out = [f"{s['label']}-{x['depth']} ({x['reason']})" for s in data["series"] for x in s["left_out"]]
    if left_out and all_depths:  # with nothing drawn, the panel's own note says why
        ax.text(0.01, 0.01, "not shown: " + ", ".join(left_out), transform=ax.transAxes,
                ha="left", va="bottom", fontsize=8, color="0.3")
    ax.set_xlabel("number of layers")
    ax.set_ylabel("error (%)")
    ax.set_title(data["title"])


# ---------------------------------------------------------------------------
# Summary table

SUMMARY_COLUMNS = [
    "arch", "family", "depth", "variant", "parameters", "n_seeds", "seeds",
    "final_train_error_pct", "final_train_error_pct_std",
    "final_test_error_pct", "final_test_error_pct_std",
    "best_test_error_pct", "paper_test_error_pct",
    "iterations_done_min", "iterations_done_max", "iterations_planned", "epochs_planned",
    "wall_time_s", "images_per_s", "status",
]


def summary_rows(runs: list[RunRecord]) -> list[dict]:
    """One row per configuration, keys as in SUMMARY_COLUMNS.

    Errors in percent: mean over the counted seeds, sample std (ddof=1, None
    for a single seed), best = lowest test error any seed reached. Missing
    numbers are None.
    """
    rows = []
    for group in _group_runs(runs):
        counted = _counted_runs(group)
        finals = [_final_errors(r) for r in counted]
        train_mean, train_std, n_train = _mean_std([t for t, _ in finals])
        test_mean, test_std, n_test = _mean_std([t for _, t in finals])
        n = max(n_train, n_test)
        best = [_best_test_error(r) for r in counted]
        best = [b for b in best if math.isfinite(b)]
        done = [i for i in (_iterations_done(r) for r in group.runs) if i is not None]
        planned = {_iterations_planned(r) for r in group.runs} - {None}
        rows.append({
            "arch": group.arch,
            "family": group.family,
            "depth": group.depth,
            "variant": _variant_text(group.label_variant),
            "parameters": _first_value(group.runs, "parameters"),
            "n_seeds": n,
            "seeds": ";".join(str(r.seed) for r in counted if r.seed is not None),
            "final_train_error_pct": _pct(train_mean),
            "final_train_error_pct_std": _pct(train_std) if n_train > 1 else None,
            "final_test_error_pct": _pct(test_mean),
            "final_test_error_pct_std": _pct(test_std) if n_test > 1 else None,
            "best_test_error_pct": _pct(min(best)) if best else None,
            "paper_test_error_pct": _paper_value(group),
            "iterations_done_min": min(done) if done else None,
            "iterations_done_max": max(done) if done else None,
            "iterations_planned": max(planned) if planned else None,
            "epochs_planned": _round_or_none(_epochs(group.runs[0], max(planned)) if planned else None),
            "wall_time_s": _mean_of(_wall_time(r) for r in counted),
            "images_per_s": _mean_of(_images_per_s(r) for r in counted),
            "status": _status_text(group, counted),
        })
    return rows


def _round_or_none(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _pct(fraction: float) -> float | None:
    return round(fraction * 100.0, 6) if math.isfinite(fraction) else None


def _first_value(runs: list[RunRecord], key: str):
    for run in runs:
        value = (run.result or {}).get(key)
        if value is not None:
            return value
    return None


def _mean_of(values: Iterable[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.mean(finite)), 2) if finite else None


def _wall_time(run: RunRecord) -> float:
    return _latest(run, "wall_time_s", "time_s")


def _images_per_s(run: RunRecord) -> float:
    return _latest(run, "images_per_s", "images_per_s")


def _paper_value(group: _Group) -> float | None:
    """Table 6 applies to the paper's nets only: ResNets with every ``model.*`` option at its default
    (conv nets, basic blocks, option-A shortcuts, an unscaled residual branch), trained as the paper
    trained them (``paper_comparison_gap``)."""
    from resexp.config import model_defaults

    model = group.runs[0].config.get("model") or {}
    # model.width sizes MLPs only; family=cifar, checked with the rest, already leaves MLPs out.
    paper_net = group.arch == "resnet" and all(model.get(key, default) == default
                                               for key, default in model_defaults().items() if key != "width")
    if not paper_net or paper_comparison_gap(group.runs):
        return None
    return PAPER_RESNET_TEST_ERROR.get(group.depth)


def _status_text(group: _Group, counted: list[RunRecord]) -> str:
    """'done', or e.g. '2 done, 1 diverged at 1200 (excluded)'."""
    counted_ids = {id(r) for r in counted}
    statuses = Counter(r.status for r in group.runs)
    if len(statuses) == 1 and len(group.runs) == 1:
        return _status_word(group.runs[0])
    if len(statuses) == 1 and all(id(r) in counted_ids for r in group.runs):
        return next(iter(statuses))
    parts = []
    for status in sorted(statuses, key=lambda s: (s != "done", s)):
        members = [r for r in group.runs if r.status == status]
        text = f"{len(members)} {status}"
        if status == "diverged" and len(members) == 1:
            text = f"1 {_status_word(members[0])}"
        if not any(id(r) in counted_ids for r in members):
            text += " (excluded)"
        parts.append(text)
    return ", ".join(parts)


def _status_word(run: RunRecord) -> str:
    at = (run.result or {}).get("diverged_at")
    if run.status == "diverged" and at is not None:
        return f"diverged at {at}"
    return run.status


def write_summary(runs: list[RunRecord], folder: str | os.PathLike) -> list[dict]:
    """Write summary.md and summary.csv into ``folder``; return the rows."""
    folder = Path(folder)
    rows = summary_rows(runs)
    atomic_write_text(folder / "summary.csv", _summary_csv(rows))
    atomic_write_text(folder / "summary.md", _summary_markdown(rows, runs))
    return rows


def _summary_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in SUMMARY_COLUMNS})
    return out.getvalue()


def _summary_markdown(rows: list[dict], runs: list[RunRecord]) -> str:
    eval_set = _eval_set_name(runs)
    show_variant = any(row["variant"] for row in rows)
    show_paper = any(row["paper_test_error_pct"] is not None for row in rows)
    eval_name = "test" if eval_set == "test" else eval_set
    header = ["model"] + (["variant"] if show_variant else []) + [
        "params", "train err. %", f"{eval_name} err. %", "n", f"best {eval_name} err. %",
        *(["paper test err. %"] if show_paper else []), "iterations", "wall time", "images/s", "status",
    ]
    align = ["---"] + (["---"] if show_variant else []) + ["--:"] * (len(header) - 2 - show_variant) + ["---"]
    scale = schedule_scale(runs)
    lines = [f"Schedule: {scale}, each run.", ""] if scale else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        cells = [f"{net_prefix(row['arch'], row['family'])}-{row['depth']}"]
        if show_variant:
            cells.append(row["variant"])
        cells += [
            _format_parameters(row["parameters"]),
            _format_mean_std(row["final_train_error_pct"], row["final_train_error_pct_std"]),
            _format_mean_std(row["final_test_error_pct"], row["final_test_error_pct_std"]),
            str(row["n_seeds"]),
            _format_number(row["best_test_error_pct"]),
            *([_format_number(row["paper_test_error_pct"])] if show_paper else []),
            _format_iterations(row),
            format_duration(row["wall_time_s"]),
            "" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}",
            row["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    footer = [
        "",
        "Errors in percent: mean ± std over the n seeds counted (std is the sample standard "
        "deviation, ddof=1; none for a single seed). Training error is measured on the augmented "
        "training batches since the previous evaluation. Diverged runs are excluded from the means; "
        "when some seeds are done, only the done ones are counted.",
        f"Best = lowest {eval_name} error any counted seed reached.",
    ]
    gap = paper_comparison_gap(runs)
    if show_paper:
        footer[-1] += (" Paper = He et al. 2015, Table 6 (ResNet-110: best of 5 runs, mean 6.61 ± 0.16), shown "
                       "only for the paper's nets (conv ResNets, basic blocks, option-A shortcuts) trained on all "
                       "of CIFAR-10 for the paper's schedule; the paper reports plain nets only in Figure 6.")
        if gap:
            footer.append(f"Rows without a paper value: {gap}.")
    else:
        footer.append(f"No paper column: {gap or 'none of these nets is one of the paper’s Table 6'}, "
                      "so He et al.'s Table 6 errors would not compare.")
    if eval_set != "test":
        footer.append(f"Runs evaluated on a {eval_set} set; the paper's numbers are test error.")
    return "\n".join(lines + footer) + "\n"


def _format_number(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _format_mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _format_parameters(count) -> str:
    if count is None:
        return ""
    count = int(count)
    return f"{count / 1e6:.2f}M" if count >= 100_000 else f"{count / 1e3:.1f}k"


def _format_iterations(row: dict) -> str:
    low, high, planned = row["iterations_done_min"], row["iterations_done_max"], row["iterations_planned"]
    if low is None:
        done = "0"
    elif low == high:
        done = str(low)
    else:
        done = f"{low}–{high}"
    return f"{done} / {planned}" if planned is not None else done


# ---------------------------------------------------------------------------
# Writing files


def _save(fig: Figure, path: str | os.PathLike) -> list[str]:
    """Write the figure as PNG at ``path`` and as PDF beside it, each atomically."""
    png = Path(path).with_suffix(".png")
    pdf = png.with_suffix(".pdf")
    fit_titles(fig)
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=DPI), "wb")
    with _quiet_font_subsetting():
        atomic_write(pdf, lambda f: fig.savefig(f, format="pdf"), "wb")
    return [str(png), str(pdf)]


@contextlib.contextmanager
def _quiet_font_subsetting():
    """PDF font subsetting logs a line per font table at INFO, which a CLI's logging would print."""
    logger = logging.getLogger("fontTools")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def render_all(folder: str | os.PathLike) -> dict:
    """Write curves, error-vs-depth figures and the summary tables into ``folder``."""
    folder = Path(folder)
    runs = load_runs(folder)
    curves = plot_curves(runs, folder / "curves.png")
    depth = plot_error_vs_depth(runs, folder / "error_vs_depth.png")
    summary = write_summary(runs, folder)
    log_figures(runs, curves["files"] + depth["files"])  # to the runs' TensorBoard and MLflow loggers, if any
    files = curves["files"] + depth["files"] + [str(folder / "summary.md"), str(folder / "summary.csv")]
    return {"files": files, "curves": curves, "depth": depth, "summary": summary}
