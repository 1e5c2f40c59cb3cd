"""Sweeps: grid expansion and validation, stable folder names, resume semantics."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from resexp import cli
from resexp import config as config_module
from resexp.errors import UsageError
from resexp.sweep import expand_grid, parse_overrides, plan_jobs, sweep_name
from resexp.train import train

RESEXP = Path(sysconfig.get_path("scripts")) / "resexp"

DEFAULTS = {"arch": "plain,resnet"}


def compose(overrides):
    return config_module.compose(list(overrides))


def test_grid_is_plain_and_resnet_times_the_given_values():
    jobs, swept = expand_grid(DEFAULTS, ["depth=20,56,110", "seed=0,1"], [])
    assert len(jobs) == 2 * 3 * 2
    assert swept == ["arch", "depth", "seed"]
    assert ["arch=plain", "depth=56", "seed=1"] in jobs


def test_command_line_arch_replaces_the_default_pair():
    jobs, swept = expand_grid(DEFAULTS, ["arch=resnet", "depth=20,32"], [])
    assert jobs == [["arch=resnet", "depth=20"], ["arch=resnet", "depth=32"]]
    assert swept == ["depth"]


def test_excluded_runs_are_left_out():
    jobs, _ = expand_grid({"arch": "plain,resnet", "depth": "20,110"}, [], [{"arch": "plain", "depth": 110}])
    assert ["arch=plain", "depth=110"] not in jobs and len(jobs) == 3


def test_range_sweeps_expand():
    jobs, _ = expand_grid({}, ["arch=plain", "seed=range(0,3)"], [])
    assert [job[1] for job in jobs] == ["seed=0", "seed=1", "seed=2"]


def test_duplicate_keys_are_an_error():
    with pytest.raises(UsageError, match="depth is given twice"):
        expand_grid(DEFAULTS, ["depth=20", "depth=56"], [])


def test_every_bad_value_of_the_grid_is_reported_before_anything_runs():
    jobs, swept = expand_grid(DEFAULTS, ["depth=20,21,27", "schedule.lr=0.1,-1"], [])
    with pytest.raises(UsageError) as caught:
        plan_jobs(jobs, swept, compose)
    message = str(caught.value)
    assert "got 21" in message and "got 27" in message and "schedule.lr must be a positive number; got -1" in message
    assert "\n" not in message


def test_run_folders_are_named_from_config_values():
    jobs, swept = expand_grid(DEFAULTS, ["depth=20", "model.shortcut=A,B", "schedule=quick"], [])
    names = [job["run"] for job in plan_jobs(jobs, swept, compose)]
    assert names == ["plain-20-s0-shortcut_A", "plain-20-s0-shortcut_B",
                     "resnet-20-s0-shortcut_A", "resnet-20-s0-shortcut_B"]


def test_names_do_not_depend_on_how_overrides_were_typed():
    first = ["depth=20,56", "schedule=quick", "data.train_size=1000"]
    second = ["data.train_size=1000", "schedule=quick", "depth=20, 56"]
    assert sweep_name(parse_overrides(first)) == sweep_name(parse_overrides(second)) == \
        "train_size1000_depth20-56_quick"
    assert sweep_name(parse_overrides(["depth=8,20", "arch=plain,resnet", "data=imagefolder",
                                       "data.root=/data/cifar"])) == \
        "imagefolder_depth8-20"
    names = [[job["run"] for job in plan_jobs(*expand_grid(DEFAULTS, overrides, []), compose)]
             for overrides in (first, second)]
    assert sorted(names[0]) == sorted(names[1])
    assert not any(name.isdigit() for name in names[0])  # never Hydra's job number


def test_group_sweeps_name_runs_by_the_option():
    jobs, swept = expand_grid({}, ["arch=resnet", "schedule=smoke,quick"], [])
    assert sorted(job["run"] for job in plan_jobs(jobs, swept, compose)) == ["resnet-20-s0-quick", "resnet-20-s0-smoke"]


def test_rerun_skips_finished_continues_partial_and_retries_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["depth=8", "schedule=smoke", "data=synthetic", "progress=false", "device=cpu", "name=demo"]
    assert cli.main(["sweep", *args]) == 0
    sweep_dir = tmp_path / "outputs" / "demo"
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["plain-8-s0", "resnet-8-s0"]

    # plain-8: interrupted after 2 of 8 iterations; resnet-8: crashed before its first checkpoint.
    cfg = compose(["arch=plain", "depth=8", "schedule=smoke", "data=synthetic", "progress=false", "resume=false",
                   "device=cpu"])
    train(cfg, sweep_dir / "plain-8-s0", stop_after=2)
    failed = sweep_dir / "resnet-8-s0" / "result.json"
    failed.write_text(json.dumps({**json.loads(failed.read_text()), "status": "failed"}))
    (sweep_dir / "resnet-8-s0" / "checkpoint.pt").unlink()

    assert cli.main(["sweep", *args]) == 0
    outcomes = {job["run"]: job["outcome"] for job in json.loads((sweep_dir / "sweep.json").read_text())["runs"]}
    assert outcomes == {"plain-8-s0": "resumed", "resnet-8-s0": "trained"}
    assert cli.main(["sweep", *args]) == 0
    outcomes = {job["run"]: job["outcome"] for job in json.loads((sweep_dir / "sweep.json").read_text())["runs"]}
    assert outcomes == {"plain-8-s0": "skipped", "resnet-8-s0": "skipped"}
    table = capsys.readouterr().out
    assert "plain-8-s0" in table and "skipped" in table
    for name in ("curves.png", "error_vs_depth.png", "summary.md", "summary.csv"):
        assert (sweep_dir / name).stat().st_size > 0


# --- what a sweep will cost -----------------------------------------------------------------------

def test_the_eta_weighs_the_runs_left_by_their_cost(tmp_path):
    """After a cheap run took 10 s, two runs five times its cost take 100 s, not 20 s."""
    from resexp.estimate import eta_of_sweep

    for name, status in (("cheap", "done"), ("deep", None), ("deeper", None)):
        (tmp_path / name).mkdir()
        if status:
            (tmp_path / name / "result.json").write_text(json.dumps({"status": status, "wall_time_s": 10.0}))
    runs = [{"run": "cheap", "cost": 1.0}, {"run": "deep", "cost": 5.0}, {"run": "deeper", "cost": 5.0}]
    assert eta_of_sweep(tmp_path, runs) == pytest.approx(100.0)
    assert eta_of_sweep(tmp_path, runs[1:]) is None  # nothing finished yet: no rate to go by


def test_cost_counts_multiply_adds_and_the_iterations_left(tmp_path):
    from resexp.estimate import run_cost

    # smoke: 8 iterations of 32 images, an evaluation of the 500 synthetic test images every 4 (a third each).
    shallow, deep = (compose(["arch=resnet", f"depth={depth}", "schedule=smoke", "data=synthetic"]) for depth in (20, 56))
    assert run_cost(deep) / run_cost(shallow) == pytest.approx(125.5 / 40.6, rel=0.01)  # the paper's MACs
    assert run_cost(shallow) == pytest.approx(40.6e6 * (32 * 8 + 2 * 500 / 3), rel=0.01)
    (tmp_path / "result.json").write_text(json.dumps({"iterations": 8, "iterations_done": 6}))
    assert run_cost(shallow, tmp_path) == pytest.approx(40.6e6 * (32 * 2 + 500 / 3), rel=0.01)


def test_a_long_cpu_sweep_is_told_its_cost_and_the_quick_way():
    from resexp.estimate import cost_line, run_cost

    paper = compose(["arch=resnet", "depth=20", "device=cpu"])
    line = cost_line([paper], [run_cost(paper)])
    assert line.startswith("estimated wall time: about") and "this CPU" in line
    assert "experiment=laptop" in line and "schedule=quick" in line and "\n" not in line  # 64k iterations: hours
    quick = compose(["arch=resnet", "depth=8", "schedule=quick", "device=cpu"])
    assert "experiment=laptop" not in cost_line([quick], [run_cost(quick)])
    smoke = compose(["arch=resnet", "depth=8", "schedule=smoke", "data=synthetic", "device=cpu"])
    assert cost_line([smoke], [run_cost(smoke)]) is None  # seconds: nothing worth saying


def test_the_quick_way_keeps_the_users_data_options_and_is_never_the_preset_already_running(monkeypatch):
    from resexp import estimate

    monkeypatch.setattr(estimate, "seconds_per_cost_apart", lambda cfg: 1e-6)  # a slow CPU: hours for anything
    offline = compose(["arch=resnet", "depth=20", "device=cpu", "data=imagefolder", "data.root=my images"])
    line = estimate.cost_line([offline], [estimate.run_cost(offline)])
    assert "resexp sweep experiment=laptop data=imagefolder 'data.root=my images' shows" in line  # copied as printed
    laptop = compose(["experiment=laptop", "device=cpu", "data=imagefolder", "data.root=my images"])
    line = estimate.cost_line([laptop], [estimate.run_cost(laptop)])
    assert line.startswith("estimated wall time") and "experiment=laptop" not in line


def test_each_net_costs_at_a_rate_between_a_small_and_a_large_measured_net(monkeypatch):
    """A small net's step is mostly overhead: measured alone, it would make the large nets look dearer."""
    from resexp import estimate

    measured = []
    rates = {8: 5e-11, 20: None, 32: 3.5e-11}  # seconds per multiply-add: 8 layers do less per second

    def measure(cfg):
        measured.append((cfg.arch, cfg.depth))
        return rates[cfg.depth]

    monkeypatch.setattr(estimate, "seconds_per_cost_apart", measure)
    nets = {depth: compose([f"depth={depth}", "device=cpu", "schedule.batch_size=64"]) for depth in (8, 20, 32)}
    sized = [(cfg, estimate.macs_per_image(cfg)) for cfg in nets.values()]
    probes = estimate.probe(sized)
    assert measured == [("resnet", 8), ("resnet", 32)]
    assert estimate.rate_at(probes[0].macs, probes) == 5e-11 and estimate.rate_at(probes[1].macs, probes) == 3.5e-11
    assert 3.5e-11 < estimate.rate_at(estimate.macs_per_image(nets[20]), probes) < 5e-11
    assert estimate.rate_at(10 * probes[1].macs, probes) == 3.5e-11  # held beyond the probes

    measured.clear()
    rates[8] = 1e-6  # a slow machine: a 32-layer step would take seconds, so it is not measured
    assert [p.cfg.depth for p in estimate.probe(sized)] == [8] and measured == [("resnet", 8)]


def test_the_cost_line_says_when_other_programs_kept_the_cpu_busy_while_it_measured(monkeypatch):
    from resexp import estimate
    from resexp.machine import OtherPrograms, usable_cores

    laptop = compose(["experiment=laptop", "device=cpu", "data=imagefolder", "data.root=my images"])
    monkeypatch.setattr(estimate, "seconds_per_cost_apart", lambda cfg: 1e-10)  # about 10 minutes
    monkeypatch.setattr(OtherPrograms, "cores_busy", lambda self: 1.2)
    line = estimate.cost_line([laptop], [estimate.run_cost(laptop)])
    assert f"other programs kept 1.2 of this CPU's {usable_cores()} cores busy while it was measured" in line
    assert "experiment=laptop" not in line  # never the preset already running
    monkeypatch.setattr(OtherPrograms, "cores_busy", lambda self: 0.1)  # a quiet machine's own noise
    assert "other programs" not in estimate.cost_line([laptop], [estimate.run_cost(laptop)])


def test_a_long_cpu_sweep_from_a_terminal_asks_first_and_no_is_the_default(tmp_path, cli_env):
    """In a terminal, the paper's schedule on a CPU (days) asks before anything is written; Enter says no."""
    import os
    import pty

    main, terminal = pty.openpty()
    out = tmp_path / "out"
    sweep = subprocess.Popen([str(RESEXP), "sweep", "depth=20", "data=synthetic", "progress=false", f"out={out}"],
                             stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
    os.close(terminal)
    os.write(main, b"\n")  # Enter: the default answer
    try:
        _, err = sweep.communicate(timeout=300)
    finally:
        os.close(main)
    assert sweep.returncode == 1, err
    assert "start it? [y/N]" in err and "not started; nothing was written" in err and "--yes" in err
    assert not out.exists()


def test_the_question_is_asked_of_long_cpu_sweeps_in_a_terminal_only(monkeypatch):
    from resexp.estimate import ASK_BEYOND_S, ASSUME_YES_VARIABLE, Estimate, confirmed_to_start

    asked = []

    def answer(text):
        asked.append(text)
        return "y"

    monkeypatch.delenv(ASSUME_YES_VARIABLE, raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    assert confirmed_to_start(Estimate(2 * ASK_BEYOND_S, True, "line"), ask=answer) and len(asked) == 1
    assert confirmed_to_start(Estimate(ASK_BEYOND_S / 2, True, "line"), ask=answer) and len(asked) == 1
    assert confirmed_to_start(Estimate(2 * ASK_BEYOND_S, False, "line"), ask=answer) and len(asked) == 1  # a GPU
    assert not confirmed_to_start(Estimate(2 * ASK_BEYOND_S, True, "line"), ask=lambda text: "")
    monkeypatch.setenv(ASSUME_YES_VARIABLE, "1")  # resexp sweep --yes
    assert confirmed_to_start(Estimate(2 * ASK_BEYOND_S, True, "line"), ask=answer) and len(asked) == 1
    monkeypatch.delenv(ASSUME_YES_VARIABLE)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)  # a script, CI, a cluster job
    assert confirmed_to_start(Estimate(2 * ASK_BEYOND_S, True, "line"), ask=answer) and len(asked) == 1


def test_the_sweep_command_says_what_it_will_cost_before_training(tmp_path, cli_env):
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-m", "resexp", "sweep", "depth=8", "data=synthetic", "device=cpu",
               "progress=false", f"out={tmp_path}"]
    sweep = subprocess.Popen(command, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in sweep.stderr:  # the paper's 64k iterations: hours on a CPU
        lines.append(line)
        if line.startswith("["):  # the first run starts: the estimate came before it, or not at all
            break
    sweep.send_signal(signal.SIGINT)
    sweep.communicate(timeout=300)
    estimates = [line for line in lines if line.startswith("estimated wall time: about")]
    assert len(estimates) == 1 and "2 runs on this CPU" in estimates[0] and "experiment=laptop" in estimates[0], lines


def test_the_config_files_alone_say_which_keys_a_job_has_and_what_the_papers_net_is():
    """Adding an option touches the YAML, not a list of keys or defaults in the code."""
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    job = OmegaConf.to_container(compose([]), resolve=False)
    composed = {key for key in leaves(job) if not key.startswith(("sweep.", "launcher."))}
    assert composed == set(config_module.required_keys())
    assert config_module.model_defaults() == job["model"]
    for data in ("imagefolder", "synthetic"):  # every data set and schedule has the keys too
        assert set(config_module.required_keys()) <= set(leaves(OmegaConf.to_container(
            compose([f"data={data}", "schedule=smoke"]), resolve=False)))


def test_a_sweep_over_list_values_trains_each_in_its_own_folder(tmp_path, monkeypatch):
    """Values with commas in them ([2,4]) end up in folder names, which go to Hydra quoted."""
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "arch=resnet", "depth=8", "schedule=smoke", "data=synthetic", "progress=false",
                     "device=cpu", "schedule.milestones=[2,4],[3,5]"]) == 0
    [sweep_dir] = list((tmp_path / "outputs").iterdir())
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 2 and all("milestones" in run.name for run in runs)
    assert [list(OmegaConf.load(run / "config.yaml").schedule.milestones) for run in runs] == [[2, 4], [3, 5]]
