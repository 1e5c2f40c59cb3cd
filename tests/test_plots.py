"""Tests for resexp.plots: the numbers each figure and table shows, from fabricated run folders."""

from __future__ import annotations

import csv
import json
import math
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg

from resexp import plots
from resexp.errors import UsageError
from resexp.plots import (
    PAPER_RESNET_TEST_ERROR,
    auto_ymax,
    curves_data,
    depth_data,
    error_vs_depth_data,
    load_runs,
    render_all,
    summary_rows,
)

MILESTONES = [400, 600]
ITERATIONS = 800


PAPER_SCHEDULE = {"name": "paper", "iterations": 64000, "milestones": [32000, 48000], "lr": 0.1, "gamma": 0.1,
                  "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128}


def make_run(root, name, arch, depth, seed, train, test, *, eval_every=100, status="done",
             shortcut="A", write_result=True, result_extra=None, schedule_name="test", family="cifar",
             schedule=None, data=None):
    """A run folder with one evaluation per value of ``train``/``test`` (fractions); ``schedule``
    and ``data`` replace config values (``schedule=PAPER_SCHEDULE``: trained as the paper did)."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "arch": arch, "depth": depth, "seed": seed,
        # Where and how a run was launched differs per run and must not split groups.
        "out": str(root), "name": name, "device": f"cuda:{seed}",
        "sweep": {"keys": ["arch", "depth", "seed"], "size": seed + 7},
        "model": {"shortcut": shortcut, "width": 16, "family": family},
        "schedule": {"name": schedule_name, "iterations": ITERATIONS, "milestones": MILESTONES,
                     "lr": 0.1, "batch_size": 128, "eval_every": eval_every},
        "data": {"name": "cifar10", "root": f"/data/{seed}"},
    }
    config["schedule"].update(schedule or {})
    config["data"].update(data or {})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for index, (tr, te) in enumerate(zip(train, test), start=1):
        rows.append({"iteration": index * eval_every, "epoch": index * 0.25, "lr": 0.1,
                     "train_loss": 1.0, "train_error": tr, "test_loss": 1.0, "test_error": te,
                     "eval_set": "test", "time_s": 10.0 * index, "images_per_s": 1000.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if write_result:
        result = {"status": status, "arch": arch, "depth": depth, "seed": seed, "shortcut": shortcut,
                  "parameters": 1000 * depth, "iterations": ITERATIONS,
                  "iterations_done": len(rows) * eval_every,
                  "final_train_error": train[-1] if train else None,
                  "final_test_error": test[-1] if test else None,
                  "best_test_error": min(test) if test else None,
                  "wall_time_s": 10.0 * len(rows), "images_per_s": 1000.0,
                  "error": None, "diverged_at": None}
        result.update(result_extra or {})
        (run / "result.json").write_text(json.dumps(result))
    return run


def ramp(start, end, n=8):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def find_line(data, arch, depth):
    lines = [l for p in data["panels"] for l in p["lines"] if l["arch"] == arch and l["depth"] == depth]
    assert len(lines) == 1, lines
    return lines[0]


def find_series(data, arch):
    series = [s for s in data["series"] if s["arch"] == arch]
    assert len(series) == 1, series
    return series[0]


def texts_outside(fig):
    """The texts of a figure, as drawn, that reach past its edges (the PNG would cut them off).

    Only texts that are really drawn count: matplotlib keeps labels of hidden axes and of
    ticks outside the view, which never reach the image.
    """
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    drawn = {}
    draw_text = renderer.draw_text

    def recording(gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if mtext is not None and s.strip():
            drawn[id(mtext)] = mtext
        return draw_text(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    renderer.draw_text = recording
    fig.draw(renderer)
    box = fig.bbox
    outside = []
    for text in drawn.values():
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1 or extent.y0 < box.y0 - 1 or extent.y1 > box.y1 + 1:
            outside.append(text.get_text())
    assert drawn, "no text was drawn: the check would pass for any figure"
    return outside


def keep_figures(monkeypatch, module):
    """Every figure that ``module`` fits and saves from now on, in a list."""
    figures = []
    fit_titles = plots.fit_titles

    def fit_and_keep(fig, *args, **kwargs):
        fit_titles(fig, *args, **kwargs)
        figures.append(fig)

    monkeypatch.setattr(module, "fit_titles", fit_and_keep)
    return figures


@pytest.fixture
def sweep(tmp_path):
    """plain-20 and plain-56 (2 seeds each), resnet-56 (2 seeds), resnet-20 (1 seed)."""
    root = tmp_path / "sweep"
    make_run(root, "plain-20-s0", "plain", 20, 0, ramp(0.5, 0.10), ramp(0.5, 0.12))
    make_run(root, "plain-20-s1", "plain", 20, 1, ramp(0.5, 0.12), ramp(0.5, 0.14))
    make_run(root, "plain-56-s0", "plain", 56, 0, ramp(0.6, 0.20), ramp(0.6, 0.22))
    make_run(root, "plain-56-s1", "plain", 56, 1, ramp(0.6, 0.24), ramp(0.6, 0.26))
    make_run(root, "resnet-20-s0", "resnet", 20, 0, ramp(0.5, 0.08), ramp(0.5, 0.10))
    make_run(root, "resnet-56-s0", "resnet", 56, 0, ramp(0.5, 0.04), ramp(0.5, 0.07))
    make_run(root, "resnet-56-s1", "resnet", 56, 1, ramp(0.5, 0.06), ramp(0.5, 0.09))
    (root / ".hydra").mkdir()
    (root / ".hydra" / "config.yaml").write_text("arch: plain\ndepth: 99\n")
    (root / "notes").mkdir()
    return root


# --- loading -----------------------------------------------------------------


def test_load_runs_finds_runs_and_ignores_other_folders(sweep):
    runs = load_runs(sweep)
    assert [r.name for r in runs] == [
        "plain-20-s0", "plain-20-s1", "plain-56-s0", "plain-56-s1",
        "resnet-20-s0", "resnet-56-s0", "resnet-56-s1",
    ]
    first = runs[0]
    assert (first.arch, first.depth, first.seed, first.status) == ("plain", 20, 0, "done")
    assert len(first.metrics) == 8 and first.result["parameters"] == 20000


def test_missing_result_means_running_and_torn_line_is_ignored(tmp_path):
    run = make_run(tmp_path, "resnet-32-s3", "resnet", 32, 3, [0.5, 0.4], [0.6, 0.5], write_result=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 300, "train_err')  # cut short by a crash
    (record,) = load_runs(tmp_path)
    assert (record.arch, record.depth, record.seed, record.status) == ("resnet", 32, 3, "running")
    assert record.result is None
    assert [m["iteration"] for m in record.metrics] == [100, 200]


def test_iterations_done_without_iterations_done_in_result(tmp_path):
    run = make_run(tmp_path, "r", "resnet", 20, 0, [0.5, 0.4, 0.3], [0.6, 0.5, 0.4], status="interrupted")
    result = json.loads((run / "result.json").read_text())
    del result["iterations_done"]
    (run / "result.json").write_text(json.dumps(result))
    (row,) = summary_rows(load_runs(tmp_path))
    assert (row["iterations_done_min"], row["iterations_planned"]) == (300, ITERATIONS)
    assert row["status"] == "interrupted" and row["final_test_error_pct"] == pytest.approx(40.0)


def test_unfinished_run_reports_its_latest_evaluation(tmp_path):
    # result.json written when the run (re)started lags behind metrics.jsonl.
    run = make_run(tmp_path, "r", "resnet", 20, 0, [0.5, 0.4, 0.3], [0.6, 0.5, 0.4], status="running",
                   result_extra={"final_train_error": 0.5, "final_test_error": 0.6, "iterations_done": 100})
    (row,) = summary_rows(load_runs(run))
    assert row["final_test_error_pct"] == pytest.approx(40.0)
    assert row["final_train_error_pct"] == pytest.approx(30.0)
    assert row["iterations_done_min"] == 300 and row["status"] == "running"


def test_single_run_folder_is_accepted(tmp_path):
    run = make_run(tmp_path, "plain-20-s0", "plain", 20, 0, [0.5], [0.6])
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("arch: plain\ndepth: 20\n")
    (record,) = load_runs(run)
    assert record.name == "plain-20-s0" and record.status == "done"


def test_no_runs_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no runs"):
        load_runs(tmp_path)
    with pytest.raises(UsageError, match="no such folder"):
        load_runs(tmp_path / "missing")


# --- curves ------------------------------------------------------------------


def test_curves_one_line_per_arch_depth_with_seed_mean(sweep):
    data = curves_data(load_runs(sweep))
    assert [p["arch"] for p in data["panels"]] == ["plain", "resnet"]
    assert [p["title"] for p in data["panels"]] == ["plain networks", "residual networks (ResNet)"]
    assert [len(p["lines"]) for p in data["panels"]] == [2, 2]
    assert all(p["milestones"] == MILESTONES for p in data["panels"])

    single = find_line(data, "resnet", 20)
    assert single["label"] == "ResNet-20" and single["n_seeds"] == 1
    assert single["iterations"] == [100 * i for i in range(1, 9)]
    assert single["train_error"] == pytest.approx([100 * v for v in ramp(0.5, 0.08)])
    assert single["test_error"] == pytest.approx([100 * v for v in ramp(0.5, 0.10)])

    averaged = find_line(data, "plain", 56)
    assert averaged["label"] == "plain-56" and averaged["n_seeds"] == 2
    expected = [100 * (a + b) / 2 for a, b in zip(ramp(0.6, 0.22), ramp(0.6, 0.26))]
    assert averaged["test_error"] == pytest.approx(expected)
    assert averaged["test_error"][-1] == pytest.approx(24.0)

    # One colour per depth, shared by both panels.
    assert find_line(data, "plain", 20)["colour"] == find_line(data, "resnet", 20)["colour"]
    assert find_line(data, "plain", 20)["colour"] != find_line(data, "plain", 56)["colour"]
    assert data["title"].startswith("CIFAR-10, 800 of the paper's 64,000 iterations (2.0 epochs), lr drops at 400, 600\n")


def test_seeds_are_averaged_on_common_iterations(tmp_path):
    make_run(tmp_path, "a", "resnet", 20, 0, [0.5, 0.4, 0.3], [0.6, 0.5, 0.4], write_result=False)
    make_run(tmp_path, "b", "resnet", 20, 1, [0.3, 0.2], [0.4, 0.3], write_result=False)
    line = find_line(curves_data(load_runs(tmp_path)), "resnet", 20)
    assert line["iterations"] == [100, 200]
    assert line["train_error"] == pytest.approx([40.0, 30.0])
    assert line["test_error"] == pytest.approx([50.0, 40.0])


def test_automatic_ymax():
    paper_like = {"train_error": [40.0, 5.0], "test_error": [45.0, 9.0]}
    quick = {"train_error": [80.0, 45.0], "test_error": [85.0, 52.0]}
    assert auto_ymax([paper_like]) == 20.0
    assert auto_ymax([paper_like, quick]) == 80.0  # 52 * 1.5 = 78 -> 80
    assert auto_ymax([{"train_error": [90.0], "test_error": [90.0]}]) == 100.0
    assert auto_ymax([{"train_error": [math.nan], "test_error": [math.nan]}]) == 20.0
    blown_up = {"train_error": [70.0, math.nan], "test_error": [75.0, math.nan], "diverged": True}
    assert auto_ymax([paper_like, blown_up]) == 20.0


def test_curves_ymax_automatic_or_given(tmp_path):
    make_run(tmp_path, "r", "resnet", 20, 0, ramp(0.9, 0.35), ramp(0.9, 0.40))
    runs = load_runs(tmp_path)
    assert curves_data(runs)["ymax"] == 60.0  # 40 * 1.5 = 60
    drawn = curves_data(runs, ymax=20.0)
    assert drawn["ymax"] == 20.0
    # Clipped, not rescaled: the drawn values are unchanged.
    assert drawn["panels"][0]["lines"][0]["test_error"][-1] == pytest.approx(40.0)


def test_diverged_run_is_shown_as_diverged(tmp_path):
    nan = float("nan")
    make_run(tmp_path, "plain-110-s0", "plain", 110, 0, [0.8, 0.85, nan], [0.8, 0.9, nan],
             status="diverged", result_extra={"final_train_error": None, "final_test_error": None,
                                              "best_test_error": 0.8, "diverged_at": 250})
    make_run(tmp_path, "plain-20-s0", "plain", 20, 0, [0.5, 0.4, 0.3], [0.6, 0.5, 0.4])
    make_run(tmp_path, "plain-20-s1", "plain", 20, 1, [0.5, 0.4, 0.2], [0.6, 0.5, 0.2],
             status="diverged", result_extra={"diverged_at": 300})
    runs = load_runs(tmp_path)

    line = find_line(curves_data(runs), "plain", 110)
    assert line["diverged"] and line["label"] == "plain-110 (diverged)"
    assert line["test_error"][:2] == pytest.approx([80.0, 90.0]) and math.isnan(line["test_error"][2])
    # A healthy seed beside a diverged one: the diverged seed is left out of the mean.
    healthy = find_line(curves_data(runs), "plain", 20)
    assert not healthy["diverged"] and healthy["runs"] == ["plain-20-s0"]

    series = find_series(depth_data(runs), "plain")
    assert series["depths"] == [20]
    assert series["left_out"] == [{"depth": 110, "reason": "diverged"}]

    rows = {r["depth"]: r for r in summary_rows(runs)}
    assert rows[110]["final_test_error_pct"] is None and rows[110]["n_seeds"] == 0
    assert rows[110]["status"] == "diverged at 250"
    assert rows[20]["final_test_error_pct"] == pytest.approx(40.0) and rows[20]["n_seeds"] == 1
    assert rows[20]["status"] == "1 done, 1 diverged at 300 (excluded)"


# --- error against depth -----------------------------------------------------


def test_depth_data_at_end_of_training(sweep):
    data = depth_data(load_runs(sweep))
    plain = find_series(data, "plain")
    assert plain["label"] == "plain" and plain["depths"] == [20, 56] and plain["n"] == [2, 2]
    assert plain["train_mean"] == pytest.approx([11.0, 22.0])
    assert plain["test_mean"] == pytest.approx([13.0, 24.0])
    sample_std = math.sqrt(2) * 1.0  # two values 2 points apart: std(ddof=1) = sqrt(2)
    assert plain["train_std"] == pytest.approx([sample_std, 2 * sample_std])
    resnet = find_series(data, "resnet")
    assert resnet["depths"] == [20, 56] and resnet["n"] == [1, 2]
    assert resnet["test_mean"] == pytest.approx([10.0, 8.0])
    assert resnet["test_std"] == pytest.approx([0.0, sample_std])


def test_unfinished_runs_are_marked_at_the_end_of_training(tmp_path):
    make_run(tmp_path, "done", "plain", 20, 0, [0.5] * 8, [0.6] * 8)
    make_run(tmp_path, "cut", "plain", 56, 0, [0.5, 0.4, 0.3], [0.6, 0.5, 0.4], status="interrupted")
    data = depth_data(load_runs(tmp_path))
    plain = find_series(data, "plain")
    assert plain["depths"] == [20, 56] and plain["unfinished"] == [None, 300]
    assert plain["test_mean"] == pytest.approx([60.0, 40.0])
    drawn = render_all(tmp_path)
    assert any(str(f).endswith("error_vs_depth.png") for f in drawn["files"])


def test_depth_data_at_a_fixed_iteration(sweep):
    runs = load_runs(sweep)
    data = depth_data(runs, at_iteration=450)  # evaluations every 100: the one at 400
    assert data["iterations_used"] == [400]
    plain = find_series(data, "plain")
    expected_train_56 = 100 * (ramp(0.6, 0.20)[3] + ramp(0.6, 0.24)[3]) / 2
    assert plain["train_mean"][1] == pytest.approx(expected_train_56)
    expected_std = 100 * abs(ramp(0.6, 0.20)[3] - ramp(0.6, 0.24)[3]) / math.sqrt(2)
    assert plain["train_std"][1] == pytest.approx(expected_std)


def test_run_that_has_not_reached_the_iteration_is_left_out(tmp_path):
    make_run(tmp_path, "a", "resnet", 20, 0, [0.5] * 8, [0.6] * 8)
    make_run(tmp_path, "b", "resnet", 20, 1, [0.3, 0.2], [0.4, 0.3], write_result=False)
    data = depth_data(load_runs(tmp_path), at_iteration=400)
    assert find_series(data, "resnet")["n"] == [1]
    assert find_series(data, "resnet")["test_mean"] == pytest.approx([60.0])


def test_error_vs_depth_defaults_to_first_milestone(sweep):
    drawn = error_vs_depth_data(load_runs(sweep))
    assert drawn["at"]["at_iteration"] == MILESTONES[0]
    assert drawn["at"]["iterations_used"] == [400]
    assert drawn["at"]["title"] == "(b) iteration 400, before the first lr drop"
    assert drawn["end"]["title"] == "(a) end of training (800 iter.)"
    assert find_series(drawn["end"], "plain")["test_mean"] == pytest.approx([13.0, 24.0])


def test_error_vs_depth_without_milestones_has_one_panel(tmp_path):
    run = make_run(tmp_path / "s", "r", "resnet", 20, 0, [0.5], [0.6])
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["schedule"]["milestones"] = []
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    drawn = error_vs_depth_data(load_runs(tmp_path / "s"))
    assert drawn["at"] is None and drawn["end"]["series"][0]["depths"] == [20]


# --- summary -----------------------------------------------------------------


def test_summary_numbers_and_paper_values(sweep):
    rows = {(r["arch"], r["depth"]): r for r in summary_rows(load_runs(sweep))}
    assert list(rows) == [("plain", 20), ("plain", 56), ("resnet", 20), ("resnet", 56)]
    plain56 = rows[("plain", 56)]
    assert plain56["n_seeds"] == 2 and plain56["seeds"] == "0;1"
    assert plain56["final_train_error_pct"] == pytest.approx(22.0)
    assert plain56["final_test_error_pct"] == pytest.approx(24.0)
    assert plain56["final_test_error_pct_std"] == pytest.approx(2 * math.sqrt(2))
    assert plain56["best_test_error_pct"] == pytest.approx(22.0)
    assert plain56["paper_test_error_pct"] is None
    assert plain56["status"] == "done" and plain56["parameters"] == 56000
    assert plain56["iterations_done_min"] == 800 and plain56["iterations_planned"] == ITERATIONS

    resnet56 = rows[("resnet", 56)]
    assert resnet56["paper_test_error_pct"] is None  # 800 iterations: Table 6 does not compare
    assert resnet56["final_test_error_pct"] == pytest.approx(8.0)
    resnet20 = rows[("resnet", 20)]
    assert resnet20["n_seeds"] == 1 and resnet20["final_test_error_pct_std"] is None


def test_other_config_differences_make_their_own_group(tmp_path):
    make_run(tmp_path, "resnet-20-s0", "resnet", 20, 0, [0.2], [0.3], schedule=PAPER_SCHEDULE)
    make_run(tmp_path, "resnet-20-s1", "resnet", 20, 1, [0.2], [0.3], schedule=PAPER_SCHEDULE)
    make_run(tmp_path, "resnet-20-s0-shortcut_B", "resnet", 20, 0, [0.1], [0.2], shortcut="B",
             schedule=PAPER_SCHEDULE)
    runs = load_runs(tmp_path)
    rows = summary_rows(runs)
    assert [(r["variant"], r["n_seeds"]) for r in rows] == [("", 2), ("shortcut B", 1)]
    assert rows[0]["paper_test_error_pct"] == 8.75 and rows[1]["paper_test_error_pct"] is None
    labels = [l["label"] for l in curves_data(runs)["panels"][0]["lines"]]
    assert labels == ["ResNet-20", "ResNet-20 (shortcut B)"]



def test_runs_are_grouped_by_the_keys_their_sweep_varied(tmp_path):
    """A key the sweep recorded in sweep.keys splits groups even outside the trained sections;
    the same difference without the record is where or how a run ran, and does not."""
    def runs_with_precisions(root, swept):
        for seed, precision in ((0, "fp32"), (1, "fp32"), (2, "bf16")):
            run = make_run(root, f"resnet-20-s{seed}-{precision}", "resnet", 20, seed, [0.2], [0.3])
            config = yaml.safe_load((run / "config.yaml").read_text())
            config["precision"] = precision
            config["sweep"]["keys"] = ["seed", "precision"] if swept else ["seed"]
            (run / "config.yaml").write_text(yaml.safe_dump(config))
        return summary_rows(load_runs(root))

    rows = runs_with_precisions(tmp_path / "swept", swept=True)
    assert [(r["variant"], r["n_seeds"]) for r in rows] == [("", 2), ("precision=bf16", 1)]
    rows = runs_with_precisions(tmp_path / "not_swept", swept=False)
    assert [(r["variant"], r["n_seeds"]) for r in rows] == [("", 3)]

# --- everything together -----------------------------------------------------


def test_render_all_writes_every_file(sweep):
    drawn = render_all(sweep)
    names = ["curves.png", "curves.pdf", "error_vs_depth.png", "error_vs_depth.pdf", "summary.md", "summary.csv"]
    for name in names:
        assert (sweep / name).stat().st_size > 0, name
    assert sorted(drawn["files"]) == sorted(str(sweep / n) for n in names)
    for name in ("curves.png", "error_vs_depth.png"):
        height, width = mpimg.imread(sweep / name).shape[:2]
        assert width >= 800 and 300 <= height <= width, (name, width, height)

    with open(sweep / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["arch"], r["depth"]) for r in table] == [("plain", "20"), ("plain", "56"),
                                                        ("resnet", "20"), ("resnet", "56")]
    assert float(table[3]["final_test_error_pct"]) == pytest.approx(8.0)
    assert table[3]["paper_test_error_pct"] == "" and table[3]["epochs_planned"] == "2.048"

    markdown = (sweep / "summary.md").read_text()
    assert markdown.startswith("Schedule: 800 of the paper's 64,000 iterations (2.0 epochs), each run.\n\n| model |")
    assert "| ResNet-56 |" in markdown and "8.00 ± 1.41" in markdown and "ddof=1" in markdown
    # Rendering again (e.g. while the sweep is running) still works with outputs in the folder.
    assert len(load_runs(sweep)) == 7


# --- figures that explain themselves ----------------------------------------


@pytest.mark.parametrize("archs", [("resnet",), ("plain", "resnet")])
def test_every_text_fits_inside_the_figure(tmp_path, monkeypatch, archs):
    """One panel leaves the least room for the titles: they are wrapped, never cut off."""
    for arch in archs:
        make_run(tmp_path, f"{arch}-20-s0", arch, 20, 0, ramp(0.5, 0.1), ramp(0.5, 0.12))
    make_run(tmp_path, "resnet-56-s0", "resnet", 56, 0, [], [], status="failed")
    figures = keep_figures(monkeypatch, plots)
    render_all(tmp_path)
    assert len(figures) == 2
    for fig in figures:
        assert texts_outside(fig) == []
    if len(archs) == 1:  # the curves' title is wider than one panel: it had to be wrapped
        assert figures[0]._suptitle.get_text().count("\n") >= 2


def test_figures_say_why_training_error_sits_above_test_error(sweep, monkeypatch):
    figures = keep_figures(monkeypatch, plots)
    render_all(sweep)
    for fig in figures:
        assert "augmented training batches" in " ".join(fig._suptitle.get_text().split())


def test_partial_sweep_curves_span_the_whole_schedule(tmp_path):
    make_run(tmp_path, "plain-20-s0", "plain", 20, 0, ramp(0.5, 0.3, 3), ramp(0.5, 0.3, 3), status="running")
    data = curves_data(load_runs(tmp_path))
    assert data["panels"][0]["lines"][0]["iterations"][-1] == 300
    assert data["x_max"] == ITERATIONS


def test_all_failed_sweep_draws_sensible_empty_figures_without_warnings(tmp_path, monkeypatch):
    for arch in ("plain", "resnet"):
        for depth in (20, 56):
            make_run(tmp_path, f"{arch}-{depth}-s0", arch, depth, 0, [], [], status="failed")
    figures = keep_figures(monkeypatch, plots)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matplotlib warning would reach the user's terminal
        drawn = render_all(tmp_path)
    end = drawn["depth"]["end"]
    assert end["depths_planned"] == [20, 56] and end["statuses"] == {"failed": 4}
    depth_axes = figures[1].axes[0]
    assert depth_axes.get_ylim() == (0, 100) and list(depth_axes.get_xticks()) == [20, 56]
    assert any("4 failed" in text.get_text() for text in depth_axes.texts)
    assert figures[0].axes[0].get_xlim() == (0, ITERATIONS)
    for fig in figures:
        assert texts_outside(fig) == []


def test_mlps_are_labelled_as_mlps_and_get_no_paper_values(tmp_path):
    for arch in ("plain", "resnet"):
        make_run(tmp_path, f"{arch}-20-s0", arch, 20, 0, ramp(0.5, 0.1), ramp(0.5, 0.12), family="mlp")
    runs = load_runs(tmp_path)
    curves = curves_data(runs)
    assert [p["title"] for p in curves["panels"]] == ["plain MLPs (fully connected)", "residual MLPs (fully connected)"]
    assert [l["label"] for p in curves["panels"] for l in p["lines"]] == ["plain MLP-20", "residual MLP-20"]
    assert [s["label"] for s in depth_data(runs)["series"]] == ["plain MLP", "residual MLP"]
    rows = summary_rows(runs)
    assert [(r["family"], r["paper_test_error_pct"]) for r in rows] == [("mlp", None), ("mlp", None)]
    render_all(tmp_path)
    markdown = (tmp_path / "summary.md").read_text()
    assert "| residual MLP-20 |" in markdown and "ResNet-20" not in markdown
    assert str(PAPER_RESNET_TEST_ERROR[20]) not in markdown.split("\n\n")[1]  # the table, not the notes


def test_paper_values_only_for_the_papers_nets(tmp_path):
    make_run(tmp_path, "resnet-20-s0", "resnet", 20, 0, ramp(0.5, 0.1), ramp(0.5, 0.12), schedule=PAPER_SCHEDULE)
    preact = make_run(tmp_path, "resnet-20-s0-preact", "resnet", 20, 0, ramp(0.5, 0.1), ramp(0.5, 0.12),
                      schedule=PAPER_SCHEDULE)
    config = yaml.safe_load((preact / "config.yaml").read_text())
    config["model"]["block"] = "preact"
    (preact / "config.yaml").write_text(yaml.safe_dump(config))
    rows = summary_rows(load_runs(tmp_path))
    assert [(r["variant"], r["paper_test_error_pct"]) for r in rows] == [("", 8.75), ("block=preact", None)]


@pytest.mark.parametrize("schedule, data, gap", [
    (PAPER_SCHEDULE, {}, None),
    ({**PAPER_SCHEDULE, "iterations": 1000, "milestones": [700, 900], "batch_size": 32}, {},
     "the runs trained 1,000 of the paper's 64,000 iterations (0.6 epochs), not the whole schedule"),
    (PAPER_SCHEDULE, {"train_size": 5000}, "the runs trained on 5,000 of the training images, the paper on all 50,000"),
    (PAPER_SCHEDULE, {"name": "imagefolder"}, "the runs trained on CIFAR-10 (imagefolder), not the paper's CIFAR-10"),
    ({**PAPER_SCHEDULE, "lr": 0.05}, {}, "the runs changed the paper's schedule (schedule.lr)"),
    ({**PAPER_SCHEDULE, "iterations": 1200, "milestones": [800, 1000], "batch_size": 64, "lr": 0.05},
     {"name": "imagefolder", "train_size": 2500},
     "the runs trained on CIFAR-10 (imagefolder), not the paper's CIFAR-10, and trained on 2,500 of the training "
     "images, the paper on all 50,000, and trained 1,200 of the paper's 64,000 iterations (31 epochs), not the "
     "whole schedule"),  # experiment=laptop offline
])
def test_summary_states_the_schedule_and_compares_with_table_6_only_for_the_papers_training(
        tmp_path, schedule, data, gap):
    for arch in ("plain", "resnet"):
        make_run(tmp_path, f"{arch}-32-s0", arch, 32, 0, ramp(0.9, 0.5), ramp(0.9, 0.579),
                 schedule=schedule, data=data)
    runs = load_runs(tmp_path)
    assert plots.paper_comparison_gap(runs) == gap
    render_all(tmp_path)
    lines = (tmp_path / "summary.md").read_text().splitlines()
    iterations = schedule["iterations"]
    assert lines[0].startswith(f"Schedule: {iterations:,} of the paper's 64,000 iterations (")
    table = [line for line in lines if line.startswith("|")]
    if gap is None:
        assert "paper test err. %" in table[0] and "| 7.51 |" in table[-1]
        assert not any(line.startswith("No paper column") for line in lines)
    else:
        assert "paper" not in table[0] and "7.51" not in "".join(table)
        assert f"No paper column: {gap}, so He et al.'s Table 6 errors would not compare." in lines
    with open(tmp_path / "summary.csv") as f:
        resnet = list(csv.DictReader(f))[1]
    assert resnet["paper_test_error_pct"] == ("7.51" if gap is None else "")
    if not data:  # all 50,000 images: epochs = iterations x batch / 50,000
        assert float(resnet["epochs_planned"]) == pytest.approx(iterations * schedule["batch_size"] / 50_000, abs=1e-3)


def test_figures_read_alike_and_name_the_preset_and_its_real_schedule(tmp_path, monkeypatch):
    """What matplotlib was given: milestones dotted grey (not dashed like training curves), each
    legend says what colour means, one word (solid) for the test error, one y range for both
    error-vs-depth panels, and a title naming the preset and the iterations really run."""
    laptop = {"name": "quick", "iterations": 1200, "milestones": [800, 1000], "batch_size": 64, "lr": 0.05}
    for arch, depth, final in (("plain", 8, 0.3), ("plain", 32, 0.5), ("resnet", 8, 0.3), ("resnet", 32, 0.2)):
        run = make_run(tmp_path, f"{arch}-{depth}-s0", arch, depth, 0, ramp(0.9, final, 12),
                       ramp(0.95 if depth == 32 else 0.8, final, 12), eval_every=100, schedule=laptop,
                       data={"name": "imagefolder", "train_size": 2500})
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["sweep"]["experiment"] = "laptop"
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    figures = keep_figures(monkeypatch, plots)
    render_all(tmp_path)
    curves, depth = figures
    for fig in figures:
        title = " ".join(fig._suptitle.get_text().split())
        assert title.startswith("experiment=laptop") or title.startswith("Error vs. depth: experiment=laptop"), title
        assert "2,500 training images, 1,200 of the paper's 64,000 iterations (31 epochs)" in title, title
        assert "quick" not in title
        assert "solid = test error" in title and "bold" not in title
    for ax in curves.axes:
        drops = [line for line in ax.get_lines() if list(line.get_xdata()) in ([800, 800], [1000, 1000])]
        assert len(drops) == 2 and {line.get_linestyle() for line in drops} == {":"}
        assert {line.get_color() for line in drops} == {"0.6"}
        curve_styles = {line.get_linestyle() for line in ax.get_lines() if line not in drops}
        assert curve_styles == {"--", "-"}
        legend = ax.get_legend()
        assert legend.get_title().get_text() == "colour = depth"
        assert [t.get_text() for t in legend.get_texts()][-1] == "learning-rate drop (dotted grey)"
    assert [ax.get_xlabel() for ax in depth.axes] == ["number of layers"] * 2
    assert [ax.get_legend().get_title().get_text() for ax in depth.axes] == ["colour = architecture"] * 2
    assert depth.axes[0].get_ylim() == depth.axes[1].get_ylim()
    assert [ax.get_title() for ax in depth.axes][0] == "(a) end of training (1.2k iter.)"


def test_a_sweep_with_a_failed_run_draws_without_warnings(tmp_path):
    make_run(tmp_path, "plain-20-s0", "plain", 20, 0, [0.0], [0.0], status="failed")
    make_run(tmp_path, "resnet-20-s0", "resnet", 20, 0, [], [], status="failed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "identical low and high ylims" would reach the terminal
        render_all(tmp_path)


def test_a_run_with_a_hand_edited_depth_is_left_out_with_one_line(tmp_path, capsys):
    make_run(tmp_path, "plain-20-s0", "plain", 20, 0, ramp(0.5, 0.1), ramp(0.5, 0.12))
    edited = make_run(tmp_path, "resnet-20-s0", "resnet", 20, 0, ramp(0.5, 0.1), ramp(0.5, 0.12), write_result=False)
    config = yaml.safe_load((edited / "config.yaml").read_text())
    config["depth"] = "abc"
    (edited / "config.yaml").write_text(yaml.safe_dump(config))
    drawn = render_all(tmp_path)
    assert [row["arch"] for row in drawn["summary"]] == ["plain"]
    assert capsys.readouterr().err == (f"warning: {edited / 'config.yaml'}: depth is 'abc', not a whole number; "
                                       "this run is left out\n")
