"""scripts/gpu-check.sh in its no-GPU mode: the script a GPU machine runs must not rot between GPU checks."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_a_gpu_says_so_runs_the_cpu_checks_and_writes_its_report(tmp_path, cli_env):
    out = tmp_path / "gpu-check"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out)], cwd=tmp_path,
                          env={**cli_env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == ("gpu-check: no CUDA GPU here: running the CPU checks only "
                                           "(tiny settings), no GPU figures")
    record = json.loads((out / "record.json").read_text())
    assert record["gpu"] is False
    (bench,) = [value for key, value in record["bench"].items() if key.endswith("-eager")]
    assert bench["resexp_images_per_s"] > 0 and bench["reference_images_per_s"] > 0
    runs = record["sweep"]["runs"]
    assert sorted(runs) == ["plain-8-s0", "resnet-8-s0"]
    assert all(run["status"] == "done" for run in runs.values())
    report = (out / "report.md").read_text()
    assert "resexp / reference pipeline" in report and "plain-8-s0" in report
    assert (out / "curves.png").stat().st_size > 0 and (out / "error_vs_depth.png").stat().st_size > 0
