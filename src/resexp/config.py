"""Composing, checking and naming configs.

Hydra composes the config from ``conf/``; this module checks every value a
user can set before anything trains (one readable line per problem) and makes
the run-folder names from config values, so that the same run gets the same
folder however its overrides were typed.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from numbers import Integral, Real
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import UsageError
from .data import DATASET_NAMES, data_root_problem
from .files import folder_name_problem, unusable_folder_reason, unwritable_reason
from .models import ARCHS, BLOCKS, FAMILIES, MLP_MIN_DEPTH, SHORTCUTS, is_cifar_depth
from .trackers import LOGGERS, missing_package_problems

CONFIG_MODULE = "resexp.conf"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SEED_LIMIT = 2**32  # numpy's and most tools' seed range; torch takes no seed of 2**64 or more
MAX_MLP_WIDTH = 16_384  # a 16k x 16k dense layer is 268 M weights: wider nets do not fit in memory
MAX_SYNTHETIC_IMAGES = 1_000_000  # 3 GB of generated images
BENCH_MEASURES = ("throughput", "memory")  # what resexp bench measures: images/s, or bytes
# Keys that may differ when a run resumes: where results go and how they are shown,
# not what is trained.
RESUMABLE_DIFFERENCES = ("out", "name", "resume", "progress", "device", "compile", "cuda_graph", "sweep",
                         "launcher", "logger", "data.root", "data.download")


# --- run names ---------------------------------------------------------------------------------

def run_name(cfg: DictConfig) -> str:
    """``<arch>-<depth>-s<seed>``, plus the other swept keys' values (or, for a single run,
    the schedule and data set when they are not the paper's)."""
    parts = [f"{cfg.arch}-{cfg.depth}-s{cfg.seed}"]
    swept = [key for key in OmegaConf.select(cfg, "sweep.keys", default=[]) or []]
    if swept:
        parts += [_name_part(cfg, key) for key in sorted(swept) if key not in ("arch", "depth", "seed")]
    else:
        if cfg.schedule.name != "paper":
            parts.append(str(cfg.schedule.name))
        if cfg.data.name != "cifar10":
            parts.append(str(cfg.data.name))
        for key, value in cfg.model.items():
            if model_defaults().get(key) != value and not (key == "shortcut" and cfg.arch == "plain"):
                parts.append(f"{key}_{value}")
    return _safe("-".join(parts))


def _name_part(cfg: DictConfig, key: str) -> str:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, DictConfig) and "name" in value:  # a config group such as schedule=quick
        return str(value.name)
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return f"{key.rsplit('.', 1)[-1]}_{value}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", name).strip("_") or "run"


def _resolve_run_name(*, _root_: DictConfig) -> str:
    return run_name(_root_)


OmegaConf.register_new_resolver("resexp_run_name", _resolve_run_name, replace=True)


# --- composing ---------------------------------------------------------------------------------

def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The job config for these overrides, as ``resexp train`` would see it (``config_name="bench"``:
    as ``resexp bench`` sees it, conf/bench.yaml).

    Hydra's composition errors become one-line UsageErrors.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        if "hydra/launcher/submitit" in str(error) and not _has_submitit_launcher():
            raise UsageError("launcher=slurm and launcher=submitit_local need Hydra's submitit launcher: "
                             "pip install 'resexp[slurm]'") from error
        raise UsageError(hydra_error_line(error, config_name)) from error
    return cfg


def _has_submitit_launcher() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


# Hydra's words for a key that is not in the config; its advice (append with +KEY) is the wrong fix for a typo.
UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'\.\s*To append to your config use \+")


def hydra_error_line(error: BaseException, config_name: str = "config") -> str:
    """Hydra's multi-line composition errors, cut down to one line a user can act on."""
    unknown = UNKNOWN_KEY.search(str(error))
    if unknown:
        return unknown_key_line(unknown.group(1), config_name)
    text = str(error).split("Config search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    if any(line.startswith("Available options") for line in lines):
        at = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        head = lines[:at]
        options = lines[at + 1 :]
        group = lines[at].rstrip(":").replace("Available options in", "options for")
        return f"{' '.join(head).removeprefix(chr(39))}; {group}: {', '.join(options)}"
    return " ".join(lines) or type(error).__name__


# The names other trainers give their options, and resexp's key for each (or what to do instead).
EPOCHS_HINT = ("use schedule.iterations=N: resexp counts iterations, not epochs (one epoch is the training set "
               "over schedule.batch_size: 50,000/128, about 390 iterations, on CIFAR-10)")
NO_WORKERS = "resexp has no such key: it keeps the images in memory and needs no data-loader workers"
OTHER_TRAINERS = {
    "epochs": EPOCHS_HINT, "num_epochs": EPOCHS_HINT, "max_epochs": EPOCHS_HINT, "n_epochs": EPOCHS_HINT,
    "lr": "schedule.lr", "learning_rate": "schedule.lr", "batch_size": "schedule.batch_size",
    "bs": "schedule.batch_size", "momentum": "schedule.momentum", "weight_decay": "schedule.weight_decay",
    "wd": "schedule.weight_decay", "iterations": "schedule.iterations", "iters": "schedule.iterations",
    "max_iter": "schedule.iterations", "max_iters": "schedule.iterations", "steps": "schedule.iterations",
    "max_steps": "schedule.iterations", "milestones": "schedule.milestones", "gamma": "schedule.gamma",
    "dataset": "data", "data_dir": "data.root", "data_root": "data.root", "root": "data.root",
    "output_dir": "out", "out_dir": "out", "outdir": "out", "model": "arch", "layers": "depth",
    "num_workers": NO_WORKERS, "workers": NO_WORKERS,
}


def key_hint(key: str, config_name: str = "config") -> str:
    """What to type instead of an unknown key: resexp's name for another trainer's option, or the
    closest real key (matched on the whole dotted path, then on its last part)."""
    known = known_keys(config_name)
    last = key.rsplit(".", 1)[-1].lower()
    by_last: dict[str, str] = {}
    for name in sorted(known, key=lambda name: name.count(".")):  # depth before a nested ...depth
        by_last.setdefault(name.rsplit(".", 1)[-1], name)
    if last in by_last:  # a key of ours under another path (resexp bench's steps: bench.steps)
        return f"did you mean {by_last[last]}?"
    if last in OTHER_TRAINERS:
        target = OTHER_TRAINERS[last]
        return target if " " in target else f"did you mean {target}?"
    close = [by_last[match] for match in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)] \
        or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    command = "train" if config_name == "config" else config_name  # conf/bench.yaml is resexp bench's
    return f"did you mean {close[0]}?" if close else f"resexp {command} --help lists the main ones"


def unknown_key_line(key: str, config_name: str = "config") -> str:
    group, _, option = key.partition(".")
    if group == "logger" and key in known_keys(config_name):  # a logger's key, that logger not selected
        name = option.split(".")[0]
        return f"{key} is a key of logger={name}, which is not selected; add logger={name} (or logger=[...] with it)"
    return unknown_keys_line([key], config_name)


def unknown_keys_line(keys: list[str], config_name: str = "config") -> str:
    """One line for every unknown key, each with its hint."""
    named = "; ".join(f"{key!r}: {key_hint(key, config_name)}" for key in keys)
    return f"unknown key{'s' if len(keys) > 1 else ''} {named} (--cfg job prints every key)"


def is_known_key(key: str, config_name: str = "config") -> bool:
    """A key that a ``KEY=VALUE`` option may set (Hydra's own ``hydra.*`` settings included)."""
    return key in known_keys(config_name) or key == "hydra" or key.startswith("hydra.")


def config_folder() -> Path:
    """conf/ as installed (the package resexp.conf)."""
    from importlib.resources import files

    return Path(str(files(CONFIG_MODULE)))


def _config_file(relative: str) -> dict:
    """One file of conf/ as it is written (no composition, no interpolation)."""
    return _parsed((config_folder() / relative).read_text())


def _parsed(text: str) -> dict:
    return OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}


def _leaves(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        if key in ("defaults", "hydra", "sweep"):  # Hydra's lists and settings; what resexp sweep fills in
            continue
        keys += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


@functools.lru_cache(maxsize=1)
def required_keys() -> tuple[str, ...]:
    """The keys every job config has (``~seed`` on the command line deletes one): those of
    config.yaml, and of the schedule and data set that every other one extends."""
    return tuple(_leaves(_config_file("config.yaml")) + _leaves(_config_file("schedule/paper.yaml"), "schedule.")
                 + _leaves(_config_file("data/cifar10.yaml"), "data."))


@functools.lru_cache(maxsize=1)
def model_defaults() -> dict:
    """The paper's net: the ``model.*`` options as config.yaml sets them."""
    return _config_file("config.yaml")["model"]


@functools.lru_cache(maxsize=1)
def data_defaults() -> dict:
    """``data.*`` as a run gets it with no data options (conf/data/cifar10.yaml, config.yaml's default)."""
    return _config_file("data/cifar10.yaml")


@functools.lru_cache(maxsize=1)
def paper_schedule() -> dict:
    """The paper's recipe: ``schedule.*`` as conf/schedule/paper.yaml sets it."""
    return _config_file("schedule/paper.yaml")


@functools.lru_cache(maxsize=2)
def known_keys(config_name: str = "config") -> tuple[str, ...]:
    """Every key a user can set, as dotted paths, read from the config files themselves
    (composing would need Hydra, which may be mid-run when a sweep reports an error).
    ``config_name="bench"`` adds the keys of conf/bench.yaml."""
    root = config_folder()
    keys = {"data", "schedule", "launcher", "logger", "experiment"}  # the config groups

    def add(node, prefix: str) -> None:
        for key, value in node.items():
            if key in ("defaults", "hydra"):
                continue
            keys.add(prefix + key)
            if isinstance(value, dict):
                add(value, f"{prefix}{key}.")

    primary = sorted({root / "config.yaml", root / f"{config_name}.yaml"})
    for path in [*primary, *sorted(root.glob("*/*.yaml"))]:
        if path.parent.name in ("hydra", "experiment"):  # Hydra's own settings; presets set no new keys
            continue
        text = path.read_text()
        global_package = path.parent == root or "@package _global_" in text  # a header comment: read the text
        add(_parsed(text), "" if global_package else f"{path.parent.name}.")
    return tuple(sorted(keys))


# --- checking values ---------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def problems(cfg: DictConfig) -> list[str]:
    """Every invalid value in a job config, one line each (empty when all is well)."""
    found: list[str] = []
    absent = object()
    removed = [key for key in required_keys()
               if OmegaConf.select(cfg, key, default=absent, throw_on_resolution_failure=False) is absent]
    if len(removed) > 1 and "name" in removed:
        removed.remove("name")  # the default name is made from the other keys: it fails with them
    if removed:  # the checks below read these keys
        return [f"{key} must be set (it cannot be removed with ~{key}); leave it out to get its default"
                for key in removed]

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            found.append(f"{key} must be {allowed}; got {OmegaConf.select(cfg, key)!r}")

    def one_of(key: str, allowed: tuple) -> None:
        need(OmegaConf.select(cfg, key) in allowed, key, "one of " + ", ".join(allowed))

    def positive_int(key: str) -> None:
        value = OmegaConf.select(cfg, key)
        need(_is_int(value) and value > 0, key, "a positive integer")

    def optional_positive_int(key: str) -> None:
        value = OmegaConf.select(cfg, key)
        need(value is None or (_is_int(value) and value > 0), key, "a positive integer or null")

    def number(key: str, low: float, high: float, allowed: str) -> None:
        value = OmegaConf.select(cfg, key)
        need(_is_number(value) and math.isfinite(value) and low <= value <= high, key, allowed)

    one_of("arch", ARCHS)
    one_of("model.family", FAMILIES)
    # Fully connected nets take any depth from 2; the conv nets need 6n+2.
    if OmegaConf.select(cfg, "model.family") == "mlp":
        if not (_is_int(cfg.depth) and cfg.depth >= MLP_MIN_DEPTH):
            found.append(f"depth must be an integer >= {MLP_MIN_DEPTH} for model.family=mlp; got {cfg.depth}")
    elif not is_cifar_depth(cfg.depth):
        found.append(f"depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); got {cfg.depth}")
    one_of("model.shortcut", SHORTCUTS)
    one_of("model.block", BLOCKS)
    number("model.residual_scale", -float("inf"), float("inf"), "a finite number")
    width = cfg.model.width
    need(_is_int(width) and 0 < width <= MAX_MLP_WIDTH, "model.width", f"a positive integer up to {MAX_MLP_WIDTH}")
    need(_is_int(cfg.seed) and 0 <= cfg.seed < SEED_LIMIT, "seed", f"an integer from 0 to {SEED_LIMIT - 1}")
    need(isinstance(cfg.progress, bool), "progress", "true or false")
    name, out = cfg.name, cfg.out
    need(isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name, "name",
         "a folder name: one path component, not empty, . or .. (the run goes into out/name)")
    need(isinstance(out, str) and out.strip() != "", "out", "the folder that results go into (not empty)")
    if isinstance(out, str) and out.strip():
        reason = unusable_folder_reason(out)
        if reason:
            found.append(f"out={out} cannot hold results: {reason}; give a folder for the results")
    if isinstance(name, str) and (reason := folder_name_problem(name)):
        found.append(f"name {name!r} {reason}; give another name=")
    elif isinstance(name, str) and isinstance(out, str) and name not in ("", ".", "..") and "/" not in name:
        target = Path(out) / name
        if target.exists() and not target.is_dir():
            found.append(f"name={name}: {target} is a file, not a folder; give another name= or move the file")
    one_of("device", DEVICES)
    one_of("precision", PRECISIONS)
    need(isinstance(cfg.resume, bool), "resume", "true or false")
    need(cfg.compile in ("auto", True, False), "compile", "auto, true or false")
    cuda_graph = OmegaConf.select(cfg, "cuda_graph", default="auto")
    need(cuda_graph in ("auto", True, False), "cuda_graph", "auto, true or false")
    if cuda_graph is True and cfg.device == "cpu":
        found.append("cuda_graph=true needs a CUDA GPU, but device=cpu; use cuda_graph=auto or cuda_graph=false")
    if cuda_graph is True and cfg.precision == "fp16":
        found.append("cuda_graph=true cannot capture precision=fp16 (GradScaler checks for overflow on the CPU); "
                     "use precision=bf16, or cuda_graph=auto to train fp16 without a graph")

    for key in ("iterations", "batch_size", "eval_every", "checkpoint_every", "eval_batch_size"):
        positive_int(f"schedule.{key}")
    number("schedule.lr", 1e-12, float("inf"), "a positive number")
    number("schedule.gamma", 1e-12, float("inf"), "a positive number")
    number("schedule.momentum", 0.0, 0.999999, "a number in [0, 1)")
    number("schedule.weight_decay", 0.0, float("inf"), "a non-negative number")
    milestones = cfg.schedule.milestones
    iterations = cfg.schedule.iterations
    need(
        isinstance(milestones, ListConfig)
        and all(_is_int(m) and m > 0 for m in milestones)
        and all(a < b for a, b in zip(milestones, list(milestones)[1:]))
        and (not _is_int(iterations) or all(_is_int(m) and m < iterations for m in milestones)),
        "schedule.milestones",
        f"a list of strictly increasing iteration numbers below schedule.iterations ({iterations}), "
        "e.g. [32000,48000], or [] for no drop",
    )
    number("schedule.warmup.lr", 1e-12, float("inf"), "a positive number")
    number("schedule.warmup.until_train_error", 1e-12, 1.0, "a fraction in (0, 1]")
    min_depth = cfg.schedule.warmup.min_depth
    need(min_depth is None or (_is_int(min_depth) and min_depth >= 0), "schedule.warmup.min_depth",
         "a non-negative integer, or null for no warm-up")
    positive_int("schedule.warmup.check_every")

    one_of("data.name", DATASET_NAMES)
    for key in ("train_size", "test_size", "val_size"):
        optional_positive_int(f"data.{key}")
    if cfg.data.name in ("cifar10", "imagefolder") and cfg.data.root is None:
        found.append(f"data.root must be the folder that holds (or will hold) the images for data={cfg.data.name} "
                     "(imagefolder: train/<class>/* and test/<class>/*, e.g. data.root=data/cifar10-jpeg); got None")
    elif cfg.data.name in ("cifar10", "imagefolder") and isinstance(cfg.data.root, str) and \
            (reason := data_root_problem(cfg.data.name, cfg.data.root)):
        found.append(f"data.root={cfg.data.root} cannot be the data for data={cfg.data.name}: {reason}")
    if cfg.data.name == "synthetic":  # generated: the sizes are what is made, not a subset of what exists
        # null means "all the images", and generated data has no all (a validation split replaces the test set).
        if cfg.data.train_size is None or (cfg.data.test_size is None and cfg.data.val_size is None):
            found.append("data=synthetic generates data.train_size training and data.test_size test images: "
                         "give both as numbers, not null")
        sizes = [cfg.data.train_size, cfg.data.test_size]
        if all(_is_int(size) for size in sizes) and sum(sizes) > MAX_SYNTHETIC_IMAGES:
            found.append(f"data.train_size={sizes[0]} and data.test_size={sizes[1]} with data=synthetic make "
                         f"{sum(sizes)} images; make at most {MAX_SYNTHETIC_IMAGES} (3 GB)")
    padding = cfg.data.augment.padding
    need(_is_int(padding) and 0 <= padding <= 16, "data.augment.padding", "an integer from 0 to 16")
    need(isinstance(cfg.data.augment.flip, bool), "data.augment.flip", "true or false")
    need(isinstance(cfg.data.resize, bool), "data.resize", "true or false")

    # Several runs at once on this machine: resexp sweep gpus=... runs_per_gpu=... (slots.slot_overrides).
    gpus = OmegaConf.select(cfg, "sweep.gpus", default=None)
    runs_per_gpu = OmegaConf.select(cfg, "sweep.runs_per_gpu", default=1)
    if isinstance(gpus, ListConfig):
        typed = ",".join(map(str, gpus))  # as on the command line
        repeated = sorted({gpu for gpu in gpus if list(gpus).count(gpu) > 1}, key=str)
        if not gpus or not all(_is_int(gpu) and gpu >= 0 for gpu in gpus):
            found.append(f"gpus must be GPU numbers as CUDA_VISIBLE_DEVICES takes them (e.g. gpus=0,1,2,3), "
                         f"or all; got {typed!r}")
        elif repeated:
            found.append(f"gpus={typed} names GPU {repeated[0]} more than once; name each GPU once, "
                         f"and runs_per_gpu=N runs N jobs on each")
    elif gpus not in (None, "all"):
        found.append(f"gpus must be GPU numbers as CUDA_VISIBLE_DEVICES takes them (e.g. gpus=0,1,2,3), "
                     f"or all; got {gpus!r}")
    if not (_is_int(runs_per_gpu) and runs_per_gpu > 0):
        found.append(f"runs_per_gpu must be a positive integer (how many runs share each GPU at once); "
                     f"got {runs_per_gpu!r}")
    elif gpus is None and runs_per_gpu != 1:
        found.append(f"runs_per_gpu={runs_per_gpu} needs gpus=... (the GPUs to share), "
                     f"e.g. gpus=0 runs_per_gpu={runs_per_gpu}")
    launcher = OmegaConf.select(cfg, "launcher.name", default="local")
    if gpus is not None and launcher != "local":
        typed = gpus if gpus == "all" else ",".join(map(str, gpus))
        found.append(f"gpus={typed} runs several jobs at once on this machine, but "
                     f"launcher={launcher} starts each job itself (one GPU per job); drop gpus or use launcher=local")

    # Loggers (conf/logger/): their packages come with the tracking extra, which is optional.
    loggers = OmegaConf.select(cfg, "logger", default=None)
    if loggers is not None and (not isinstance(loggers, DictConfig) or any(name not in LOGGERS for name in loggers)):
        found.append(f"logger must be one of {', '.join(LOGGERS)}, or a list of them (logger=[tensorboard,mlflow]); "
                     f"got {OmegaConf.to_container(loggers) if isinstance(loggers, DictConfig) else loggers!r}")
    else:
        found += missing_package_problems(cfg)
        for key in ("logger.tensorboard.log_dir", "logger.mlflow.tracking_uri"):
            value = OmegaConf.select(cfg, key, default=None)
            need(value is None or (isinstance(value, str) and value.strip() != ""), key,
                 "null (the default place) or a folder or URI")
        log_dir = OmegaConf.select(cfg, "logger.tensorboard.log_dir", default=None)
        if isinstance(log_dir, str) and log_dir.strip() and (reason := unusable_folder_reason(log_dir)):
            found.append(f"logger.tensorboard.log_dir={log_dir} cannot hold event files: {reason}; "
                         "give a folder for them")
    return found


def bench_problems(cfg: DictConfig) -> list[str]:
    """Every invalid value among the keys only resexp bench has (``bench.*``, conf/bench.yaml)."""
    absent = object()
    values = {key: OmegaConf.select(cfg, f"bench.{key}", default=absent)
              for key in _config_file("bench.yaml")["bench"]}
    removed = [key for key, value in values.items() if value is absent]
    if removed:  # the checks below read these keys
        return [f"bench.{key} must be set (it cannot be removed with ~bench.{key}); leave it out to get its default"
                for key in removed]
    found: list[str] = []

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            found.append(f"bench.{key} must be {allowed}; got {values[key]!r}")

    for key in ("steps", "warmup", "windows"):  # warm-up: the first step compiles or starts workers, untimed
        need(_is_int(values[key]) and values[key] > 0, key, "a positive integer")
    workers, threads, path = values["workers"], values["threads"], values["json"]
    need(workers is None or (_is_int(workers) and workers >= 0), "workers", "a non-negative integer, or null")
    need(threads is None or (_is_int(threads) and threads > 0), "threads", "a positive integer, or null")
    need(isinstance(values["reference"], bool), "reference", "true or false")
    need(values["measure"] in BENCH_MEASURES, "measure", "one of " + ", ".join(BENCH_MEASURES))
    need(path is None or (isinstance(path, str) and path.strip() != ""), "json",
         "the path of the record to write, or null for one under outputs/bench/")
    if isinstance(path, str) and path.strip() and (reason := unwritable_reason(path)):
        found.append(f"bench.json={path} cannot be written: {reason}; "
                     "give a file path in a folder that exists or can be made")
    return found


def check(cfg: DictConfig, config_name: str = "config") -> None:
    """Raise one UsageError naming every invalid value (``config_name="bench"``: of resexp bench's config)."""
    found = problems(cfg) + (bench_problems(cfg) if config_name == "bench" else [])
    if found:
        raise UsageError("; ".join(found))


def config_differences(saved: dict, current: dict) -> list[str]:
    """What changed between a run's saved config and the config it is resumed with."""
    differences = []

    def walk(a, b, prefix: str) -> None:
        if prefix.rstrip(".") in RESUMABLE_DIFFERENCES:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix.rstrip('.')}: {a!r} -> {b!r}")

    walk(saved, current, "")
    return differences
