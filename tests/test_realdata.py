"""Checks on the real CIFAR-10 images (the JPEG copy in ../shared/data): slow, left out by default.

Run them with ``.venv/bin/python -m pytest -m realdata``. They use ``data/cifar10-jpeg`` when it
is unpacked there (its decoded cache too), else unpack ../shared/data/cifar10-jpeg.tar.xz into a
temporary folder, and skip when neither is there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from resexp.files import RESULT, read_result

pytestmark = pytest.mark.realdata

ROOT = Path(__file__).resolve().parent.parent
UNPACKED = ROOT / "data" / "cifar10-jpeg"
JPEG_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def calibration_script():
    spec = importlib.util.spec_from_file_location("laptop_calibration", ROOT / "scripts" / "laptop_calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cifar10_jpeg(tmp_path_factory) -> Path:
    if (UNPACKED / "train").is_dir() and (UNPACKED / "test").is_dir():
        return UNPACKED
    if not JPEG_TAR.is_file():
        pytest.skip(f"no CIFAR-10 JPEG copy: neither {UNPACKED} nor {JPEG_TAR}")
    folder = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(JPEG_TAR) as tar:
        tar.extractall(folder, filter="data")
    return folder


def test_the_laptop_preset_shows_the_papers_three_findings_for_seed_0(cifar10_jpeg, tmp_path):
    # All cores, threads as a user's run sets them (the preset is calibrated so).
    env = {key: value for key, value in os.environ.items()
           if key not in ("HYDRA_FULL_ERROR", "RESEXP_TRACEBACK", "OMP_NUM_THREADS")}
    ran = subprocess.run([sys.executable, "-m", "resexp", "sweep", "experiment=laptop", "data=imagefolder",
                          f"data.root={cifar10_jpeg}", "seed=0", f"out={tmp_path}", "name=laptop", "progress=false"],
                         env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    runs = {(r["arch"], r["depth"]): r for r in map(read_result, (tmp_path / "laptop").glob(f"*/{RESULT}"))}
    assert sorted(runs) == [("plain", 8), ("plain", 32), ("resnet", 8), ("resnet", 32)]
    script = calibration_script()
    found = script.findings(runs)
    assert found["degradation"] >= script.DEGRADATION_MIN, found  # plain-32 trains worse than plain-8
    assert found["cure"] >= script.CURE_MIN, found  # ResNet-32 trains better than plain-32
    assert found["deeper"] >= script.DEEPER_MIN, found  # ResNet-32 trains better than ResNet-8
    points = (tmp_path / "laptop" / "resnet-32-s0" / "metrics.jsonl").read_text().splitlines()
    assert len(points) >= 12  # curves fine enough to read
    title = (tmp_path / "laptop" / "summary.md").read_text()
    assert "2,500" in title or "part of CIFAR-10's training set" in title  # says what was reduced
