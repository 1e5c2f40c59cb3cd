"""Shared fixtures for the tests that run the installed ``resexp`` command."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for ``resexp`` subprocesses: no traceback switches, no GPU, one thread each.

    Tracebacks are opt-in (HYDRA_FULL_ERROR / RESEXP_TRACEBACK), so a developer's shell
    must not turn them on for tests that check the one-line errors. Hiding GPUs makes
    ``device=cuda`` an error on every machine. Several commands run at once, so each
    keeps to one CPU thread.
    """
    env = {key: value for key, value in os.environ.items()
           if key not in ("HYDRA_FULL_ERROR", "RESEXP_TRACEBACK", "PYTHONPATH")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return env


@pytest.fixture(autouse=True)
def threads_that_stay_put(monkeypatch):
    """In-process runs keep the CPU threads they start with, as an explicit OMP_NUM_THREADS makes them
    (resexp steps down to fewer beside other busy programs, and the count changes the order of float
    sums): a test comparing two runs compares like with like. Tests of stepping down unset it."""
    from resexp.machine import usable_cores

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS") or str(usable_cores()))


@pytest.fixture
def hydra_in_process():
    """For tests that call ``resexp.cli.main`` in this process: Hydra configures logging and keeps
    global state; put both back afterwards so that later tests start clean."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    loggers = [logging.getLogger(), logging.getLogger("hydra")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    GlobalHydra.instance().clear()


@pytest.fixture
def counted_compiles(monkeypatch):
    """torch.compile with a backend that records each graph it is handed and runs it as it is: how
    many times a net was compiled, without the minutes a real compile takes on a CPU."""
    compiled = []

    def counting_backend(graph_module, example_inputs):
        compiled.append(graph_module)
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counting_backend))
    yield compiled
    torch.compiler.reset()


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: from now on, files cannot be made in ``folder`` or below (EACCES), as in
    a read-only folder; chmod cannot show that to tests run as root, whom permissions do not stop."""
    import errno
    import tempfile
    from pathlib import Path

    from omegaconf import OmegaConf

    folders = []
    real_mkstemp, real_save = tempfile.mkstemp, OmegaConf.save

    def refuse(path) -> None:
        path = Path(path).absolute()
        if any(path == folder or folder in path.parents for folder in folders):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    def mkstemp(*args, dir=None, **kwargs):
        refuse(Path(dir or tempfile.gettempdir()) / "x")
        return real_mkstemp(*args, dir=dir, **kwargs)

    def save(config, f, *args, **kwargs):
        refuse(f)
        return real_save(config, f, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(OmegaConf, "save", save)
    return lambda folder: folders.append(Path(folder).absolute())
