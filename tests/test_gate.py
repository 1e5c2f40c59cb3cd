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
