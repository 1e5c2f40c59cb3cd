"""An installed (non-editable) wheel carries its Hydra configs as ``resexp.conf``.

The configs live in the top-level ``conf/`` folder and are mapped into the package at
build time. An editable install reads them from the source tree, so it would hide a
wheel that forgot them; these tests build a wheel, install it into a fresh virtual
environment that cannot see the editable install, and run it away from the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Top-level entries of the working tree that are not part of a build.
NOT_SOURCES = {".git", "build", "dist", "outputs", "multirun", "data", ".venv", "venv", ".pytest_cache", "tests"}


def copy_sources(destination: Path) -> None:
    """The working tree without VCS data, build leftovers, caches and results."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__" or name.endswith(".egg-info")}
        if Path(folder) == REPO:
            skipped |= NOT_SOURCES & set(names)
        return skipped

    shutil.copytree(REPO, destination, ignore=ignore, symlinks=True)


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def describe(done: subprocess.CompletedProcess) -> str:
    return (f"$ {' '.join(map(str, done.args))}\n[exit code {done.returncode}]\n"
            f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory, cli_env):
    """(wheel path, venv python, venv resexp, env, a work folder outside the repository)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {**cli_env}

    # Build from a copy, so that the build writes nothing into the shared working tree.
    source = root / "source"
    copy_sources(source)
    dist = root / "dist"
    built = run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                 "--outdir", dist, source], root, env)
    assert built.returncode == 0, describe(built)
    wheels = sorted(dist.glob("resexp-*.whl"))
    assert len(wheels) == 1, describe(built)

    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], root, env)
    assert made.returncode == 0, describe(made)
    python = venv / "bin" / "python"
    # Install before the new venv can see any other package: pip must find resexp not yet installed.
    pip = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
               "--disable-pip-version-check", wheels[0]], root, env)
    assert pip.returncode == 0, describe(pip)

    # Now borrow torch, Hydra & co. from this environment. Its site-packages is added as a
    # plain path: its own .pth files (among them the editable install's finder) are not run,
    # and the new venv's site-packages comes first on sys.path.
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env)
    assert purelib.returncode == 0, describe(purelib)
    borrowed = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib.stdout.strip()) / "_borrowed_site_packages.pth").write_text("\n".join(borrowed) + "\n")

    work = root / "work"
    work.mkdir()
    return wheels[0], python, venv / "bin" / "resexp", env, work, venv


def test_wheel_ships_every_config_file(installed):
    """Every YAML file of conf/ (and the sweeper plugin) is in the wheel under resexp/conf/."""
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"resexp/conf/" + path.relative_to(REPO / "conf").as_posix()
                for path in (REPO / "conf").rglob("*.yaml")}
    assert {"resexp/conf/config.yaml", "resexp/conf/experiment/figure6.yaml",
            "resexp/conf/hydra/sweeper/resexp.yaml"} <= expected
    assert sorted(expected - names) == []
    assert "hydra_plugins/resexp_sweeper/resexp_sweeper.py" in names


def test_wheel_is_what_the_new_venv_imports(installed):
    """The new venv imports resexp, its configs and its sweeper from the wheel, not from the source tree."""
    _, python, _, env, work, venv = installed
    probe = (
        "import sys, importlib.resources, resexp, resexp.cli, hydra_plugins.resexp_sweeper.resexp_sweeper as s\n"
        "print(resexp.__file__); print(resexp.cli.__file__); print(s.__file__)\n"
        "print(importlib.resources.files('resexp.conf').joinpath('config.yaml'))\n"
        "print(*[type(f).__module__ for f in sys.meta_path])\n"
    )
    done = run([python, "-c", probe], work, env)
    assert done.returncode == 0, describe(done)
    *files, finders = done.stdout.strip().splitlines()
    for file in files:
        assert Path(file).resolve().is_relative_to(venv.resolve()), describe(done)
    assert "__editable__" not in finders, describe(done)


def test_wheel_train_cfg_job_finds_the_packaged_configs(installed):
    """``resexp train --cfg job`` from an unrelated folder composes the packaged config."""
    _, _, resexp, env, work, _ = installed
    done = run([resexp, "train", "--cfg", "job"], work, env)
    assert done.returncode == 0, describe(done)
    assert "arch: resnet" in done.stdout and "depth: 20" in done.stdout, describe(done)
    assert list(work.iterdir()) == [], describe(done)


def test_wheel_train_help_lists_the_packaged_config_groups(installed):
    """Config groups are found inside the installed package (each group's options listed)."""
    _, _, resexp, env, work, _ = installed
    done = run([resexp, "train", "--help"], work, env)
    assert done.returncode == 0, describe(done)
    for group in ("data", "schedule", "experiment"):
        options = ", ".join(sorted(path.stem for path in (REPO / "conf" / group).glob("*.yaml")))
        assert f"{group}: {options}" in done.stdout, describe(done)


def test_wheel_sweep_cfg_job_finds_the_packaged_configs(installed):
    """``resexp sweep --cfg job`` from an unrelated folder composes the packaged config and sweeper."""
    _, _, resexp, env, work, _ = installed
    done = run([resexp, "sweep", "--cfg", "job"], work, env)
    assert done.returncode == 0, describe(done)
    assert "arch: resnet" in done.stdout, describe(done)
    assert list(work.iterdir()) == [], describe(done)
