"""``resexp sweep ... gpus=... runs_per_gpu=...``: a sweep's runs side by side, one process per slot.

A sweep with ``gpus`` must leave what the same sweep without it leaves (sweep and run
folder names, configs, metrics, results, sweep.json outcomes, figures), each run's
process started with CUDA_VISIBLE_DEVICES set to its slot's GPU. The tests pass
``device=cpu``, so the runs train on the CPU on any machine. Commands that start a fresh
``resexp`` (seconds each: torch and Hydra imports) start together on a small thread pool
when the first test asks; each test then waits for the command it checks.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sysconfig
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from resexp import slots
from resexp.sweep import finished_record

RESEXP = Path(sysconfig.get_path("scripts")) / "resexp"
TIMEOUT_S = 300
SMOKE = ["depth=8", "data=synthetic", "schedule=smoke", "progress=false", "device=cpu"]
TIMING_FIELDS = ("time_s", "images_per_s")
HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


# --- running the command ------------------------------------------------------------------------

@dataclass
class Ran:
    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"$ resexp {' '.join(self.args)}\n[exit code {self.returncode}]\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")


def resexp(args: list[str], env: dict, cwd: Path | None = None) -> Ran:
    done = subprocess.run([str(RESEXP), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    return Ran(args, done.returncode, done.stdout, done.stderr)


def files_below(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def paths_below(folder: Path) -> list[str]:
    """Every file and folder below ``folder``."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


def run_folders(sweep_dir: Path) -> list[str]:
    return sorted(path.name for path in sweep_dir.iterdir() if path.is_dir() and not path.name.startswith("."))


def only_sweep_folder(out: Path) -> Path:
    folders = [path for path in out.iterdir() if path.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{key: value for key, value in line.items() if key not in TIMING_FIELDS} for line in lines]


def sweep_outcomes(sweep_record: bytes) -> dict[str, str]:
    return {job["run"]: job["outcome"] for job in json.loads(sweep_record)["runs"]}


def slot_processes(marker: str) -> list[int]:
    """Job processes (python -m resexp.slots) whose command line mentions ``marker``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"resexp.slots" in words and any(marker.encode() in word for word in words):
            found.append(int(cmdline.parent.name))
    return found


# --- scenarios, run in the background -----------------------------------------------------------

@dataclass
class SweepTwice:
    out: Path
    first: Ran
    after_first: dict[str, bytes]
    second: Ran
    after_second: dict[str, bytes]


def gpus_sweep_twice(out: Path, env: dict) -> SweepTwice:
    args = ["sweep", *SMOKE, f"out={out}", "gpus=0,1"]
    first = resexp(args, env)
    after_first = files_below(out)
    second = resexp(args, env)
    return SweepTwice(out, first, after_first, second, files_below(out))


def plain_sweep(out: Path, env: dict) -> Ran:
    return resexp(["sweep", *SMOKE, f"out={out}"], env)


@dataclass
class Interrupted:
    sweep_dir: Path
    ran: Ran
    left_running: list[int]


def interrupted_sweep(out: Path, env: dict) -> Interrupted:
    """Four runs in two slots, long enough to be stopped: Ctrl-C once both slots' runs have metrics."""
    args = ["sweep", *SMOKE, "seed=0,1", "schedule.iterations=5000", "schedule.eval_every=2",
            "schedule.checkpoint_every=5000", f"out={out}", "name=stopped", "gpus=0", "runs_per_gpu=2"]
    process = subprocess.Popen([str(RESEXP), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    sweep_dir = out / "stopped"
    deadline = time.monotonic() + TIMEOUT_S
    while len([path for path in sweep_dir.glob("*/metrics.jsonl") if path.stat().st_size]) < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            stdout, stderr = process.communicate()
            return Interrupted(sweep_dir, Ran(args, None, stdout, stderr + "\n[ended before it was stopped]"), [])
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    return Interrupted(sweep_dir, Ran(args, process.returncode, stdout, stderr), slot_processes(str(sweep_dir)))


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, cli_env) -> dict[str, Future]:
    assert RESEXP.exists(), f"{RESEXP} is missing: install the package (pip install -e .)"
    root = tmp_path_factory.mktemp("slots")
    pool = ThreadPoolExecutor(2)
    futures = {
        "gpus": pool.submit(gpus_sweep_twice, root / "gpus", cli_env),
        "plain": pool.submit(plain_sweep, root / "plain", cli_env),
        "interrupted": pool.submit(interrupted_sweep, root / "interrupted", cli_env),
    }
    try:
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- a sweep in slots ---------------------------------------------------------------------------

def test_gpus_sweep_trains_every_run_in_its_own_slot_like_a_plain_sweep(scenarios):
    """gpus=0,1: both runs train, one per GPU; folders, configs, metrics and records match the plain sweep's."""
    twice: SweepTwice = scenarios["gpus"].result()
    plain: Ran = scenarios["plain"].result()
    ran = twice.first
    assert ran.returncode == 0, ran.describe()
    assert plain.returncode == 0, plain.describe()
    sweep_dir = only_sweep_folder(twice.out)
    plain_dir = only_sweep_folder(Path(plain.args[-1].removeprefix("out=")))
    assert sweep_dir.name == plain_dir.name, "gpus must not change the sweep's folder"
    assert run_folders(sweep_dir) == run_folders(plain_dir) == ["plain-8-s0", "resnet-8-s0"]

    for name in run_folders(sweep_dir):
        run_dir = sweep_dir / name
        assert json.loads((run_dir / "result.json").read_text())["status"] == "done", name
        assert (run_dir / "slot.log").is_file(), name
        # The same run: config (but for where it went and the slot settings) and metrics, on a CPU bit for bit.
        config, plain_config = (yaml.safe_load((folder / name / "config.yaml").read_text())
                                for folder in (sweep_dir, plain_dir))
        assert (config["sweep"].pop("gpus"), config["sweep"].pop("runs_per_gpu")) == ([0, 1], 1)
        assert (plain_config["sweep"].pop("gpus"), plain_config["sweep"].pop("runs_per_gpu")) == (None, 1)
        assert {**config, "out": None} == {**plain_config, "out": None}
        assert metrics(run_dir) == metrics(plain_dir / name), name
    devices = {json.loads((sweep_dir / name / "env.json").read_text())["cuda_visible_devices"]
               for name in run_folders(sweep_dir)}
    assert devices == {"0", "1"}
    assert re.search(r"^\[sweep 1/2\] plain-8-s0 on GPU 0 \(output: .*slot\.log\)$", ran.stderr, re.MULTILINE), \
        ran.describe()

    record_file = twice.after_first[f"{sweep_dir.name}/sweep.json"]  # before the second call rewrote it
    assert sweep_outcomes(record_file) == {"plain-8-s0": "trained", "resnet-8-s0": "trained"}
    record = json.loads(record_file)
    assert all(job["result"]["status"] == "done" for job in record["runs"]), record
    for name in run_folders(sweep_dir):
        assert re.search(rf"^{name}\s+done\b", ran.stdout, re.MULTILINE), ran.describe()
    for name in ("curves.png", "error_vs_depth.png"):
        assert (sweep_dir / name).read_bytes().startswith(b"\x89PNG"), name
    assert (sweep_dir / "summary.csv").read_text().count("\n") == 3  # header and one row per run


def test_gpus_sweep_run_again_skips_its_finished_runs(scenarios):
    """The same command again skips both runs and leaves their results, metrics and checkpoints alone."""
    twice: SweepTwice = scenarios["gpus"].result()
    assert twice.first.returncode == 0, twice.first.describe()
    ran = twice.second
    assert ran.returncode == 0, ran.describe()
    sweep_dir = only_sweep_folder(twice.out)
    assert sweep_outcomes((sweep_dir / "sweep.json").read_bytes()) == {"plain-8-s0": "skipped",
                                                                        "resnet-8-s0": "skipped"}
    for name in run_folders(sweep_dir):
        assert re.search(rf"^{name}\s+skipped\b", ran.stdout, re.MULTILINE), ran.describe()
        for file in ("result.json", "metrics.jsonl", "checkpoint.pt"):
            key = f"{sweep_dir.name}/{name}/{file}"
            assert twice.after_second[key] == twice.after_first[key], f"{key} changed\n{ran.describe()}"


def test_failed_jobs_are_recorded_and_the_others_still_train(tmp_path, monkeypatch):
    """A job whose process ends without a record, and one whose training fails, are failed runs; the third trains."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep_dir = tmp_path / "sweep"
    common = [*SMOKE, f"out={tmp_path}", "name=sweep", "sweep.size=3"]
    planned = [
        {"run": "broken", "overrides": [*common, "nosuchkey=1"]},  # the job process cannot compose its config
        {"run": "plain-8-s0", "overrides": ["arch=plain", *common]},  # its checkpoint is unreadable
        {"run": "resnet-8-s0", "overrides": ["arch=resnet", *common]},
    ]
    (sweep_dir / "plain-8-s0").mkdir(parents=True)
    (sweep_dir / "plain-8-s0" / "checkpoint.pt").write_bytes(b"not a checkpoint")

    results = slots.run_in_slots(planned, sweep_dir, gpus=[0], runs_per_gpu=2)

    runs = {job["run"]: job for job in finished_record(sweep_dir, {"runs": planned}, results)["runs"]}
    assert {name: job["outcome"] for name, job in runs.items()} == \
        {"broken": "failed", "plain-8-s0": "failed", "resnet-8-s0": "trained"}
    error = runs["broken"]["result"]["error"]
    assert "exit code 2" in error and str(sweep_dir / "broken" / "slot.log") in error, error
    assert "nosuchkey" in (sweep_dir / "broken" / "slot.log").read_text()
    plain = json.loads((sweep_dir / "plain-8-s0" / "result.json").read_text())
    assert plain["status"] == "failed" and "checkpoint" in plain["error"], plain
    assert json.loads((sweep_dir / "resnet-8-s0" / "result.json").read_text())["status"] == "done"


def test_ctrl_c_stops_the_running_jobs_at_a_checkpoint_and_starts_no_other(scenarios):
    """SIGINT: each running job saves a checkpoint and stops, the waiting ones never start, the sweep says how to resume."""
    import torch

    stopped: Interrupted = scenarios["interrupted"].result()
    ran = stopped.ran
    assert ran.returncode == 128 + signal.SIGINT, ran.describe()
    assert "sweep interrupted; run the same command to resume it" in ran.stderr, ran.describe()
    assert stopped.left_running == [], "job processes outlived the sweep"
    assert len(json.loads((stopped.sweep_dir / "sweep.json").read_text())["runs"]) == 4
    started = run_folders(stopped.sweep_dir)
    assert len(started) == 2, f"only the two slots' runs may start: {started}"
    for name in started:
        result = json.loads((stopped.sweep_dir / name / "result.json").read_text())
        assert result["status"] == "interrupted" and 0 < result["iterations_done"] < 5000, result
        checkpoint = torch.load(stopped.sweep_dir / name / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert checkpoint["iteration"] == result["iterations_done"], name
    assert (stopped.sweep_dir / "curves.png").is_file(), "the figures are drawn after an interruption too"


# --- bad input (in this process: every case stops before anything trains) -----------------------

@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    needles: tuple  # substrings or patterns the error line must hold


def standalone(value: str) -> re.Pattern:
    """``value`` not inside a longer number or word ("0" must not match in "s0")."""
    return re.compile(rf"(?<![\w.]){re.escape(value)}(?![\w.])")


BAD_CASES = [
    Case("gpus-negative", ("sweep", "gpus=-1"), ("gpus", standalone("-1"))),
    Case("gpus-repeated", ("sweep", "gpus=0,0"), ("gpus=0,0", "runs_per_gpu")),
    Case("gpus-not-numbers", ("sweep", "gpus=0,x"), ("gpus", "0,x")),
    Case("gpus-all-without-gpu", ("sweep", "gpus=all"), ("gpus=all", "no CUDA GPU")),
    Case("runs-per-gpu-0", ("sweep", "gpus=0", "runs_per_gpu=0"), ("runs_per_gpu", standalone("0"))),
    Case("runs-per-gpu-without-gpus", ("sweep", "runs_per_gpu=2"), ("runs_per_gpu=2", "gpus")),
    # Without the submitit launcher installed the error says so instead: either way, no sweep.
    Case("gpus-with-submitit", ("sweep", "gpus=0", "launcher=submitit_local"),
         ("launcher=submitit_local", "gpus=0") if HAS_SUBMITIT else ("launcher=submitit_local",)),
    Case("train-gpus", ("train", "gpus=0"), ("gpus=0", "resexp sweep")),
]


@pytest.fixture
def main(tmp_path, monkeypatch, capsys, hydra_in_process):
    """``resexp.cli.main`` in an empty folder, on a machine without GPUs; returns (exit code, stderr, paths left)."""
    import torch
    from resexp import cli

    for name in ("HYDRA_FULL_ERROR", "RESEXP_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.chdir(tmp_path)

    def call(*args: str) -> tuple[int, str, list[str]]:
        code = cli.main(list(args))
        return code, capsys.readouterr().err, paths_below(tmp_path)

    return call


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in BAD_CASES])
def test_bad_slot_options_are_one_error_line_with_exit_code_2(main, case):
    """A bad gpus or runs_per_gpu: exit code 2, one ``resexp: error:`` line naming it, no traceback, no files."""
    command, *rest = case.args
    base = ["arch=resnet", *SMOKE] if command == "train" else SMOKE
    code, stderr, left = main(command, *rest, *base, "out=out")
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("resexp: error:"), stderr
    for needle in case.needles:
        found = needle in lines[0] if isinstance(needle, str) else needle.search(lines[0])
        assert found, f"{needle!r} missing from the error line: {lines[0]}"
    assert left == [], left
