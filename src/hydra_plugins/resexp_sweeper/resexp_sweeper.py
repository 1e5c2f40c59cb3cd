"""resexp's Hydra sweeper: Hydra's basic grid sweeper with resexp's rules (see resexp.sweep).

Hydra finds sweepers only under the ``hydra_plugins`` package; the logic lives in
``resexp.sweep``, imported when a sweep starts so that Hydra's plugin scan stays cheap.
"""

from pathlib import Path
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf


class ResexpSweeper(BasicSweeper):
    def __init__(self, max_batch_size=None, params=None, exclude=None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.exclude = [dict(rule) for rule in (exclude or [])]

    def sweep(self, arguments: List[str]) -> Any:
        from resexp import sweep as resexp_sweep
        from resexp.errors import UsageError, exit_with

        loader = self.hydra_context.config_loader

        def compose(overrides):
            return loader.load_sweep_config(self.config, list(overrides))

        try:
            jobs, swept = resexp_sweep.expand_grid(dict(self.params or {}), arguments, self.exclude)
            planned = resexp_sweep.plan_jobs(jobs, swept, compose)
        except UsageError as error:
            exit_with(error)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        record = {"name": sweep_dir.name, "arguments": list(arguments), "swept": swept, "runs": planned}
        resexp_sweep.write_sweep_record(sweep_dir, record)

        results = []
        batches = self.split_overrides_to_chunks([job["overrides"] for job in planned], self.max_batch_size)
        for batch in batches:
            results += self.launcher.launch(batch, initial_job_idx=len(results))
        resexp_sweep.write_sweep_record(sweep_dir, resexp_sweep.finished_record(sweep_dir, record, results))
        return [results]
