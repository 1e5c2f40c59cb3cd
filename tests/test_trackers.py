"""The loggers (logger=tensorboard | mlflow | [tensorboard,mlflow]), read back with the tools' own readers.

What is logged is read with TensorBoard's EventAccumulator and MLflow's client, against a SQLite
store and against a real ``mlflow server`` that a test starts and stops on 127.0.0.1. The tests
that need the tracking extra skip without it; the config checks run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from resexp import config as config_module
from resexp import sweep as sweep_module
from resexp import train as train_module
from resexp.errors import UsageError
from resexp.files import LOGGER_ERRORS, MLFLOW_RUN
from resexp.train import train

EXTRA = "needs the tracking extra: pip install 'resexp[tracking]'"
# Evaluations every 2 iterations, checkpoints every 4: a crash at 8 leaves evaluations 6 and 8 past the checkpoint.
SMALL = ["data=synthetic", "schedule=smoke", "progress=false", "device=cpu", "depth=8", "schedule.milestones=[]",
         "schedule.iterations=12", "schedule.eval_every=2", "schedule.checkpoint_every=4"]
EVALUATIONS = [2, 4, 6, 8, 10, 12]
SERVER_START_S = 90  # a busy 2-core machine starts mlflow server in 10 to 30 s


def compose(tmp_path, *overrides):
    return config_module.compose([*SMALL, f"out={tmp_path / 'out'}", *overrides])


@pytest.fixture
def event_accumulator():
    module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator", reason=EXTRA)
    return module.EventAccumulator


@pytest.fixture
def mlflow_client():
    client = pytest.importorskip("mlflow.tracking", reason=EXTRA).MlflowClient
    for name in ("mlflow", "alembic"):
        import logging

        logging.getLogger(name).setLevel(logging.WARNING)
    return client


def metric_steps(run_dir):
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def only_run(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def pretend_installed(monkeypatch, *installed: str) -> None:
    """The tracking packages the config check finds: those named, whatever this machine has."""
    real_find_spec = importlib.util.find_spec
    tracking = ("tensorboard", "mlflow")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        (object() if name in installed else None) if name in tracking else real_find_spec(name, *args)))


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the run catches it, so nothing is closed or ended."""


# --- the config: no extra needed -----------------------------------------------------------------

def test_logger_group_composes_and_changes_no_run_name_nor_resume(tmp_path, monkeypatch):
    pretend_installed(monkeypatch, "tensorboard", "mlflow")
    plain = compose(tmp_path)
    both = compose(tmp_path, "logger=[tensorboard,mlflow]")
    assert dict(plain.logger) == {} and config_module.problems(plain) == []
    assert config_module.problems(both) == []
    assert set(both.logger) == {"tensorboard", "mlflow"}
    assert both.logger.mlflow.tracking_uri is None and both.logger.tensorboard.log_dir is None
    assert config_module.run_name(both) == config_module.run_name(plain)
    from omegaconf import OmegaConf

    saved, now = (OmegaConf.to_container(c, resolve=True) for c in (plain, both))
    assert config_module.config_differences(saved, now) == []  # adding a logger resumes the same run
    jobs, swept = sweep_module.expand_grid({}, ["depth=8", "logger=[tensorboard,mlflow]"], [])
    assert len(jobs) == 1 and swept == []
    assert sweep_module.sweep_name(sweep_module.parse_overrides(["depth=8", "logger=[tensorboard,mlflow]"])) == "depth8"
    with pytest.raises(UsageError, match=r"logger=\[tensorboard,mlflow\]"):
        sweep_module.expand_grid({}, ["logger=tensorboard,mlflow"], [])
    assert config_module.unknown_key_line("logger.mlflow.tracking_uri") == \
        "logger.mlflow.tracking_uri is a key of logger=mlflow, which is not selected; add logger=mlflow " \
        "(or logger=[...] with it)"


def test_a_logger_without_its_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, hydra_in_process):
    from resexp import cli

    pretend_installed(monkeypatch, "tensorboard")
    line = "logger=mlflow needs the tracking extra: pip install 'resexp[tracking]'"
    assert config_module.problems(compose(tmp_path, "logger=[tensorboard,mlflow]")) == [line]
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", *SMALL, f"out={tmp_path / 'out'}", "logger=mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"resexp: error: {line}\n"
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


# --- a run, interrupted and resumed: one curve, one MLflow run --------------------------------------

def test_a_crashed_and_resumed_run_is_one_curve_and_one_mlflow_run(tmp_path, monkeypatch, event_accumulator,
                                                                     mlflow_client):
    cfg = compose(tmp_path, "logger=[tensorboard,mlflow]")
    run_dir = tmp_path / "out" / "run"
    real_save = train_module.save_checkpoint

    def killed_at_8(path, checkpoint):
        if checkpoint["iteration"] == 8:
            raise Killed  # evaluations 6 and 8 are logged, the last checkpoint is at 4
        real_save(path, checkpoint)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_at_8)
    with pytest.raises(Killed):
        train(cfg, run_dir)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert metric_steps(run_dir) == [2, 4, 6, 8]
    assert train(cfg, run_dir)["outcome"] == "resumed"
    assert metric_steps(run_dir) == EVALUATIONS

    # TensorBoard: two sessions' event files, read as one curve with each evaluation once, as metrics.jsonl has it.
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    events = event_accumulator(str(run_dir))
    events.Reload()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("error/test", "test_error"), ("error/train", "train_error"), ("lr", "lr")):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == \
            [(m["iteration"], pytest.approx(m[key])) for m in lines]
    assert [e.step for e in events.Scalars("grad_norm/layer_1")] == EVALUATIONS
    config_text = events.Tensors("config/text_summary")  # the resolved config, once
    assert len(config_text) == 1 and b"depth: 8" in config_text[0].tensor_proto.string_val[0]

    # MLflow: the one run of the experiment, continued, every evaluation once, ended as done.
    client = mlflow_client(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run = only_run(client, "run")
    assert run.info.run_id == json.loads((run_dir / MLFLOW_RUN).read_text())["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    history = client.get_metric_history(run.info.run_id, "error/test")
    assert sorted((m.step, m.value) for m in history) == \
        [(m["iteration"], pytest.approx(m["test_error"])) for m in lines]
    result = json.loads((run_dir / "result.json").read_text())
    assert run.data.metrics["final_test_error"] == pytest.approx(result["final_test_error"])
    assert run.data.params["depth"] == "8" and run.data.params["schedule.eval_every"] == "2"
    env = json.loads((run_dir / "env.json").read_text())
    assert {key: run.data.tags.get(key) for key in ("arch", "depth", "seed", "status", "device", "git_sha")} == \
        {"arch": "resnet", "depth": "8", "seed": "0", "status": "done", "device": env["device_name"],
         "git_sha": env["git_sha"]}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["result.json"]

    # A finished run that a rerun skips logs nothing new.
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    assert train(cfg, run_dir)["outcome"] == "skipped"
    assert sorted(run_dir.glob("events.out.tfevents.*")) == files
    assert len(client.get_metric_history(run.info.run_id, "error/test")) == len(EVALUATIONS)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_loggers_added_to_a_resumed_run_get_its_earlier_evaluations(tmp_path, event_accumulator, mlflow_client):
    run_dir = tmp_path / "out" / "run"
    assert train(compose(tmp_path), run_dir, stop_after=6)["outcome"] == "stopped"
    assert train(compose(tmp_path, "logger=[tensorboard,mlflow]"), run_dir)["outcome"] == "resumed"
    events = event_accumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("error/test")] == EVALUATIONS
    client = mlflow_client(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run = only_run(client, "run")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "error/test")) == EVALUATIONS


def test_a_diverged_run_ends_its_mlflow_run_as_failed(tmp_path, mlflow_client):
    cfg = compose(tmp_path, "logger=mlflow", "schedule.lr=1e12", "arch=plain")
    run_dir = tmp_path / "out" / "run"
    assert train(cfg, run_dir)["outcome"] == "diverged"
    run = only_run(mlflow_client(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"), "run")
    assert (run.info.status, run.data.tags["status"]) == ("FAILED", "diverged")


def test_a_failing_logger_warns_once_and_the_run_trains_on(tmp_path, monkeypatch, capsys, event_accumulator):
    """A full disk under the log dir: one warning line, the run and its own files complete, status names the logger."""
    from torch.utils.tensorboard import SummaryWriter

    from resexp.status import status_command

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    log_dir = tmp_path / "events"
    cfg = compose(tmp_path, "logger=tensorboard", f"logger.tensorboard.log_dir={log_dir}")
    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full)
    run_dir = tmp_path / "out" / "full"
    assert train(cfg, run_dir)["outcome"] == "trained"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "logger tensorboard failed" in line]
    assert warnings == ["warning: full: logger tensorboard failed (OSError: [Errno 28] No space left on device); "
                        "training goes on without it"]
    assert metric_steps(run_dir) == EVALUATIONS
    assert json.loads((run_dir / "result.json").read_text())["status"] == "done"
    assert list((log_dir / "full").glob("events.out.tfevents.*"))  # the configured log dir, <log_dir>/<run>
    assert status_command([str(run_dir)]) == 0
    assert "full: logger tensorboard failed: OSError: [Errno 28] No space left on device" in capsys.readouterr().out
    assert config_module.problems(compose(tmp_path, "logger=tensorboard",
                                          f"logger.tensorboard.log_dir={run_dir / 'result.json'}")) == \
        [f"logger.tensorboard.log_dir={run_dir / 'result.json'} cannot hold event files: "
         f"{run_dir / 'result.json'} is a file, not a folder; give a folder for them"]


# --- a sweep: its runs side by side, its figures --------------------------------------------------

def test_a_sweep_logs_every_run_and_its_figures(tmp_path, cli_env, event_accumulator, mlflow_client):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    resexp = Path(sysconfig.get_path("scripts")) / "resexp"
    out = tmp_path / "out"
    done = subprocess.run([str(resexp), "sweep", "depth=8", "schedule=smoke", "data=synthetic", "progress=false",
                           f"out={out}", "name=tracked", "logger=[tensorboard,mlflow]"],
                          capture_output=True, text=True, timeout=300, env=cli_env)
    assert done.returncode == 0, done.stderr
    sweep_dir = out / "tracked"
    runs = EventMultiplexer().AddRunsFromDirectory(str(sweep_dir))
    runs.Reload()
    assert sorted(runs.Runs()) == ["figures", "plain-8-s0", "resnet-8-s0"]  # named as the run folders
    assert sorted(runs.Runs()["figures"]["images"]) == ["curves", "error_vs_depth"]
    assert [e.step for e in runs.Scalars("plain-8-s0", "error/test")] == [4, 8]

    client = mlflow_client(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")
    mlflow_runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in mlflow_runs) == ["plain-8-s0", "resnet-8-s0"]
    for run in mlflow_runs:
        assert run.info.status == "FINISHED"
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "figures")) == \
            ["figures/curves.png", "figures/error_vs_depth.png"]


# --- a real tracking server, up and then down ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, mlflow_client):
    """``mlflow server`` on 127.0.0.1, started for the test and stopped after it; yields its URI."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start on {uri} within {SERVER_START_S} s")
                time.sleep(0.5)
        yield uri, server
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    import os
    import signal

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and the workers it started
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_a_tracking_server_and_a_server_that_goes_down(tmp_path, monkeypatch, capsys, mlflow_server, mlflow_client):
    from resexp.status import status_command

    uri, server = mlflow_server
    cfg = compose(tmp_path, "logger=mlflow", f"logger.mlflow.tracking_uri={uri}")
    run_dir = tmp_path / "out" / "run"
    assert train(cfg, run_dir, stop_after=6)["outcome"] == "stopped"
    assert train(cfg, run_dir)["outcome"] == "resumed"
    client = mlflow_client(uri)
    run = only_run(client, "run")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "error/test")) == EVALUATIONS
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["result.json"]

    # The server goes down: one warning line, the run trains to the end, status names the logger.
    stop(server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    capsys.readouterr()
    down_dir = tmp_path / "out" / "down"
    assert train(cfg, down_dir)["outcome"] == "trained"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "logger mlflow failed" in line]
    assert len(warnings) == 1, warnings
    assert metric_steps(down_dir) == EVALUATIONS
    assert json.loads((down_dir / "result.json").read_text())["status"] == "done"
    assert set(json.loads((down_dir / LOGGER_ERRORS).read_text())) == {"mlflow"}
    assert status_command([str(down_dir)]) == 0
    assert "down: logger mlflow failed" in capsys.readouterr().out
