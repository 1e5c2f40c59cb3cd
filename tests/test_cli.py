"""The ``resexp`` command as a user meets it, through the installed executable.

Bad input must end in exit code 2 with one ``resexp: error: ...`` line naming the
offending value, no traceback, and no files written (a finished run in the same out
folder stays byte-for-byte and mtime-for-mtime as it was). Good input must train,
skip finished work on a second call, and draw a sweep's figures and summary.

Every command starts a fresh Python that imports torch and Hydra (seconds each), so
the module starts them all together on a small thread pool as soon as their inputs
exist; each test then waits for the command it checks. ``--help`` and ``--cfg job``,
which start no run, are called in this process.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

RESEXP = Path(sysconfig.get_path("scripts")) / "resexp"
WORKERS = max(2, min(4, os.cpu_count() or 2))
TIMEOUT_S = 300  # a bad input that starts a real training run would still be cut off

# What a bad-input case adds its override to: the finished run's own command, so that
# a command that wrongly went ahead would land next to (or in) that run.
TRAIN_BASE = ("arch=resnet", "depth=8", "schedule=smoke", "data=synthetic", "progress=false", "out={out}")
SWEEP_BASE = ("depth=8", "schedule=smoke", "data=synthetic", "progress=false", "out={out}")
BASES = {"train": TRAIN_BASE, "sweep": SWEEP_BASE}


# --- running the command ------------------------------------------------------------------------

@dataclass
class Ran:
    args: list[str]
    returncode: int | None  # None: killed after TIMEOUT_S
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (f"$ resexp {' '.join(self.args)}\n[exit code {self.returncode}, {self.seconds:.1f} s]\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")


def resexp(args: list[str], cwd: Path, env: dict[str, str], **extra_env: str) -> Ran:
    start = time.monotonic()
    try:
        done = subprocess.run([str(RESEXP), *args], cwd=cwd, env={**env, **extra_env}, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        def text(data) -> str:
            return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
        return Ran(args, None, text(timeout.stdout), text(timeout.stderr) + f"\n[killed after {TIMEOUT_S} s]",
                   time.monotonic() - start)
    return Ran(args, done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path below ``folder``: files with their bytes and mtime, folders as None."""
    found: dict[str, tuple[bytes, int] | None] = {}
    if not folder.exists():
        return found
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():  # recorded as where it points: a link may loop or lead nowhere
            found[relative] = (os.readlink(path).encode(), path.lstat().st_mtime_ns)
        elif path.is_dir():
            found[relative + "/"] = None
        else:
            found[relative] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def differences(before: dict, after: dict) -> list[str]:
    return ([f"created {path}" for path in sorted(set(after) - set(before))]
            + [f"removed {path}" for path in sorted(set(before) - set(after))]
            + [f"changed {path}" for path in sorted(set(before) & set(after)) if before[path] != after[path]])


def stderr_lines(ran: Ran) -> list[str]:
    return [line for line in ran.stderr.splitlines() if line.strip()]


# --- the bad-input cases ------------------------------------------------------------------------

class StrayStderr(AssertionError):
    """stderr holds more than the one error line."""


class LeftFilesBehind(AssertionError):
    """A failing command created, removed or changed files."""


def token(value: str) -> re.Pattern:
    """``value`` standing alone (so that "0" does not match inside "20" or "s0")."""
    return re.compile(rf"(?<![\w.]){re.escape(value)}(?![\w.])")


def empty_folder(inputs: Path) -> None:
    (inputs / "empty").mkdir(parents=True)


def mismatched_class_folders(inputs: Path) -> None:
    """train/ has cat and dog, test/ only cat."""
    from PIL import Image

    for split, name in (("train", "cat"), ("train", "dog"), ("test", "cat")):
        folder = inputs / "mismatch" / split / name
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), (40, 80, 120)).save(folder / "000.png")


def empty_cifar_root(inputs: Path) -> None:
    (inputs / "cifar").mkdir(parents=True)


def a_file(inputs: Path) -> None:
    inputs.mkdir(parents=True)
    (inputs / "a-file").write_text("not a folder\n")


def image_folder_with_link(target: str):
    """An image folder whose train/cat/ holds one image and a link to ``target`` (a loop, or nothing)."""
    def setup(inputs: Path) -> None:
        from PIL import Image

        for split in ("train", "test"):
            folder = inputs / "links" / split / "cat"
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (40, 80, 120)).save(folder / "000.png")
        link = inputs / "links" / "train" / "cat" / "001.png"
        link.symlink_to(link if target == "itself" else inputs / "no-such-image.png")
    return setup


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # command and its arguments; {out} and {inputs} are filled in
    needles: tuple  # each a substring or pattern the error line must contain
    setup: Callable[[Path], None] | None = None

CASES = [
    Case("depth-21", ("train", "depth=21"), ("depth must be 6n+2", "got 21")),
    Case("depth-not-a-number", ("train", "depth=abc"), ("depth", "abc")),
    Case("depth-0", ("train", "depth=0"), ("depth", token("0"))),
    Case("arch-unknown", ("train", "arch=foo"), ("arch", "foo")),
    Case("shortcut-unknown", ("train", "model.shortcut=D"), ("model.shortcut", token("D"))),
    Case("lr-negative", ("train", "schedule.lr=-1"), ("schedule.lr", token("-1"))),
    Case("lr-not-a-number", ("train", "schedule.lr=abc"), ("schedule.lr", "abc")),
    Case("batch-size-0", ("train", "schedule.batch_size=0"), ("schedule.batch_size", token("0"))),
    Case("batch-size-fraction", ("train", "schedule.batch_size=1.5"), ("schedule.batch_size", "1.5")),
    Case("iterations-0", ("train", "schedule.iterations=0"), ("schedule.iterations", token("0"))),
    Case("milestones-decreasing", ("train", "schedule.milestones=[5,2]"),
         ("schedule.milestones", re.compile(r"5,\s*2"))),
    Case("seed-negative", ("train", "seed=-1"), ("seed", token("-1"))),
    Case("device-unknown", ("train", "device=tpu"), ("device", "tpu")),
    # seed=1: a run that does not exist yet, so the device is actually needed.
    Case("device-cuda-without-gpu", ("train", "device=cuda", "seed=1"), ("cuda",)),
    Case("precision-unknown", ("train", "precision=fp8"), ("precision", "fp8")),
    Case("data-unknown-option", ("train", "data=foo"), ("foo", "cifar10", "imagefolder", "synthetic")),
    Case("unknown-key", ("train", "nosuchkey=1"), ("unknown key", "nosuchkey")),
    Case("unknown-nested-key", ("train", "data.nosuch=1"), ("unknown key", "data.nosuch")),
    Case("misspelt-key", ("train", "depht=20"), ("unknown key 'depht'", "did you mean depth?")),
    Case("sweep-misspelt-swept-key", ("sweep", "depht=20,56"), ("unknown key 'depht'", "did you mean depth?")),
    Case("misspelt-nested-key", ("train", "schedule.iteration=5"), ("did you mean schedule.iterations?",)),
    Case("imagefolder-without-root", ("train", "data=imagefolder"), ("data.root",)),
    Case("imagefolder-missing-root", ("train", "data=imagefolder", "data.root={inputs}/no-such-folder"),
         ("{inputs}/no-such-folder",)),
    Case("imagefolder-empty-root", ("train", "data=imagefolder", "data.root={inputs}/empty"),
         ("{inputs}/empty",), setup=empty_folder),
    Case("imagefolder-class-mismatch", ("train", "data=imagefolder", "data.root={inputs}/mismatch"),
         ("dog",), setup=mismatched_class_folders),
    Case("train-size-0", ("train", "data.train_size=0"), ("data.train_size", token("0"))),
    Case("padding-negative", ("train", "data.augment.padding=-1"), ("data.augment.padding", token("-1"))),
    Case("resume-not-a-bool", ("train", "resume=maybe"), ("resume", "maybe")),
    Case("train-several-values", ("train", "depth=20,56"), ("20,56", "resexp sweep")),
    Case("train-multirun-flag", ("train", "-m"), ("-m", "resexp sweep")),
    Case("sweep-one-bad-value", ("sweep", "depth=20,21"), (token("21"),)),
    Case("sweep-duplicate-key", ("sweep", "depth=20", "depth=56"), ("depth=20", "depth=56")),
    Case("train-duplicate-key", ("train", "depth=20", "depth=56"), ("depth is given twice", "depth=20", "depth=56")),
    Case("sweep-bad-lr", ("sweep", "schedule.lr=0.1,-1"), ("schedule.lr", token("-1"))),
    Case("plot-missing-folder", ("plot", "{inputs}/no-such-sweep"), ("{inputs}/no-such-sweep",)),
    Case("plot-without-folder", ("plot",), ("resexp plot", "folder")),
    Case("unknown-command", ("frobnicate",), ("frobnicate",)),
    Case("cifar10-archive-missing",
         ("train", "data=cifar10", "data.root={inputs}/cifar", "data.download=false"),
         ("cifar-10-python.tar.gz", "{inputs}/cifar"), setup=empty_cifar_root),
    # Values that a check's own message rejects, and values that used to end in a traceback.
    Case("lr-infinite", ("train", "schedule.lr=inf"), ("schedule.lr", token("inf"))),
    Case("residual-scale-infinite", ("train", "model.residual_scale=inf"), ("model.residual_scale", token("inf"))),
    Case("milestones-repeated", ("train", "schedule.milestones=[4,4]"), ("schedule.milestones", "[4, 4]")),
    Case("milestones-past-the-end", ("train", "schedule.milestones=[4,40]"), ("schedule.milestones", "40")),
    Case("progress-maybe", ("train", "progress=maybe"), ("progress", "maybe")),
    Case("seed-too-large", ("train", "seed=1180591620717411303424"), ("seed", "1180591620717411303424")),
    Case("seed-removed", ("train", "~seed"), ("~seed",)),
    Case("mlp-width-huge", ("train", "model.family=mlp", "model.width=1000000000"), ("model.width", "1000000000")),
    Case("synthetic-set-huge", ("train", "data.train_size=100000000"), ("data.train_size=100000000",)),
    Case("name-escapes-out", ("train", "name=../escaped"), ("name", "../escaped")),
    Case("name-empty", ("train", "name="), ("name must be a folder name",)),
    Case("out-empty", ("train", "out="), ("out must be",)),
    Case("out-is-a-file", ("train", "out={inputs}/a-file"), ("{inputs}/a-file", "not a folder"), setup=a_file),
    Case("imagefolder-link-loop", ("train", "data=imagefolder", "data.root={inputs}/links"),
         ("{inputs}/links/train/cat/001.png",), setup=image_folder_with_link("itself")),
    Case("imagefolder-dangling-link", ("train", "data=imagefolder", "data.root={inputs}/links"),
         ("{inputs}/links/train/cat/001.png",), setup=image_folder_with_link("nothing")),
    Case("bench-json-under-a-file", ("bench", "device=cpu", "bench.json={inputs}/a-file/bench.json"),
         ("{inputs}/a-file", "not a folder"), setup=a_file),
    Case("sweep-empty-range", ("sweep", "seed=range(0,0)"), ("seed=range(0,0)",)),
    Case("status-of-a-file", ("status", "{inputs}/a-file"), ("{inputs}/a-file", "not a folder"), setup=a_file),
    # Refused before Hydra writes into the run folder: the finished run's records stay as they were.
    Case("resume-with-another-lr", ("train", "schedule.lr=0.05"), ("another config", "schedule.lr")),
    Case("another-depth-into-a-finished-run", ("train", "depth=14", "name=resnet-8-s0-smoke-synthetic"),
         ("another config", "depth")),
    # Checked once while the sweep is planned, not by each run in turn.
    Case("sweep-cifar10-archive-missing",
         ("sweep", "data=cifar10", "data.root={inputs}/cifar", "data.download=false", "seed=0,1"),
         ("cifar-10-python.tar.gz", "{inputs}/cifar"), setup=empty_cifar_root),
]


def override_key(arg: str) -> str | None:
    return None if arg.startswith("-") or "=" not in arg else arg.split("=", 1)[0].lstrip("+~")


def case_args(case: Case, out: Path, inputs: Path) -> list[str]:
    command, *rest = case.args
    given = {override_key(arg) for arg in rest}
    base = [arg for arg in BASES.get(command, ()) if override_key(arg) not in given]
    return [arg.format(out=out, inputs=inputs) for arg in (command, *rest, *base)]


CASE_PARAMS = [pytest.param(case, id=case.id) for case in CASES]


# --- the runs, started together -----------------------------------------------------------------

@dataclass
class FinishedRun:
    cwd: Path
    out: Path
    run_dir: Path
    ran: Ran


@dataclass
class BadRun:
    case: Case
    inputs: Path
    finished_copy: Path
    before: dict
    after: dict
    ran: Ran


@dataclass
class Watched:
    """A command and the folder it ran against, before and after."""
    ran: Ran
    before: dict
    after: dict


@dataclass
class SweepTwice:
    out: Path
    first: Ran
    after_first: dict
    second: Ran
    after_second: dict


def train_smoke_run(folder: Path, env) -> FinishedRun:
    out = folder / "out"
    folder.mkdir(parents=True)
    ran = resexp([arg.format(out=out) for arg in ("train", *TRAIN_BASE)], folder, env)
    runs = [path for path in out.iterdir() if path.is_dir()] if out.is_dir() else []
    assert ran.returncode == 0 and len(runs) == 1, ran.describe()
    return FinishedRun(folder, out, runs[0], ran)


def run_bad_case(case: Case, case_dir: Path, args: list[str], inputs: Path, finished_copy: Path, before,
                 env) -> BadRun:
    ran = resexp(args, case_dir, env)
    return BadRun(case, inputs, finished_copy, before, snapshot(case_dir), ran)


def run_watched(folder: Path, args: list[str], env, **extra_env) -> Watched:
    before = snapshot(folder)
    ran = resexp(args, folder, env, **extra_env)
    return Watched(ran, before, snapshot(folder))


def rerun_finished(run: FinishedRun, env) -> Watched:
    before = snapshot(run.run_dir)
    ran = resexp(run.ran.args, run.cwd, env)
    return Watched(ran, before, snapshot(run.run_dir))


def readme_ci_recipe() -> str:
    """The README's CI smoke run: the shell block under its heading, calling this install's resexp."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### A smoke run for CI", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return block.replace(".venv/bin/resexp", str(RESEXP))


def run_readme_ci_recipe(folder: Path, env) -> Ran:
    folder.mkdir(parents=True)
    env = {**env, "TMPDIR": str(folder)}  # mktemp -d makes its fresh folder here
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", readme_ci_recipe()], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    return Ran(["(README CI recipe)"], done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def sweep_twice(folder: Path, env) -> SweepTwice:
    out = folder / "out"
    folder.mkdir(parents=True)
    first = resexp(["sweep", "data=synthetic", "depth=8", "schedule=smoke", "progress=false", f"out={out}"],
                   folder, env)
    after_first = snapshot(out)
    # The same sweep typed differently: other order, out= first, another spelling of false.
    second = resexp(["sweep", f"out={out}", "progress=False", "schedule=smoke", "depth=8", "data=synthetic"],
                    folder, env)
    return SweepTwice(out, first, after_first, second, snapshot(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli_env) -> dict[str, Future]:
    """Start every command of this module; map a name (or a case id) to its future."""
    assert RESEXP.exists(), f"{RESEXP} is missing: install the package (pip install -e .)"
    root = tmp_path_factory.mktemp("cli")
    pool = ThreadPoolExecutor(WORKERS)
    futures: dict[str, Future] = {}
    try:
        futures["finished"] = pool.submit(train_smoke_run, root / "finished", cli_env)
        futures["sweep"] = pool.submit(sweep_twice, root / "sweep", cli_env)
        futures["readme-ci"] = pool.submit(run_readme_ci_recipe, root / "readme-ci", cli_env)
        folder = root / "full-error"
        folder.mkdir()
        futures["full-error"] = pool.submit(run_watched, folder, ["train", "depth=21", f"out={folder / 'out'}"],
                                            cli_env, HYDRA_FULL_ERROR="1")

        # The bad inputs each get their own copy of the finished run, so they can run at once.
        finished = futures["finished"].result()
        for case in CASES:
            case_dir = root / "cases" / case.id
            out, inputs = case_dir / "out", case_dir / "inputs"
            finished_copy = out / finished.run_dir.name
            shutil.copytree(finished.run_dir, finished_copy)  # copies keep their mtimes
            if case.setup is not None:
                case.setup(inputs)
            args = case_args(case, out, inputs)
            futures[case.id] = pool.submit(run_bad_case, case, case_dir, args, inputs, finished_copy,
                                           snapshot(case_dir), cli_env)
        futures["rerun"] = pool.submit(rerun_finished, finished, cli_env)
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_input_is_one_error_line_with_exit_code_2(runs, case):
    """A mistake ends with exit code 2 and one ``resexp: error:`` line naming the bad value, no traceback."""
    bad: BadRun = runs[case.id].result()
    ran = bad.ran
    assert ran.returncode == 2, ran.describe()
    assert "Traceback" not in ran.stdout + ran.stderr, ran.describe()
    lines = stderr_lines(ran)
    assert lines, ran.describe()
    error = lines[-1]
    assert error.startswith("resexp: error:"), ran.describe()
    for needle in case.needles:
        if isinstance(needle, str):
            needle = needle.format(inputs=bad.inputs)
            assert needle in error, f"{needle!r} missing from the error line\n{ran.describe()}"
        else:
            assert needle.search(error), f"/{needle.pattern}/ missing from the error line\n{ran.describe()}"
    if len(lines) != 1:
        raise StrayStderr(f"stderr should be the error line alone\n{ran.describe()}")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_input_writes_nothing_and_leaves_finished_run_alone(runs, case):
    """A rejected command creates no run or sweep folder and does not touch a finished run beside it."""
    bad: BadRun = runs[case.id].result()
    assert bad.ran.returncode not in (0, None), bad.ran.describe()
    assert f"out/{bad.finished_copy.name}/result.json" in bad.before, "the finished run was not in place"
    changes = differences(bad.before, bad.after)
    if changes:
        raise LeftFilesBehind("\n".join(changes[:20]) + "\n" + bad.ran.describe())


def test_full_error_switch_shows_the_traceback(runs):
    """HYDRA_FULL_ERROR=1 is the user asking for the traceback behind the one-line error."""
    info: Watched = runs["full-error"].result()
    ran = info.ran
    assert ran.returncode not in (0, None), ran.describe()
    assert "Traceback (most recent call last)" in ran.stderr, ran.describe()
    assert "got 21" in ran.stderr, ran.describe()
    assert differences(info.before, info.after) == [], ran.describe()


# --- help and --cfg (in this process: they start no run) -----------------------------------------

@pytest.fixture
def main(tmp_path, monkeypatch, capsys, hydra_in_process):
    """``resexp.cli.main`` in a fresh empty folder; returns (exit code, stdout, stderr, files left)."""
    from resexp import cli

    for name in ("HYDRA_FULL_ERROR", "RESEXP_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)

    def call(*args: str) -> tuple[int, str, str, list[str]]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err, sorted(snapshot(tmp_path))

    return call


def test_top_level_help_lists_the_commands(main):
    """``resexp --help`` names every command, and exits 0."""
    from resexp.cli import COMMANDS

    code, out, err, _ = main("--help")
    assert code == 0, err
    for command in COMMANDS:
        assert re.search(rf"^  {command} ", out, re.MULTILINE), (command, out)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_help_says_what_the_command_does_with_options_defaults_and_examples(main, command):
    """Each option line: KEY=, its default as the config has it, and a meaning; two examples; no
    bookkeeping keys."""
    from resexp import config as config_module

    code, out, err, _ = main(command, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: resexp {command} "), out
    options = re.findall(r"^  ([\w.]+)=\s+(\S+)\s+(\S.*)$", out, re.MULTILINE)
    defaults = {key: default for key, default, _ in options}
    cfg = config_module.compose([])
    assert defaults["depth"] == str(cfg.depth) and defaults["schedule"] == cfg.schedule.name, options
    assert defaults["resume"] == "true" and defaults["data.root"] == cfg.data.root, options
    examples = re.findall(rf"^  resexp {command} \S", out.split("examples:")[1], re.MULTILINE)
    assert len(examples) == 2, out
    for internal in ("sweep.keys", "sweep.size", "resexp resexp"):
        assert internal not in out, out
    if command == "sweep":  # the README's spellings
        assert {"gpus", "runs_per_gpu", "experiment", "launcher"} <= set(defaults), options
        assert "figure6_quick" in out


def test_plot_help_says_what_it_draws_with_examples(main):
    code, out, err, _ = main("plot", "--help")
    assert code == 0, err
    assert "curves.png" in out and "error_vs_depth.png" in out and "summary.md" in out, out
    assert len(re.findall(r"^  resexp plot \S", out, re.MULTILINE)) == 2, out


@pytest.mark.parametrize("command", ["status", "analyze"])
def test_the_other_folder_commands_help_shows_examples(main, command):
    """Like plot's: a usage line, then examples of a sweep folder and, for status, of one run's."""
    code, out, err, _ = main(command, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: resexp {command} "), out
    examples = re.findall(rf"^  resexp {command} (.*\S)", out.split("examples:")[1], re.MULTILINE)
    assert len(examples) == 2, out
    if command == "status":
        assert examples[1].split()[0] == "outputs/depth20-56-110/resnet-20-s0", examples


def test_train_cfg_job_prints_the_config_and_trains_nothing(main):
    """``resexp train --cfg job`` prints the composed YAML (paper defaults), resolved, and creates no folder."""
    code, out, err, left = main("train", "--cfg", "job", "depth=56")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["arch"] == "resnet" and printed["depth"] == 56, out
    assert printed["name"] == "resnet-56-s0", out  # the run's folder name, worked out
    assert left == [], left


def test_misspelt_key_is_unknown_with_the_closest_key_and_no_append_advice(main):
    code, out, err, left = main("train", "depht=20")
    assert code == 2 and left == []
    assert err.strip().splitlines() == ["resexp: error: unknown key 'depht': did you mean depth? "
                                        "(--cfg job prints every key)"], err


def test_sweep_cfg_job_prints_the_config_and_trains_nothing(main):
    """``resexp sweep --cfg job`` prints the composed YAML like train does, and runs nothing."""
    code, out, err, left = main("sweep", "--cfg", "job")
    assert code == 0, err
    assert yaml.safe_load(out)["arch"] == "resnet", out
    assert left == [], left


# --- training and resuming ----------------------------------------------------------------------

def test_smoke_train_writes_a_complete_run_folder(runs):
    """One run leaves its config, metrics, result (done), environment and checkpoint in one folder."""
    run: FinishedRun = runs["finished"].result()
    names = {path.name for path in run.run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "result.json", "env.json", "checkpoint.pt"} <= names
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert (config["arch"], config["depth"], config["schedule"]["name"]) == ("resnet", 8, "smoke")
    result = json.loads((run.run_dir / "result.json").read_text())
    assert result["status"] == "done", result
    assert result["iterations_done"] == config["schedule"]["iterations"], result
    metrics = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert metrics and metrics[-1]["iteration"] == config["schedule"]["iterations"]
    assert "command" in json.loads((run.run_dir / "env.json").read_text())
    assert (run.run_dir / "checkpoint.pt").stat().st_size > 0
    assert str(run.run_dir) in run.ran.stdout, run.ran.describe()


def test_rerunning_a_finished_run_skips_it(runs):
    """The same command again says the run is finished and leaves its result, metrics and checkpoint as they were."""
    rerun: Watched = runs["rerun"].result()
    assert rerun.ran.returncode == 0, rerun.ran.describe()
    assert "already finished" in rerun.ran.stdout, rerun.ran.describe()
    for name in ("result.json", "metrics.jsonl", "checkpoint.pt"):
        assert rerun.after[name] == rerun.before[name], f"{name} changed\n{rerun.ran.describe()}"


# --- sweeps -------------------------------------------------------------------------------------

def sweep_folders(snap: dict) -> list[str]:
    return sorted(path for path in snap if path.endswith("/") and path.count("/") == 1)


def test_sweep_trains_each_arch_and_draws_figures_and_summary(runs):
    """A depth-8 smoke sweep trains plain-8 and resnet-8 into named folders, then writes figures and summaries."""
    sweep: SweepTwice = runs["sweep"].result()
    ran = sweep.first
    assert ran.returncode == 0, ran.describe()
    folders = sweep_folders(sweep.after_first)
    assert len(folders) == 1, folders
    sweep_dir = sweep.out / folders[0]
    runs_made = sorted(path.name for path in sweep_dir.iterdir() if path.is_dir())
    assert runs_made == ["plain-8-s0", "resnet-8-s0"], "run folders must be named from config values, " \
                                                       f"not Hydra job numbers: {runs_made}"
    for name in runs_made:
        assert json.loads((sweep_dir / name / "result.json").read_text())["status"] == "done"
    for name in ("curves.png", "error_vs_depth.png"):
        assert (sweep_dir / name).read_bytes().startswith(b"\x89PNG"), name
    with open(sweep_dir / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["arch"], row["depth"]) for row in rows) == [("plain", "8"), ("resnet", "8")], rows
    table = [line for line in (sweep_dir / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(runs_made), table  # header, rule, one row per run


def test_readme_ci_smoke_recipe_trains_and_draws_in_a_fresh_folder(runs):
    """The README's CI recipe works as printed; it fails (non-zero) when the sweep does."""
    recipe = readme_ci_recipe()
    assert "data=synthetic" in recipe and "schedule=smoke" in recipe and "mktemp -d" in recipe, recipe
    ran: Ran = runs["readme-ci"].result()
    assert ran.returncode == 0, ran.describe()
    assert re.search(r"/curves\.png$", ran.stdout.strip(), re.MULTILINE), ran.describe()


def test_sweep_typed_differently_reuses_its_folder_and_skips_finished_runs(runs):
    """The same sweep with its overrides in another order finds the same folder and retrains nothing."""
    sweep: SweepTwice = runs["sweep"].result()
    assert sweep.first.returncode == 0, sweep.first.describe()
    ran = sweep.second
    assert ran.returncode == 0, ran.describe()
    assert sweep_folders(sweep.after_second) == sweep_folders(sweep.after_first), ran.describe()
    folder = sweep_folders(sweep.after_first)[0]
    run_names = sorted({path.split("/")[1] for path in sweep.after_first
                        if path.count("/") >= 2 and path.endswith("/result.json")})
    assert len(run_names) == 2, run_names
    for name in run_names:
        for file in ("result.json", "metrics.jsonl", "checkpoint.pt"):
            key = f"{folder}{name}/{file}"
            assert sweep.after_second[key] == sweep.after_first[key], f"{key} changed\n{ran.describe()}"
        assert re.search(rf"^{re.escape(name)}\s+skipped\b", ran.stdout, re.MULTILINE), ran.describe()
