"""scripts/gpu-check.sh without a usable GPU: the script a GPU machine runs must not rot between GPU checks."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_FILES = {"report.md", "record.json", "gpu-check.log", "curves.png", "error_vs_depth.png"}


def run_check(tmp_path: Path, env: dict) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "gpu-check"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out)], cwd=tmp_path,
                          env={**env, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    return done, out


def test_gpu_check_without_a_gpu_says_so_runs_the_cpu_checks_and_writes_its_report(tmp_path, cli_env):
    done, out = run_check(tmp_path, cli_env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == ("gpu-check: no CUDA GPU here: running the CPU checks only "
                                           "(tiny settings), no GPU figures")
    record = json.loads((out / "record.json").read_text())
    assert record["gpu"] is False and record["mode"] == "cpu"
    bench = record["bench"]["8-eager"]
    assert bench["settings"]["device"] == "cpu"
    assert bench["resexp_images_per_s"] > 0 and bench["reference_images_per_s"] > 0
    # Every step it would take on a GPU is listed, with its fate.
    fates = {row["step"]: row["fate"] for row in record["steps"]}
    assert fates["bench 8-eager"] == "measured" and fates["sweep one-at-a-time"] == "measured"
    assert fates["bench 56-graphed"] == "skipped" and fates["CUDA tests"] == "skipped"
    runs = record["sweeps"]["runs"]["one-at-a-time"]
    assert sorted(runs) == ["plain-8-s0", "resnet-8-s0"]
    assert all(run["status"] == "done" and run["images_per_s"] > 0 for run in runs.values())
    report = (out / "report.md").read_text()
    assert "| bench 8-eager | measured |" in report and "| bench 110-graphed | skipped |" in report
    assert "resexp / reference pipeline" in report and "plain-8-s0" in report
    # One folder, few files (a remote runner brings back at most 8), and nothing left in TMPDIR.
    assert {path.name for path in out.iterdir()} == REPORT_FILES
    assert (out / "curves.png").stat().st_size > 0 and (out / "error_vs_depth.png").stat().st_size > 0
    assert not list(tmp_path.glob("resexp-gpu-check.*"))


def test_gpu_check_on_a_machine_whose_gpu_torch_cannot_use_fails_and_says_why(tmp_path, cli_env):
    """An NVIDIA driver is loaded, torch sees no GPU: that is no CPU machine, and the check must not pass."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "nvidia-version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.183.01  "
                                         "Release Build  (dvs-builder@U16)\n")
    (hook / "sitecustomize.py").write_text(  # every Python the script starts sees that driver
        "import pathlib\nimport resexp.step\n"
        "resexp.step.NVIDIA_DRIVER_VERSION_FILE = pathlib.Path(__file__).with_name('nvidia-version')\n")
    env = {key: value for key, value in cli_env.items() if key != "CUDA_VISIBLE_DEVICES"}
    done, out = run_check(tmp_path, {**env, "PYTHONPATH": str(hook)})
    assert done.returncode == 1, done.stderr
    assert "torch cannot use the GPU" in done.stderr
    record = json.loads((out / "record.json").read_text())
    assert record["mode"] == "unusable" and "535.183.01" in record["environment"]["unusable_gpu"]
    assert "535.183.01" in (out / "report.md").read_text()
    assert not record["bench"] and not record["sweeps"]["runs"]

