"""Watching runs as they train: TensorBoard and MLflow (``logger=...``, the ``tracking`` extra).

A run opens its trackers once its folder is set up (``open_trackers``, at the iteration it
resumes from), hands each evaluation's metrics line to ``log``, says when a checkpoint is on
disk (``checkpointed``) and how the run stands (``ended``: running, done, diverged,
interrupted, failed). When a sweep's figures are drawn, ``log_figures`` hands them to the
loggers of its runs. Each backend imports its package only when a run selects it.

Resume is exact in the loggers as it is in metrics.jsonl:

- TensorBoard: a resumed session's writer starts with ``purge_step`` = checkpoint iteration + 1,
  which makes TensorBoard's readers drop the earlier sessions' events from that step on (the
  evaluations after the checkpoint, which the resumed run computes again).
- MLflow keeps every value it is sent and cannot delete one, so an evaluation is sent only once
  the checkpoint that covers it is on disk: an interrupted session leaves in MLflow exactly the
  evaluations that the resumed one will not compute again. The MLflow run's id is kept in the
  run folder (``MLFLOW_RUN``), so a resumed run continues that MLflow run, never a second one.

A logger that fails (a server down, a full disk under its folder) never stops training: one
warning line, that logger is off for the rest of the session, and the failure is recorded in
the run folder (``LOGGER_ERRORS``), where ``resexp status`` reads it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .files import ENV, LOGGER_ERRORS, METRICS, MLFLOW_RUN, RESULT, atomic_write_json, read_json, read_jsonl

LOGGERS = ("tensorboard", "mlflow")  # the options of the logger config group (conf/logger/)
EXTRA = "pip install 'resexp[tracking]'"
ENDINGS = ("done", "diverged", "interrupted", "failed")  # the statuses after which a session logs nothing more
MLFLOW_STATUS = {"running": "RUNNING", "done": "FINISHED", "diverged": "FAILED", "failed": "FAILED",
                 "interrupted": "KILLED"}
FIGURES_RUN = "figures"  # the TensorBoard run of a sweep's figures, beside its runs


def selected(cfg: DictConfig) -> list[str]:
    """The loggers a config selects (none by default)."""
    return list(OmegaConf.select(cfg, "logger", default=None) or {})


def missing_package_problems(cfg: DictConfig) -> list[str]:
    """One line per selected logger whose package is not installed (the check before anything trains)."""
    from importlib.util import find_spec

    return [f"logger={name} needs the tracking extra: {EXTRA}" for name in selected(cfg) if find_spec(name) is None]


def scalars(metrics: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl line under the names both loggers show them by."""
    named = {"error/train": metrics["train_error"], "error/test": metrics["test_error"],
             "loss/train": metrics["train_loss"], "loss/test": metrics["test_loss"], "lr": metrics["lr"],
             "images_per_s": metrics["images_per_s"]}
    norms = metrics.get("grad_norms") or []
    width = len(str(len(norms)))  # layer_01 ... layer_20: listed in depth order
    named.update({f"grad_norm/layer_{i:0{width}d}": norm for i, norm in enumerate(norms, start=1)})
    # images/s is None for an interval that held only a session's first step (compiling): not a speed.
    return {name: float(value) for name, value in named.items() if value is not None}


def flat_config(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """The resolved config as dotted keys and plain values, as TensorBoard's hparams and MLflow's params take them."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


def sweep_name(cfg: DictConfig, run_dir: Path) -> str:
    """The folder that groups the run: its sweep's, or for a lone run its own."""
    return run_dir.parent.name if cfg.sweep.size else run_dir.name


# --- the loggers of one run ---------------------------------------------------------------------

class Trackers:
    """The loggers a run selected; a logger that raises is reported once and dropped."""

    def __init__(self, run_dir: Path, loggers: list):
        self.run_dir = run_dir
        self.loggers = loggers

    def log(self, metrics: dict) -> None:
        self._each("log", metrics)

    def checkpointed(self, iteration: int) -> None:
        self._each("checkpointed", iteration)

    def ended(self, status: str, result: dict) -> None:
        self._each("ended", status, result)

    def _each(self, method: str, *args) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as error:  # noqa: BLE001 - a logger never stops training
                self.loggers.remove(logger)
                logger_failed(self.run_dir, logger.name, error)


def open_trackers(cfg: DictConfig, run_dir: Path, iteration: int) -> Trackers:
    """The run's loggers, opened at ``iteration`` (0: a fresh start, which forgets earlier logs)."""
    if iteration == 0:
        (run_dir / LOGGER_ERRORS).unlink(missing_ok=True)
    loggers = []
    for name in selected(cfg):
        try:
            loggers.append(BACKENDS[name](cfg, run_dir, iteration))
        except Exception as error:  # noqa: BLE001 - a logger never stops training
            logger_failed(run_dir, name, error)
    return Trackers(run_dir, loggers)


def logger_failed(run_dir: Path, name: str, error: BaseException) -> None:
    """One warning line, and the failure recorded for resexp status (if even that can be written)."""
    message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    print(f"warning: {run_dir.name}: logger {name} failed ({message}); training goes on without it",
          file=sys.stderr, flush=True)
    try:
        path = run_dir / LOGGER_ERRORS
        atomic_write_json(path, {**(read_json(path) if path.exists() else {}), name: message})
    except (OSError, ValueError):
        pass


# --- TensorBoard --------------------------------------------------------------------------------

def tensorboard_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """Where a run's event files go: its own folder, or <log_dir>/<sweep>/<run> (<log_dir>/<run> alone)."""
    log_dir = cfg.logger.tensorboard.log_dir
    if log_dir is None:
        return run_dir
    return Path(log_dir).absolute() / (Path(sweep_name(cfg, run_dir), run_dir.name) if cfg.sweep.size
                                       else run_dir.name)


def _summary_writer(log_dir: Path, purge_step: int | None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step)


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, cfg: DictConfig, run_dir: Path, iteration: int):
        log_dir = tensorboard_dir(cfg, run_dir)
        if iteration == 0:  # a fresh start: an earlier run's curves in this folder are not this run's
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        first = not any(log_dir.glob("events.out.tfevents.*"))  # a fresh start, or the logger added on resume
        # Resumed: readers drop the events of earlier sessions from the checkpoint's next step on.
        self.writer = _summary_writer(log_dir, iteration + 1 if iteration else None)
        if first:
            from torch.utils.tensorboard.summary import hparams

            config = OmegaConf.to_container(cfg, resolve=True)
            self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```", 0)
            for summary in hparams(flat_config(config), {"error/train": 0.0, "error/test": 0.0}):
                self.writer.file_writer.add_summary(summary, 0)
            for metrics in read_jsonl(run_dir / METRICS):  # the evaluations before this logger was selected
                self.log(metrics)
            self.writer.flush()

    def log(self, metrics: dict) -> None:
        for tag, value in scalars(metrics).items():
            self.writer.add_scalar(tag, value, metrics["iteration"])
        self.writer.flush()  # a sweep is watched while it trains

    def checkpointed(self, iteration: int) -> None:
        pass  # resume is handled by purge_step when the writer is opened

    def ended(self, status: str, result: dict) -> None:
        if status in ENDINGS:
            self.writer.close()


def tensorboard_figures(log_dir: Path, figures: list[Path], step: int) -> None:
    """The sweep's figures as images of one TensorBoard run beside its runs, at the iteration they show.
    Figures drawn again at this step or an earlier one replace those drawn later (purge_step)."""
    import numpy as np
    from PIL import Image

    writer = _summary_writer(log_dir, step)
    try:
        for path in figures:
            image = np.asarray(Image.open(path).convert("RGB"))
            writer.add_image(path.stem, image, step, dataformats="HWC")
    finally:
        writer.close()


# --- MLflow -------------------------------------------------------------------------------------

def mlflow_client(tracking_uri: str):
    import logging

    # A server that is down is reported after a few seconds, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    for name in ("mlflow", "alembic"):  # the local store's set-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def mlflow_store(cfg: DictConfig) -> tuple[str, str | None]:
    """The tracking URI and, for the default local store, where artifacts go: absolute paths under
    ``out``, so that every job of a sweep (on this machine or a cluster node) finds the same store."""
    uri = cfg.logger.mlflow.tracking_uri
    if uri is not None:
        return str(uri), None
    out = Path(cfg.out).absolute()
    return f"sqlite:///{out / 'mlflow.db'}", (out / "mlflow-artifacts").as_uri()


def mlflow_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of the sweep's experiment, made by whoever comes first (the sweep, or a lone run)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        found = client.get_experiment_by_name(name)  # made meanwhile by a run started beside this one
        if found is None:
            raise
        return found.experiment_id


def prepare_sweep(configs: list[DictConfig], sweep_dir: Path) -> None:
    """Before a sweep's runs start (side by side, or on cluster nodes): its MLflow experiment, and a
    local store's tables, made once here rather than by every run at the same moment."""
    for uri, artifact_location in {mlflow_store(cfg) for cfg in configs if "mlflow" in selected(cfg)}:
        _warn_on_failure(f"the MLflow experiment {sweep_dir.name} was not made before the runs",
                         lambda: mlflow_experiment(mlflow_client(uri), sweep_dir.name, artifact_location))


class MlflowLogger:
    name = "mlflow"
    batch_size = 1000  # MLflow takes at most 1,000 metrics per log_batch

    def __init__(self, cfg: DictConfig, run_dir: Path, iteration: int):
        from mlflow.entities import Param

        tracking_uri, artifact_location = mlflow_store(cfg)
        self.client = mlflow_client(tracking_uri)
        self.run_dir = run_dir
        self.pending: list[dict] = []  # evaluations not yet covered by a checkpoint
        kept = run_dir / MLFLOW_RUN
        if iteration and kept.exists():  # resumed: the same MLflow run
            self.run_id = read_json(kept)["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = mlflow_experiment(self.client, sweep_name(cfg, run_dir), artifact_location)
            env = read_json(run_dir / ENV) if (run_dir / ENV).exists() else {}
            tags = {"arch": cfg.arch, "depth": cfg.depth, "seed": cfg.seed, "status": "running",
                    "git_sha": env.get("git_sha"), "mlflow.source.git.commit": env.get("git_sha"),
                    "device": env.get("device_name") or env.get("device")}
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={key: str(value) for key, value in tags.items() if value is not None})
            self.run_id = run.info.run_id
            atomic_write_json(kept, {"run_id": self.run_id, "tracking_uri": tracking_uri})
            params = [Param(key, str(value)) for key, value in
                      flat_config(OmegaConf.to_container(cfg, resolve=True)).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                self.client.log_batch(self.run_id, params=params[start:start + 100])
            self.pending = read_jsonl(run_dir / METRICS)  # the logger added on resume: the evaluations before
            self.checkpointed(iteration)

    def log(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def checkpointed(self, iteration: int) -> None:
        """Send the evaluations the checkpoint covers: a resumed run never computes them again."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        covered = [m for m in self.pending if m["iteration"] <= iteration]
        self.pending = [m for m in self.pending if m["iteration"] > iteration]
        self._send([Metric(name, value, now, m["iteration"]) for m in covered for name, value in scalars(m).items()])

    def _send(self, metrics: list) -> None:
        for start in range(0, len(metrics), self.batch_size):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + self.batch_size])

    def ended(self, status: str, result: dict) -> None:
        self.client.set_tag(self.run_id, "status", status)
        if status not in ENDINGS:
            return
        # Evaluations after the last checkpoint are left out: a resumed run computes them again.
        self.pending = []
        if status in ("done", "diverged"):
            from mlflow.entities import Metric

            now, step = int(time.time() * 1000), result.get("iterations_done") or 0
            self._send([Metric(key, float(value), now, step) for key, value in result.items()
                        if key.startswith(("final_", "best_")) and isinstance(value, (int, float))])
        if (self.run_dir / RESULT).exists():
            self.client.log_artifact(self.run_id, str(self.run_dir / RESULT))
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[status])


BACKENDS = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}


# --- a sweep's figures --------------------------------------------------------------------------

def log_figures(runs: list, figures: list[str]) -> None:
    """Hand the figures just drawn (PNG files) to the loggers of the sweep's runs.

    ``runs`` are plots.RunRecord: each run's config.yaml says which loggers it used. MLflow: the
    figures become artifacts of each run. TensorBoard: images of one run named ``figures`` beside
    the sweep's runs, at the furthest iteration they show. A failure is one warning line: the
    figures on disk are what counts.
    """
    figures = [Path(path) for path in figures if str(path).endswith(".png")]
    step = max((m["iteration"] for run in runs for m in run.metrics), default=0)
    for run in runs:
        selected = run.config.get("logger") or {}
        if "mlflow" in selected and (run.path / MLFLOW_RUN).exists():
            _warn_on_failure(f"{run.name}: figures not logged to mlflow",
                             lambda kept=run.path / MLFLOW_RUN: mlflow_artifacts(kept, figures))
    in_sweep = [run for run in runs if "tensorboard" in (run.config.get("logger") or {})
                and (run.config.get("sweep") or {}).get("size")]
    if in_sweep and figures:
        log_dir = tensorboard_dir(OmegaConf.create(in_sweep[0].config), in_sweep[0].path).parent / FIGURES_RUN
        _warn_on_failure("figures not logged to tensorboard", lambda: tensorboard_figures(log_dir, figures, step))


def mlflow_artifacts(kept: Path, files: list[Path]) -> None:
    """Add files to the MLflow run whose id the run folder keeps (``kept``), under figures/."""
    run = read_json(kept)
    client = mlflow_client(run["tracking_uri"])
    for path in files:
        client.log_artifact(run["run_id"], str(path), artifact_path="figures")


def _warn_on_failure(what: str, action) -> None:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the figures are drawn; a logger is extra
        print(f"warning: {what} ({type(error).__name__}: {error})", file=sys.stderr)
