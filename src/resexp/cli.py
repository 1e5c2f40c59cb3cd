"""The ``resexp`` command: train, sweep, plot, status, analyze, bench.

``train`` and ``sweep`` are Hydra applications (so ``--help``, ``--cfg job`` and every
``key=value`` override work as Hydra users expect); ``plot``, ``status`` and ``analyze``
read folders (``files.parse_folder_args``); ``bench`` composes the same config
(``bench.py``). Before Hydra starts a run, ``train``'s overrides are composed and checked
here; a sweep's jobs are checked by its sweeper (``sweep.plan_jobs``) before any trains. A
mistake is one line on stderr with exit code 2 instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import config as config_module
from .errors import UsageError, exit_with, wants_traceback
from .files import COMMAND_VARIABLE, READ_ONLY_ERRNOS, write_error_reason

USAGE = """\
usage: resexp COMMAND [ARGS]        resexp COMMAND --help: what it does, its options, examples

Reproduce the depth experiment of He et al. 2015 (CIFAR-10, section 4.2):
plain nets get worse with depth, residual nets get better.

commands:
  train [KEY=VALUE ...]     train one net
  sweep [KEY=V1,V2 ...]     train a grid of nets (plain and ResNet by default), then draw the figures
  plot DIR                  redraw the figures and summary of a sweep folder
  status DIR                where each run of a sweep stands: queued, running (ETA), done, failed
  analyze [WHAT] DIR        look inside trained nets: gradients, layer responses, lesions, identity
  bench [KEY=VALUE ...]     measure training throughput (or memory) against a common baseline

examples:
  resexp sweep depth=20,56,110 schedule=quick       plain and ResNet at three depths, 2k iterations each
  resexp train arch=plain depth=56                  one net: outputs/plain-56-s0/

Errors print one line; HYDRA_FULL_ERROR=1 shows tracebacks.
"""

# The main options of the help pages: (as typed, config key or a default in words, meaning).
# A config key's default is read from the composed config, so the help cannot drift from it;
# every other key is in --cfg job.
TRAIN_OPTIONS = (
    ("arch", "arch", "plain | resnet"),
    ("depth", "depth", "weighted layers, 6n+2: 20, 32, 44, 56, 110 (8, 14 for quick tries)"),
    ("seed", "seed", "initialisation, data order and augmentation"),
    ("schedule", "schedule.name", "paper (64k iterations) | quick (2k) | smoke (8, for tests)"),
    ("data", "data.name", "cifar10 (downloaded into data.root) | imagefolder | synthetic (generated)"),
    ("data.root", "data.root", "the images' folder (imagefolder: train/<class>/, test/<class>/)"),
    ("data.train_size", "data.train_size", "train on a stratified subset of this many images (null: all)"),
    ("model.shortcut", "model.shortcut", "A identity (the paper) | B projection where shapes change | C"),
    ("model.block", "model.block", "basic (the paper) | preact (He et al. 2016)"),
    ("model.family", "model.family", "cifar (the paper's conv nets) | mlp (fully connected, any depth >= 2)"),
    ("device", "device", "auto (cuda if there is one) | cpu | cuda"),
    ("precision", "precision", "auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32"),
    ("out", "out", "root folder for results"),
    ("name", "auto", "the run's folder under out: from arch, depth, seed and what differs from the paper"),
    ("resume", "resume", "an unfinished run resumes from its checkpoint; false starts it over"),
    ("progress", "progress", "the progress bar; false for logs"),
)
SWEEP_OPTIONS = (
    ("arch", "plain,resnet", "plain | resnet, or both"),
    ("experiment", "none", "a preset grid, e.g. figure6 (the paper's Figure 6; all are listed below)"),
    ("gpus", "sweep.gpus", "0,1,... | all: train runs side by side, one process per GPU"),
    ("runs_per_gpu", "sweep.runs_per_gpu", "with gpus: how many runs share one GPU"),
    ("launcher", "launcher.name", "local (one run after another here) | slurm | submitit_local"),
    ("name", "auto", "the sweep's folder under out: from the swept values, e.g. depth20-56-110"),
)
HELP_PAGES = {
    "train": ("usage: resexp train [KEY=VALUE ...]",
              "Train one plain or residual net with the paper's recipe (He et al. 2015, section 4.2) into\n"
              "OUT/NAME/: config, metrics, checkpoints, result. The same command again resumes it.",
              TRAIN_OPTIONS,
              ("resexp train arch=plain depth=56                    the paper's schedule: for a GPU",
               "resexp train depth=20 schedule=quick data=imagefolder data.root=data/cifar10-jpeg")),
    "sweep": ("usage: resexp sweep [--yes] [KEY=V1,V2 ...]",
              "Train every combination of the values given (arch=plain,resnet unless set), one run folder\n"
              "each under OUT/NAME/, then draw curves.png, error_vs_depth.png and summary.md there.\n"
              "Every value of the grid is checked before anything trains; the same command again skips\n"
              "finished runs and resumes the others. Any option of resexp train can take several values.\n"
              "Started from a terminal, a CPU sweep estimated at more than 3 hours asks first; --yes does not.",
              SWEEP_OPTIONS[:1] + TRAIN_OPTIONS[1:3] + SWEEP_OPTIONS[1:]
              + tuple(option for option in TRAIN_OPTIONS[3:] if option[0] != "name"),
              ("resexp sweep experiment=laptop                      the paper's three findings on a CPU in 10 minutes",
               "resexp sweep experiment=figure6 gpus=all            the paper's Figure 6, runs side by side")),
}


PLOT_HELP = """\
usage: resexp plot DIR

Redraw the figures and tables of a sweep folder DIR (or of one run's folder) from its run
folders, into DIR: curves.png/.pdf (error against iterations, the paper's Figure 6),
error_vs_depth.png/.pdf and summary.md/.csv. It only reads the runs' files, so it works while
a sweep is still running, or on a folder copied from a cluster. It takes no options.

examples:
  resexp plot outputs/depth20-56-110                  the sweep's figures and summary
  resexp plot outputs/depth20-56-110/resnet-20-s0     one run's curves
"""


def help_page(command: str) -> str:
    """The --help text of train or sweep, with the defaults of the composed config."""
    from omegaconf import OmegaConf

    usage, what, options, examples = HELP_PAGES[command]
    cfg = config_module.compose([])
    rows = []
    for spelling, source, meaning in options:
        default = OmegaConf.select(cfg, source, default=source) if source in config_module.known_keys() else source
        if isinstance(default, bool):
            default = str(default).lower()  # as it is typed: resume=false
        elif default is None:
            default = "all" if source.endswith("_size") else "none"
        rows.append(f"  {spelling + '=':<17} {default:<13} {meaning}")
    # The options of each config group, as installed: GROUP=OPTION picks one.
    folder = config_module.config_folder()
    groups = [f"  {group.name}: {', '.join(sorted(path.stem for path in group.glob('*.yaml')))}"
              for group in sorted(folder.iterdir()) if group.is_dir() and any(group.glob("*.yaml"))
              and group.name != "hydra"]
    return "\n".join([usage, "", what, "", f"{'options:':<20}{'default':<14}meaning", *rows, "",
                      "config groups (GROUP=OPTION):", *groups, "", "examples:",
                      *(f"  {example}" for example in examples), "",
                      "Every config key can be set the same way: --cfg job prints them all, resolved;",
                      "README.md explains each. Errors print one line; HYDRA_FULL_ERROR=1 shows tracebacks."])

# Hydra's own flags: they print something and run nothing, or change where configs come from.
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun"}
OPTIONAL_VALUE_FLAGS = {"--info", "-i"}
HYDRA_FLAGS = INFO_FLAGS | VALUE_FLAGS | {"--resolve", "--run", "-r", "--multirun", "-m"}


def check_arguments(flags: list[str], overrides: list[str], config_name: str = "config") -> None:
    """At the gate, before Hydra parses anything: every flag is one of Hydra's, every other word is
    KEY=VALUE (or ~KEY) with a key of the config (``+KEY`` too). One UsageError line for all."""
    controlled = [arg for arg in (*flags, *overrides) if any(ord(c) < 32 or ord(c) == 127 for c in arg)]
    if controlled:  # Hydra's parser would stop at it with a lexer error
        raise UsageError(f"{controlled[0]!r} holds a control character (a newline, a tab, ...); "
                         "names and values cannot")
    strays = [flag for flag in flags if flag.startswith("-") and flag.split("=")[0] not in HYDRA_FLAGS]
    words = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if strays or words:
        hints = [f"for {flag.lstrip('-').split('=')[0]}, "
                 f"{config_module.key_hint(flag.lstrip('-').split('=')[0], config_name)}" for flag in strays]
        raise UsageError(f"options are KEY=VALUE, not {' '.join(strays + words)}"
                         + "".join(f"; {hint}" for hint in hints))
    keys = [o.partition("=")[0].lstrip("+~") for o in overrides]
    unknown = [key for key in dict.fromkeys(keys) if not config_module.is_known_key(key, config_name)]
    if unknown:
        raise UsageError(config_module.unknown_keys_line(unknown, config_name))


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's flags (with their values) from ``key=value`` overrides."""
    flags, overrides = [], []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("-") and "=" not in arg.split("-", 2)[-1][:1]:
            flags.append(arg)
            takes_value = arg in VALUE_FLAGS and not (arg in OPTIONAL_VALUE_FLAGS and (
                index + 1 >= len(args) or "=" in args[index + 1]))
            if takes_value and index + 1 < len(args):
                flags.append(args[index + 1])
                index += 1
        else:
            overrides.append(arg)
        index += 1
    return flags, overrides


def extra_search_path(flags: list[str]) -> list[str]:
    """``--config-dir DIR`` as an override the compose API understands."""
    for flag, value in zip(flags, flags[1:]):
        if flag in ("--config-dir", "-cd"):
            return [f"hydra.searchpath=[file://{Path(value).resolve()}]"]
    return []


def run_hydra_app(app, args: list[str]) -> None:
    saved = sys.argv
    sys.argv = ["resexp", *args]
    try:
        app()
    finally:
        sys.argv = saved


# --- train --------------------------------------------------------------------------------------

@hydra.main(config_path="pkg://resexp.conf", config_name="config", version_base="1.3")
def train_app(cfg: DictConfig) -> None:
    from .signals import RunInterrupted
    from .train import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = train(cfg, run_dir)
    except UsageError as error:
        remove_if_unused(run_dir)
        exit_with(error)
    except OSError as error:  # a full disk while writing a record (the last checkpoint is intact), say
        remove_if_unused(run_dir)
        advice = "; free some space and run the same command to resume" if error.errno == errno.ENOSPC else ""
        exit_with(UsageError(f"{run_dir.name}: {error.filename or 'a file'}: {error.strerror or error}{advice}"))
    except RunInterrupted as interrupt:
        print(f"{run_dir.name}: interrupted at a checkpoint; run the same command to resume", file=sys.stderr)
        raise SystemExit(interrupt.exit_code)
    print_result(result, run_dir)


def remove_if_unused(run_dir: Path) -> None:
    """A run refused before it started leaves no folder behind (Hydra makes it, with .hydra/)."""
    import shutil

    if run_dir.is_dir() and all(path.name == ".hydra" for path in run_dir.iterdir()):
        shutil.rmtree(run_dir)


def print_result(result: dict, run_dir: Path) -> None:
    if result["outcome"] == "skipped":
        print(f"{run_dir}: already finished ({result['status']}); resume=false trains it again")
    errors = ", ".join(f"{label} {100 * result[key]:.2f}%" for label, key in
                       (("train error", "final_train_error"), ("test error", "final_test_error"))
                       if result.get(key) is not None)
    print(f"{run_dir}: {result['status']}, {errors}")


def hydra_flags(flags: list[str]) -> list[str]:
    """--cfg job shows the config as a run gets it, with the run's folder name worked out
    (the hydra part refers to run-time values that cannot be resolved before a run)."""
    shows_job = any(flag in ("--cfg", "-c") and value == "job" for flag, value in zip(flags, flags[1:]))
    return [*flags, "--resolve"] if shows_job and "--resolve" not in flags else flags


def asks_for_help(flags: list[str]) -> bool:
    return "--help" in flags or "-h" in flags


def train_command(args: list[str]) -> int:
    from .slots import SLOT_OPTIONS

    flags, overrides = split_flags(args)
    if asks_for_help(flags):
        print(help_page("train"))
        return 0
    args = hydra_flags(flags) + overrides
    sweep_words = [o for o in overrides if o.partition("=")[0] in SLOT_OPTIONS]
    if sweep_words:
        raise UsageError(f"{sweep_words[0]} is an option of resexp sweep (several runs at once); resexp train runs "
                         "one net: pick its GPU with CUDA_VISIBLE_DEVICES=N resexp train ...")
    if "-m" in flags or "--multirun" in flags:
        raise UsageError("resexp train runs one net; use resexp sweep for several (drop -m/--multirun)")
    check_arguments(flags, overrides)
    if not INFO_FLAGS.intersection(flags):
        from .sweep import check_one_setting, parse_overrides

        check_one_setting(parse_overrides(overrides), "train")
        cfg = config_module.compose(overrides + extra_search_path(flags))
        config_module.check(cfg)
        # Before Hydra writes its records into the run folder: a refused command changes nothing there.
        from .data import fetch_cifar10
        from .step import check_machine
        from .train import check_resumable

        check_machine(cfg)
        check_resumable(cfg, Path(cfg.out) / cfg.name)
        fetch_cifar10(cfg.data.name, cfg.data.root, bool(cfg.data.download))
    run_hydra_app(train_app, args)
    return 0


# --- sweep --------------------------------------------------------------------------------------

@hydra.main(config_path="pkg://resexp.conf", config_name="config", version_base="1.3")
def sweep_app(cfg: DictConfig) -> dict:
    from .sweep import run_job

    from .signals import RunInterrupted

    hydra_cfg = HydraConfig.get()
    try:
        return run_job(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.job.num)
    except RunInterrupted as interrupt:
        if "SUBMITIT_EXECUTOR" not in os.environ:
            raise  # stops the whole local sweep
        # A submitit job stopped by a signal, its checkpoint saved: an expected end, no traceback.
        print(f"{Path(hydra_cfg.runtime.output_dir).name}: stopped by {interrupt}; checkpoint saved",
              file=sys.stderr, flush=True)
        raise SystemExit(interrupt.exit_code)


def register_sweeper() -> None:
    """Register the sweeper by hand: Hydra's plugin scan misses it in editable installs."""
    from hydra.core.plugins import Plugins
    from hydra_plugins.resexp_sweeper.resexp_sweeper import ResexpSweeper

    Plugins.instance().register(ResexpSweeper)


def sweep_command(args: list[str]) -> int:
    from . import sweep as sweep_module
    from .slots import slot_overrides
    from .signals import RunInterrupted

    if "--yes" in args or "-y" in args:  # start a long CPU sweep without asking (estimate.confirmed_to_start)
        from .estimate import ASSUME_YES_VARIABLE

        os.environ[ASSUME_YES_VARIABLE] = "1"
        args = [arg for arg in args if arg not in ("--yes", "-y")]
    flags, overrides = split_flags(args)
    if asks_for_help(flags):
        print(help_page("sweep"))
        return 0
    flags = [flag for flag in hydra_flags(flags) if flag not in ("-m", "--multirun")]
    overrides = slot_overrides(overrides)
    check_arguments(flags, overrides)
    parsed = sweep_module.parse_overrides(overrides)  # the command line, parsed once here
    if INFO_FLAGS.intersection(flags):
        # Hydra shows --cfg/--info for one job, not a multirun: show the grid's first job.
        first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
                 else o.input_line for o in parsed]
        run_hydra_app(sweep_app, [*flags, *first])
        return 0
    # The sweep's folder (a fixed override Hydra cannot compose is one line here, not Hydra's traceback);
    # the sweeper expands the grid and composes and checks each job (sweep.expand_grid, sweep.plan_jobs).
    base = config_module.compose([o.input_line for o in parsed if not o.is_sweep_override()]
                                 + extra_search_path(flags))
    named = [str(o.value()) for o in parsed if o.get_key_element() == "name"]  # unquoted: 'my sweep' is my sweep
    name = named[0] if named else sweep_module.sweep_name(parsed)
    sweep_dir = Path(base.out) / name

    exit_code = 0
    register_sweeper()
    try:
        run_hydra_app(sweep_app, ["-m", *flags, *[o for o in overrides if not o.startswith("name=")],
                                  sweep_module.literal_override("name", name)])
    except RunInterrupted as interrupt:
        print("sweep interrupted; run the same command to resume it", file=sys.stderr)
        exit_code = interrupt.exit_code
    except KeyboardInterrupt:
        print("sweep interrupted; run the same command to resume it", file=sys.stderr)
        exit_code = 130

    record = sweep_module.read_sweep_record(sweep_dir)
    if exit_code == 0 and record is not None and record.get("runs") and \
            all(job.get("outcome") == "submitted" for job in record["runs"]):
        print(f"submitted; follow with: resexp status {sweep_dir}")
        return 0
    if record is not None and exit_code == 0:
        table, any_failed = sweep_module.outcome_table(record)
        print(table)
        exit_code = 1 if any_failed else 0
    if not draw_figures(sweep_dir):
        exit_code = exit_code or 2
    return exit_code


# --- plot ---------------------------------------------------------------------------------------

def draw_figures(folder: Path) -> bool:
    """Draw the sweep's figures and tables; False (after one line saying why) when they could not all be
    written into a folder that can be written (a full disk): the sweep's command then fails."""
    import logging

    from .plots import render_all

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter

    try:
        drawn = render_all(folder)
    except UsageError as error:
        print(f"resexp: no figures: {error}", file=sys.stderr)
        return True
    except OSError as error:  # a full disk: the runs' own records are whole; the figures can be drawn later
        print(f"resexp: figures not drawn: {write_error_reason(error, folder)}", file=sys.stderr)
        return error.errno in READ_ONLY_ERRNOS  # a finished sweep in a read-only folder: shown as it is
    print("figures: " + ", ".join(str(Path(f)) for f in drawn["files"]))
    return True


def plot_command(args: list[str]) -> int:
    from .files import parse_folder_args
    from .plots import render_all

    if any(arg in ("-h", "--help") for arg in args):
        print(PLOT_HELP, end="")
        return 0
    folder = parse_folder_args("plot", PLOT_HELP.splitlines()[0], args).folder
    try:
        drawn = render_all(folder)
    except OSError as error:
        raise UsageError(f"could not write the figures: {write_error_reason(error, folder)}") from error
    print("figures: " + ", ".join(str(Path(f)) for f in drawn["files"]))
    return 0


# --- entry point --------------------------------------------------------------------------------

def status_command(args: list[str]) -> int:
    from .status import status_command as show_status

    return show_status(args)


def analyze_command(args: list[str]) -> int:
    from .analyze import analyze_command as run_analysis

    return run_analysis(args)


def bench_command(args: list[str]) -> int:
    from .bench import bench_command as run_bench

    return run_bench(args)


COMMANDS = {"train": train_command, "sweep": sweep_command, "plot": plot_command, "status": status_command,
            "analyze": analyze_command, "bench": bench_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    os.environ[COMMAND_VARIABLE] = json.dumps(["resexp", *argv])  # for env.json, in this process and its jobs
    if command not in COMMANDS:
        print(f"resexp: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](args)
    except UsageError as error:
        if wants_traceback():
            raise
        print(f"resexp: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as leaving:
        return leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; every file on disk is whole (atomic writes)
        print("\nstopped; the last checkpoint is intact: run the same command to resume", file=sys.stderr)
        return 130


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (resexp status DIR | head): stop quietly, as other Unix tools do.
        # Python flushes stdout again at exit; point it at /dev/null so that this finds no pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, as a shell reports a command a broken pipe stopped
    sys.exit(code)
