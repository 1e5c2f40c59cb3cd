"""What a newcomer meets at the gate: bad command lines refused in this process, before Hydra
or any run starts, with one line, exit code 2 and nothing written."""

from __future__ import annotations

import pytest

from resexp import cli

SMALL = ["data=synthetic", "schedule=smoke", "depth=8", "progress=false"]


def refused(capsys, tmp_path, *args: str) -> str:
    """The one error line of ``resexp ARGS`` (with out= a fresh folder), checking exit code 2 and
    that nothing was written."""
    out = tmp_path / "out"
    code = cli.main([*args, f"out={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resexp: error: "), err
    assert not out.exists(), sorted(out.rglob("*"))  # no run folder, no .hydra/
    return lines[0].removeprefix("resexp: error: ")


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_options_of_other_trainers_are_mapped_to_ours(capsys, tmp_path, command, hydra_in_process):
    line = refused(capsys, tmp_path, command, "experiment=laptop", "--epochs", "10")
    assert line.startswith("options are KEY=VALUE, not --epochs 10; for epochs, use schedule.iterations=N"), line
    assert "about 390 iterations" in line
    line = refused(capsys, tmp_path, command, *SMALL, "epochs=10")
    assert line.startswith("unknown key 'epochs': use schedule.iterations=N: resexp counts iterations, not epochs")
    line = refused(capsys, tmp_path, command, *SMALL, "lr=0.1", "batch_size=64", "num_workers=4")
    assert line == ("unknown keys 'lr': did you mean schedule.lr?; 'batch_size': did you mean schedule.batch_size?; "
                    "'num_workers': resexp has no such key: it keeps the images in memory and needs no data-loader "
                    "workers (--cfg job prints every key)")


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_keys_added_with_a_plus_are_checked_like_any_other(capsys, tmp_path, command, hydra_in_process):
    assert refused(capsys, tmp_path, command, *SMALL, "+foo=1").startswith("unknown key 'foo': ")
    assert refused(capsys, tmp_path, command, *SMALL, "+model.depht=20") == \
        "unknown key 'model.depht': did you mean depth? (--cfg job prints every key)"


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_names_a_file_system_cannot_hold_are_refused(capsys, tmp_path, command, hydra_in_process):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").touch()
    line = refused_in(capsys, out, command, *SMALL, "name=x")
    assert f"name=x: {out / 'x'} is a file, not a folder; give another name= or move the file" in line
    line = refused_in(capsys, out, command, *SMALL, "name=" + "n" * 300)
    assert "is 300 bytes long; a folder name may have at most 255" in line
    for name in ("a\nb", "'a\tb'"):
        line = refused_in(capsys, out, command, *SMALL, f"name={name}")
        assert "holds a control character" in line
    assert sorted(p.name for p in out.iterdir()) == ["x"]


def test_a_file_where_a_sweeps_run_folder_goes_is_refused(capsys, tmp_path, hydra_in_process):
    out = tmp_path / "out"
    (out / "s").mkdir(parents=True)
    (out / "s" / "plain-8-s0").touch()
    line = refused_in(capsys, out, "sweep", *SMALL, "name=s")
    assert f"{out / 's' / 'plain-8-s0'} is a file where the run's folder goes" in line
    assert sorted(p.name for p in (out / "s").iterdir()) == ["plain-8-s0"]


def test_status_of_a_name_past_the_length_limit(capsys, tmp_path):
    assert cli.main(["status", str(tmp_path / ("n" * 300))]) == 2
    assert capsys.readouterr().err == f"resexp: error: {tmp_path / ('n' * 300)}: File name too long\n"


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, cli_env):
    import os
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_plots import make_run

    for seed in range(3):
        make_run(tmp_path, f"plain-20-s{seed}", "plain", 20, seed, [0.5], [0.5])
    read, write = os.pipe()
    os.close(read)  # the reader is gone before resexp writes its first line
    try:
        done = subprocess.run([str(Path(sysconfig.get_path("scripts")) / "resexp"), "status", str(tmp_path)],
                              stdout=write, stderr=subprocess.PIPE, text=True, env=cli_env, timeout=120)
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode == 141


def refused_in(capsys, out, *args: str) -> str:
    code = cli.main([*args, f"out={out}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_a_quoted_sweep_name_with_spaces_and_accents_is_the_folders_name(capsys, tmp_path, hydra_in_process):
    assert cli.main(["sweep", *SMALL, "arch=resnet", "name='my sweep é'", f"out={tmp_path}"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["my sweep é"]
    assert (tmp_path / "my sweep é" / "summary.md").is_file()


def test_a_finished_sweep_in_a_read_only_folder_is_shown_without_writing(capsys, tmp_path, read_only,
                                                                          hydra_in_process):
    command = ["sweep", *SMALL, "arch=resnet", "name=done", f"out={tmp_path}"]
    assert cli.main(command) == 0
    sweep = tmp_path / "done"
    before = {path: path.stat().st_mtime_ns for path in sweep.rglob("*")}
    capsys.readouterr()
    read_only(sweep)
    assert cli.main(command) == 0
    err = capsys.readouterr().err
    assert "all 1 runs are finished; nothing to train, and nothing recorded: " \
           f"{sweep} is read-only (Permission denied)" in err
    assert f"figures not drawn: {sweep} is read-only" in err
    assert "free some space" not in err and "Traceback" not in err
    assert {path: path.stat().st_mtime_ns for path in sweep.rglob("*")} == before


def test_env_json_records_the_command_the_user_typed(tmp_path, monkeypatch, hydra_in_process):
    """A sweep's runs train in job processes started by the scheduler; their env.json still
    records the resexp command."""
    import json

    from resexp.files import COMMAND_VARIABLE

    monkeypatch.delenv(COMMAND_VARIABLE, raising=False)  # put back as it was afterwards
    monkeypatch.setenv(COMMAND_VARIABLE, "[]")
    typed = ["sweep", *SMALL, "arch=resnet", "name=typed", f"out={tmp_path}"]
    assert cli.main(typed) == 0
    (env,) = [json.loads(path.read_text()) for path in (tmp_path / "typed").glob("*/env.json")]
    assert env["command"] == ["resexp", *typed]


def no_space(monkeypatch, module, name: str, after: int = 0):
    """``module.name`` (a write helper) fails as on a full disk from its call number ``after`` + 1 on."""
    import errno

    real = getattr(module, name)
    calls = []

    def write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, write)


@pytest.mark.parametrize("full_at", ["sweep.json", "figures"])
def test_a_full_disk_at_the_end_of_a_sweep_is_one_line_and_the_same_command_completes(
        capsys, tmp_path, monkeypatch, hydra_in_process, full_at):
    from resexp import plots, sweep

    command = ["sweep", *SMALL, "arch=resnet", "name=full", f"out={tmp_path}"]
    with monkeypatch.context() as patch:
        if full_at == "sweep.json":  # its first write (the plan) fits; the last (the outcomes) does not
            no_space(patch, sweep, "atomic_write_json", after=1)
        else:  # room for the curves, not for the rest
            no_space(patch, plots, "atomic_write_text")
            no_space(patch, plots, "atomic_write", after=2)
        assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("resexp: ")]
    assert f"the disk holding {tmp_path / 'full'} is full (No space left on device); free some space and run " \
           "the same command" in line
    assert cli.main(command) == 0
    for name in ("sweep.json", "curves.png", "error_vs_depth.png", "summary.md"):
        assert (tmp_path / "full" / name).is_file(), name


def image_folder(root, extra: int = 0):
    from PIL import Image

    for split in ("train", "test"):
        for label, colour in (("cat", (40, 80, 120)), ("dog", (120, 80, 40))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(2 + extra):
                Image.new("RGB", (32, 32), colour).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_data_root_that_cannot_hold_the_data_is_refused_at_the_gate(capsys, tmp_path, command, hydra_in_process):
    (tmp_path / "a-file").touch()
    (tmp_path / "no-splits").mkdir()
    for root, reason in ((tmp_path / "a-file", "it is a file, not a folder"),
                         (tmp_path / "missing", "it does not exist"),
                         (tmp_path / "no-splits", "it has no train/ or test/ folder")):
        line = refused(capsys, tmp_path, command, "experiment=laptop", "data=imagefolder", f"data.root={root}")
        assert f"data.root={root} cannot be the data for data=imagefolder: {reason}" in line
        assert line.count("data.root=") == 1  # said once for the whole sweep


def test_a_finished_run_counts_for_a_moved_copy_of_its_images_not_for_other_images(tmp_path):
    import shutil

    from resexp import config as config_module
    from resexp.errors import UsageError
    from resexp.train import check_same_images

    trained_on = image_folder(tmp_path / "images")
    saved = {"data": {"name": "imagefolder", "root": str(trained_on)}}
    copy = tmp_path / "copy"
    shutil.copytree(trained_on, copy, copy_function=shutil.copy)  # new modification times, the same images
    other = image_folder(tmp_path / "other", extra=1)

    def check(root):
        cfg = config_module.compose(["data=imagefolder", f"data.root={root}"])
        check_same_images(saved, cfg, tmp_path / "run")

    check(copy)
    with pytest.raises(UsageError, match=f"was trained on data.root={trained_on}, and data.root={other} holds "
                                         "other images"):
        check(other)
    shutil.rmtree(trained_on)  # moved away: nothing to compare with
    check(other)
