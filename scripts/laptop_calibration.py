"""Calibrate `resexp sweep experiment=laptop` on real CIFAR-10 and write the table in docs/laptop.md.

Runs the preset's sweep once per seed (0 to 4 by default), each in a fresh folder, times each
sweep from the command's start to its end (data loading, every run and the figures included),
and writes per seed and net the final training and test error and the run's wall time, the
sweep's wall time against the estimate it printed before it started, the paper's three findings
per seed with their margins, and the machine. The seed-0 curves become docs/laptop-curves.png,
the picture the README shows.

Run it on a quiet machine (the wall times are the point), from the project folder:

    .venv/bin/python scripts/laptop_calibration.py --data data/cifar10-jpeg

The data folder is the CIFAR-10 JPEG copy unpacked as the README's "Offline data" says.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from resexp.data import cache_paths
from omegaconf import OmegaConf

from resexp.files import CONFIG, RESULT, atomic_write_text, read_result
from resexp.status import format_duration

ROOT = Path(__file__).resolve().parent.parent
# What the paper shows, as this preset checks it: margins in percentage points of final training error.
DEGRADATION_MIN = 5.0  # the deep plain net at least this much worse than the shallow one
CURE_MIN = 5.0         # the deep ResNet at least this much better than the deep plain net
DEEPER_MIN = 0.0       # the deep ResNet no worse than the shallow one (the paper's Table 6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/cifar10-jpeg", help="the unpacked CIFAR-10 JPEG copy (train/, test/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="outputs/laptop-calibration", help="where the sweeps go (each seed's folder is remade)")
    parser.add_argument("--doc", default="docs/laptop.md")
    parser.add_argument("--picture", default="docs/laptop-curves.png", help="where the first seed's curves are copied")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        print(f"error: {data} holds no train/ and test/ folders; unpack the JPEG copy first: mkdir -p {data} && "
              f"tar -xJf ../shared/data/cifar10-jpeg.tar.xz -C {data}", file=sys.stderr)
        return 2
    resexp = Path(sys.executable).with_name("resexp")
    cache_was_warm = any(path.is_file() for path in cache_paths(data))
    machine = machine_line()

    sweeps = []
    for seed in args.seeds:
        sweep_dir = Path(args.out) / f"seed{seed}"
        shutil.rmtree(sweep_dir, ignore_errors=True)
        command = [str(resexp), "sweep", "experiment=laptop", "data=imagefolder", f"data.root={data}", f"seed={seed}",
                   f"out={args.out}", f"name=seed{seed}", "progress=false"]
        print("$ " + " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        ran = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        wall_s = time.perf_counter() - started
        print(ran.stderr, end="", file=sys.stderr)
        if ran.returncode != 0:
            print(f"error: the seed-{seed} sweep exited with code {ran.returncode}", file=sys.stderr)
            return 1
        runs = {(r["arch"], r["depth"]): r for r in map(read_result, sorted(sweep_dir.glob(f"*/{RESULT}")))}
        sweeps.append({"seed": seed, "wall_s": wall_s, "estimate_s": estimated_seconds(ran.stderr), "runs": runs,
                       "dir": sweep_dir})
        print(f"seed {seed}: {format_duration(wall_s)}", flush=True)

    shutil.copyfile(sweeps[0]["dir"] / "curves.png", args.picture)
    atomic_write_text(args.doc, report(sweeps, machine, cache_was_warm, args))
    print(f"wrote {args.doc} and {args.picture}")
    return 0


def findings(runs: dict) -> dict:
    """The paper's three findings on final training error for one seed's sweep: each margin in
    points, positive where the paper's finding points (the deep plain net worse than the shallow
    one; the deep ResNet better than the deep plain net; the deep ResNet better than the shallow one)."""
    depths = sorted({depth for _, depth in runs})
    shallow, deep = depths[0], depths[-1]
    error = {key: 100 * run["final_train_error"] for key, run in runs.items()}
    return {
        "shallow": shallow, "deep": deep,
        "degradation": error["plain", deep] - error["plain", shallow],
        "cure": error["plain", deep] - error["resnet", deep],
        "deeper": error["resnet", shallow] - error["resnet", deep],
    }


def holds(found: dict) -> dict:
    """Which of the three findings hold by this preset's margins."""
    return {"degradation": found["degradation"] >= DEGRADATION_MIN, "cure": found["cure"] >= CURE_MIN,
            "deeper": found["deeper"] >= DEEPER_MIN}


def estimated_seconds(stderr: str) -> float | None:
    """The wall time the sweep's cost line gave before it started ('about 8m 05s'), or None."""
    found = re.search(r"estimated wall time: about ((?:\d+[hms] ?)+)", stderr)
    if not found:
        return None
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)([hms])", found.group(1)))


def report(sweeps: list[dict], machine: str, cache_was_warm: bool, args) -> str:
    config = OmegaConf.to_container(OmegaConf.load(next(sweeps[0]["dir"].glob(f"*/{CONFIG}"))))
    lines = [
        "# `experiment=laptop`: the calibration",
        "",
        f"Written by `scripts/laptop_calibration.py` ({time.strftime('%Y-%m-%d')}); rerun it to check another machine.",
        "",
        f"Machine: {machine}.",
        f"Command, per seed: `resexp sweep experiment=laptop data=imagefolder data.root={args.data} seed=S`.",
        "Data: the CIFAR-10 JPEG copy; its decoded cache was "
        + ("already there (decoding it once takes about a minute more)." if cache_was_warm
           else "built by the first sweep, whose wall time includes that."),
        f"Training: {scale(sweeps[0]['dir'])}.",
        f"Errors are final, in percent: training error over the last {config['schedule']['eval_every']} iterations' "
        f"batches (augmented), as the paper measures it; test error on {config['data']['test_size']:,} test images.",
        "",
        "| seed | net | train err. % | test err. % | run wall time |",
        "|--:|---|--:|--:|--:|",
    ]
    for sweep in sweeps:
        for (arch, depth), run in sorted(sweep["runs"].items()):
            label = f"{'ResNet' if arch == 'resnet' else 'plain'}-{depth}"
            lines.append(f"| {sweep['seed']} | {label} | {100 * run['final_train_error']:.1f} | "
                         f"{100 * run['final_test_error']:.1f} | {format_duration(run['wall_time_s'])} |")
    lines += [
        "",
        "| seed | sweep wall time | estimated before | degradation: plain deep − shallow | "
        "cure: plain − ResNet, deep | deeper is better: ResNet shallow − deep |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for sweep in sweeps:
        found, held = findings(sweep["runs"]), holds(findings(sweep["runs"]))
        estimate = sweep["estimate_s"]
        off = f" ({round(100 * (estimate / sweep['wall_s'] - 1)):+d} %)" if estimate else ""
        lines.append(
            f"| {sweep['seed']} | {format_duration(sweep['wall_s'])} | {format_duration(estimate)}{off} | "
            + " | ".join(f"{found[name]:+.1f} {'✓' if held[name] else '✗'}" for name in ("degradation", "cure", "deeper"))
            + " |")
    lines += [
        "",
        f"Margins in points of final training error, positive where the paper's finding points. ✓ marks a "
        f"finding that holds: degradation and cure by at least {DEGRADATION_MIN:.0f} points each, and the deep "
        "ResNet at least as good as the shallow one (the paper's Table 6: deeper ResNets train to lower error).",
        "",
        "![the seed-0 curves](laptop-curves.png)",
        "",
    ]
    return "\n".join(lines)


def scale(sweep_dir: Path) -> str:
    """What the preset trains, in words: images, batch, iterations, passes and the learning rate."""
    config = OmegaConf.load(next(sweep_dir.glob(f"*/{CONFIG}")))
    schedule, images = config.schedule, config.data.train_size
    return (f"{images:,} of CIFAR-10's 50,000 training images, batch {schedule.batch_size}, "
            f"{schedule.iterations:,} iterations ({schedule.iterations * schedule.batch_size / images:.0f} passes), "
            f"lr {schedule.lr:g} divided by 10 at " + " and ".join(f"{m:,}" for m in schedule.milestones))


def machine_line() -> str:
    import torch

    from resexp.machine import cpu_model, usable_cores

    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{usable_cores()} CPU cores ({cpu_model()}), {memory_gib:.0f} GiB, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    sys.exit(main())
