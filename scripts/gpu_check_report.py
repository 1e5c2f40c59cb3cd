"""The report of scripts/gpu-check.sh: report.md and record.json, and the sweep's figures copied beside them.

usage: python scripts/gpu_check_report.py OUT_DIR WORK_DIR MODE TOTAL_S     (MODE: gpu, cpu or unusable)

Reads what the check left in WORK_DIR (environment.json, rows.tsv, bench-*.json, the sweep folders) and
writes into OUT_DIR at most five files: report.md, record.json, and curves.png and error_vs_depth.png of
the last sweep (gpu-check.log is the script's). Every attempted step is listed with its fate.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

PAPER_ITERATIONS = 64_000
SWEEPS = ("one-at-a-time", "three-at-a-time")  # the folders of the two sweeps, in the order they ran


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_rows(work: Path) -> list[dict]:
    rows = []
    path = work / "rows.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, fate, seconds, detail = (line.split("\t") + ["", "", ""])[:4]
        rows.append({"step": name, "fate": fate, "seconds": int(seconds or 0), "detail": detail})
    return rows


def sweep_runs(folder: Path) -> dict[str, dict]:
    return {path.parent.name: result for path in sorted(folder.glob("*/result.json"))
            if (result := load(path)) is not None}


def percent(value) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def bench_lines(bench: dict[str, dict]) -> list[str]:
    lines = ["| bench | pipeline | images/s | ms/step | % of bf16 peak | steady peak MiB | first step s | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, record in bench.items():
        if record.get("measure") == "memory":
            continue
        rows = [("resexp", record["resexp"])] + ([("reference", record["reference"])] if record.get("reference") else [])
        for label, figures in rows:
            share = figures.get("bf16_peak_fraction")
            compiled = figures.get("compile_s")
            lines.append(f"| {name} | {label} | {figures['images_per_s']:.0f} | {figures['ms_per_step']:.2f} | "
                         f"{'-' if share is None else f'{100 * share:.2f}'} | {figures['peak_memory_mb']:.0f} | "
                         f"{figures['first_step_s']:.1f} | {'-' if compiled is None else f'{compiled:.1f}'} |")
    kinds = {record["resexp"]["peak_memory_kind"] for record in bench.values() if record.get("resexp")}
    lines += ["", *(f"Peak memory: {kind}." for kind in sorted(kinds))]
    for name, record in bench.items():
        if record.get("ratio"):
            lines.append(f"- {name}: resexp / reference pipeline = {record['ratio']:.2f}x")
        resident = (record.get("resexp") or {}).get("data_on_device_mb")
        if resident:
            lines.append(f"- {name}: the training images on the GPU, {resident:.0f} MiB, are not in the peak")
        memory = record.get("memory")
        if memory:
            peak = memory["cuda_peak_bytes"]
            lines.append(f"- {name}: ResNet-{record['model']['depth']}, {record['settings']['precision']}, batch "
                         f"{record['settings']['batch_size']}: steady-state peak "
                         f"{'-' if peak is None else f'{peak / 2**30:.2f} GiB'}; estimate (parameter state + saved "
                         f"activations) {memory['estimate_bytes'] / 2**30:.2f} GiB")
    return lines


def sweep_lines(name: str, runs: dict[str, dict], row: dict | None, batch: int) -> tuple[list[str], float | None]:
    """The table of one sweep's runs, and the paper-schedule estimate of its slowest run (seconds)."""
    wall = f"wall time {row['seconds']} s, {row['fate']}" if row else "not run"
    lines = [f"### {name}: {len(runs)} runs; {wall}", "",
             "| run | status | iterations | train error | test error | steady images/s | start-up s |",
             "|---|---|---|---|---|---|---|"]
    estimates = []
    for run, result in runs.items():
        ips, startup = result.get("images_per_s"), result.get("startup_s")
        if ips:
            estimates.append(PAPER_ITERATIONS * batch / ips + (startup or 0))
        lines.append(f"| {run} | {result.get('status')} | {result.get('iterations_done')} | "
                     f"{percent(result.get('final_train_error'))} | {percent(result.get('final_test_error'))} | "
                     f"{ips or '-'} | {startup if startup is not None else '-'} |")
    return lines, max(estimates) if estimates else None


def main(out: Path, work: Path, mode: str, total_s: int) -> None:
    environment = load(work / "environment.json") or {}
    rows = read_rows(work)
    by_step = {row["step"]: row for row in rows}
    bench = {path.stem.removeprefix("bench-"): record for path in sorted(work.glob("bench-*.json"))
             if (record := load(path)) is not None}
    settings = (work / "sweep-settings.txt")
    iterations, batch = map(int, settings.read_text().split()) if settings.exists() else (0, 0)
    mps = (work / "mps.txt").read_text().strip() == "1" if (work / "mps.txt").exists() else False
    cuda_tests = (work / "cuda-tests.txt").read_text().strip() if (work / "cuda-tests.txt").exists() else "not run"

    lines = ["# GPU check", "",
             f"{environment.get('gpu') or ('no usable GPU' if environment.get('unusable_gpu') else 'no GPU')} ({environment.get('gpu_memory_gib')} GiB, "
             f"{environment.get('gpu_count')} visible), driver {environment.get('driver')}, CUDA "
             f"{environment.get('cuda')}, cuDNN {environment.get('cudnn')}, torch {environment.get('torch')}, Python "
             f"{environment.get('python')}, {environment.get('cpu_cores')} CPU cores; whole check {total_s} s."]
    if environment.get("unusable_gpu"):
        lines += ["", f"**The GPU cannot be used:** {environment['unusable_gpu']}"]
    lines += ["", "## Steps", "", "| step | fate | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {row['step']} | {row['fate']} | {row['seconds']} | {row['detail']} |" for row in rows]
    lines += ["", f"CUDA tests: `{cuda_tests}`", "", "## Training throughput (resexp bench)", ""]
    lines += bench_lines(bench) if bench else ["No bench row was measured."]

    lines += ["", f"## Sweeps on {'real CIFAR-10' if mode == 'gpu' else 'generated data'}", "",
              f"{iterations} iterations per run, batch {batch}."]
    sweeps, estimates = {}, {}
    for name in SWEEPS:
        folder = work / name
        if not folder.exists():
            continue
        sweeps[name] = sweep_runs(folder)
        table, estimates[name] = sweep_lines(name, sweeps[name], by_step.get(f"sweep {name}"), batch)
        lines += ["", *table]
    one, three = by_step.get("sweep one-at-a-time"), by_step.get("sweep three-at-a-time")
    speedup = None
    if one and three and one["fate"] == three["fate"] == "measured" and three["seconds"]:
        speedup = one["seconds"] / three["seconds"]
        lines += ["", f"runs_per_gpu=3 over runs_per_gpu=1: {speedup:.2f}x the wall time's speed "
                      f"({'under NVIDIA MPS' if mps else 'without MPS: processes on one GPU take turns'}); "
                      "each run's start-up (Python, data, compiled blocks from the cache) is in both."]
    slowest = max((value for value in estimates.values() if value), default=None)
    if slowest and mode == "gpu":
        lines += ["", f"The paper's schedule ({PAPER_ITERATIONS:,} iterations) for the slowest of these runs, from its "
                      f"steady images/s plus its start-up: {slowest / 60:.1f} min."]
    last = next((work / name for name in reversed(SWEEPS) if (work / name).exists()), None)
    for figure in ("curves.png", "error_vs_depth.png"):
        if last is not None and (last / figure).exists():
            shutil.copy(last / figure, out / figure)
            lines += ["", f"![{figure}]({figure})"]

    record = {"mode": mode, "gpu": mode == "gpu", "total_s": total_s, "environment": environment, "steps": rows,
              "cuda_tests": cuda_tests, "bench": bench, "mps": mps,
              "sweeps": {"iterations": iterations, "batch": batch, "runs": sweeps, "speedup_3_over_1": speedup,
                         "paper_schedule_estimate_s": slowest}}
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "record.json").write_text(json.dumps(record, indent=1))
    print(f"gpu-check: report {out / 'report.md'}, record {out / 'record.json'}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
