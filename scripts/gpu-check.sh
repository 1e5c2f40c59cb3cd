#!/usr/bin/env bash
# Prove the GPU path in one run, in at most GPU_CHECK_BUDGET_S seconds (default 480) on one GPU:
#   1. the environment (GPU, driver, CUDA, torch, cuDNN)
#   2. the CUDA tests (pytest -m cuda)
#   3. resexp bench for ResNet-20/56/110 at batch 128: eager, compiled, compiled + CUDA graph, and the
#      reference pipeline; and the steady-state peak memory of ResNet-1202 in bf16
#   4. a real-data sweep of the nine Figure-6 nets on a schedule scaled to the time left, several runs
#      sharing the GPU (gpus=0 runs_per_gpu=K), with its wall time and figures
#   5. report.md and record.json in one folder, for docs/benchmarks.md
# Without a GPU it says so in one line, runs the same steps on tiny CPU settings (under a minute) and
# exits 0, so that the test suite keeps the script working.
#
# usage: scripts/gpu-check.sh [OUT_DIR]        (default outputs/gpu-check)
# A machine without hydra-core/omegaconf/antlr4 (or resexp) gets them from wheels in $GPU_CHECK_CARRY/wheels,
# and the CIFAR-10 JPEG copy from $GPU_CHECK_CARRY/cifar10-jpeg.tar.xz (default GPU_CHECK_CARRY=.gpu-check;
# docs/benchmarks.md says how to fill it). A CIFAR-10 archive in data/ is used where there is one.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu-check}
carry=${GPU_CHECK_CARRY:-.gpu-check}
budget=${GPU_CHECK_BUDGET_S:-480}
start=$SECONDS
mkdir -p "$out"
work="$out/work"
rm -rf "$work"
mkdir -p "$work"
log="$out/gpu-check.log"
: >"$log"

say() { echo "gpu-check: $*" | tee -a "$log" >&2; }
left() { echo $((budget - (SECONDS - start))); }

# --- Python with resexp ---------------------------------------------------------------------------
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c "import resexp.cli" 2>/dev/null; then
  site=${TMPDIR:-/tmp}/resexp-gpu-check-site
  if [ -d "$carry/wheels" ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$carry"/wheels/*.whl >>"$log" 2>&1 || say "installing the carried wheels failed (see $log)"
  fi
  "$python" -m pip install -q --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target "$site" . \
    >>"$log" 2>&1 || say "installing resexp failed (see $log)"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$python" -c "import resexp.cli" 2>>"$log" || { say "resexp cannot be imported: see $log"; exit 1; }
fi
resexp() { "$python" -m resexp "$@"; }
export PYTHONUNBUFFERED=1

if "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
  gpu=1
else
  gpu=0
  say "no CUDA GPU here: running the CPU checks only (tiny settings), no GPU figures"
fi

# --- 1. the environment ---------------------------------------------------------------------------
"$python" - "$work/environment.json" <<'EOF' 2>>"$log"
import json, platform, subprocess, sys
import torch
record = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
          "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
          if torch.cuda.is_available() else None, "driver": None, "cpu_cores": len(__import__("os").sched_getaffinity(0))}
try:
    record["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                      capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    pass
json.dump(record, open(sys.argv[1], "w"), indent=1)
EOF

# --- 2. the CUDA tests ----------------------------------------------------------------------------
if [ $gpu = 1 ]; then
  say "CUDA tests"
  timeout 180 "$python" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py >"$work/cuda-tests.txt" 2>&1
  echo "exit $?" >>"$work/cuda-tests.txt"
else
  echo "skipped: no CUDA GPU" >"$work/cuda-tests.txt"
fi

# --- 3. benchmarks --------------------------------------------------------------------------------
if [ $gpu = 1 ]; then
  depths="20 56 110"
  bench_args="schedule.batch_size=128 bench.steps=30 bench.warmup=5 bench.windows=3"
  bench_limit=60
else
  depths="8"
  bench_args="schedule.batch_size=32 bench.steps=2 bench.warmup=1 bench.windows=1 data.train_size=256 bench.workers=0"
  bench_limit=60
fi
for depth in $depths; do
  for mode in eager compiled graphed; do
    case $mode in
      eager) flags="compile=false cuda_graph=false bench.reference=false" ;;
      compiled) flags="compile=true cuda_graph=false bench.reference=false" ;;
      graphed) flags="compile=true cuda_graph=auto bench.reference=true" ;;
    esac
    [ $gpu = 0 ] && [ $mode != eager ] && continue  # compiling on a CPU takes minutes
    [ $gpu = 0 ] && flags="compile=false cuda_graph=false bench.reference=true"
    limit=$(( $(left) - 200 < bench_limit ? $(left) - 200 : bench_limit ))
    if [ $gpu = 1 ] && [ "$limit" -lt 20 ]; then say "no time left for bench $depth $mode"; continue; fi
    [ $gpu = 0 ] && limit=$bench_limit
    say "bench resnet-$depth $mode"
    # shellcheck disable=SC2086
    timeout "$limit" "$python" -m resexp bench depth=$depth $bench_args $flags bench.json="$work/bench-$depth-$mode.json" \
      >>"$log" 2>&1 || say "bench resnet-$depth $mode did not finish (see $log)"
  done
done
if [ $gpu = 1 ]; then
  say "bench ResNet-1202 memory"
  timeout 90 "$python" -m resexp bench bench.measure=memory depth=1202 precision=bf16 compile=false \
    bench.json="$work/memory-1202.json" >>"$log" 2>&1 || say "ResNet-1202 memory did not finish (see $log)"
fi

# --- 4. the Figure-6 sweep ------------------------------------------------------------------------
if [ $gpu = 1 ]; then
  data_args="data=cifar10"
  if [ ! -f data/cifar-10-python.tar.gz ] && [ ! -d data/cifar-10-batches-py ]; then
    if [ ! -d data/cifar10-jpeg/train ] && [ -f "$carry/cifar10-jpeg.tar.xz" ]; then
      mkdir -p data/cifar10-jpeg && tar -xJf "$carry/cifar10-jpeg.tar.xz" -C data/cifar10-jpeg
    fi
    data_args="data=imagefolder data.root=data/cifar10-jpeg"
  fi
  # Decode the images once, before the runs start side by side (each would otherwise decode them).
  # shellcheck disable=SC2086
  "$python" -c "import sys; from resexp.config import compose; from resexp.data import load_data
cfg = compose(sys.argv[1:]).data
load_data(cfg.name, cfg.root, download=False)" $data_args >>"$log" 2>&1 || say "loading the data failed (see $log)"
  batch=128
  runs_per_gpu=9  # the nine nets at once: each is far too small to fill an H100/H200 alone
  # Iterations: the sweep's GPU work is at most the nine nets' graphed steps one after another
  # (ResNet-32/44 by interpolation, plain-n as ResNet-n); leave room for compiling and the report.
  iterations=$("$python" - "$work" "$(( $(left) - 150 ))" <<'EOF' 2>>"$log"
import json, sys
from pathlib import Path
work, seconds = Path(sys.argv[1]), float(sys.argv[2])
ms = {}
for depth in (20, 56, 110):
    try:
        ms[depth] = json.loads((work / f"bench-{depth}-graphed.json").read_text())["resexp"]["ms_per_step"]
    except (OSError, ValueError, KeyError):
        pass
if len(ms) < 2:
    print(1000)
    raise SystemExit
def at(depth):  # ms per step, linear in depth between the measured ones
    known = sorted(ms)
    low = max([d for d in known if d <= depth] or known[:1]); high = min([d for d in known if d >= depth] or known[-1:])
    return ms[low] if low == high else ms[low] + (ms[high] - ms[low]) * (depth - low) / (high - low)
per_iteration_s = sum(2 * at(d) for d in (20, 32, 44, 56)) / 1000 + at(110) / 1000
print(max(400, min(8000, int(seconds / per_iteration_s) // 100 * 100)))
EOF
)
  [ -n "$iterations" ] || iterations=1000
  sweep_args="experiment=figure6 $data_args schedule.iterations=$iterations"
  sweep_args="$sweep_args schedule.milestones=[$((iterations / 2)),$((iterations * 3 / 4))]"
  sweep_args="$sweep_args schedule.eval_every=$((iterations / 20)) schedule.checkpoint_every=$((iterations / 2))"
  sweep_args="$sweep_args schedule.warmup.check_every=$((iterations / 100 > 1 ? iterations / 100 : 1))"
  sweep_args="$sweep_args gpus=0 runs_per_gpu=$runs_per_gpu"
  sweep_limit=$(( $(left) - 40 ))
else
  batch=32
  runs_per_gpu=1
  iterations=8
  sweep_args="depth=8 data=synthetic data.train_size=256 data.test_size=64 schedule=smoke device=cpu"
  sweep_limit=60
fi
echo "$iterations $runs_per_gpu $batch" >"$work/sweep-settings.txt"
say "sweep: $sweep_args (at most ${sweep_limit}s)"
sweep_start=$SECONDS
# shellcheck disable=SC2086
timeout --signal=INT --kill-after=30 "$sweep_limit" "$python" -m resexp sweep $sweep_args progress=false \
  out="$work" name=sweep >>"$log" 2>&1
echo "$? $((SECONDS - sweep_start))" >"$work/sweep-exit.txt"

# --- 5. the report --------------------------------------------------------------------------------
"$python" - "$out" "$work" "$gpu" "$((SECONDS - start))" <<'EOF' 2>>"$log"
import json, shutil, sys
from pathlib import Path

out, work, gpu, total_s = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
PAPER_ITERATIONS = 64_000


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


environment = load(work / "environment.json") or {}
tests = (work / "cuda-tests.txt").read_text().strip().splitlines() if (work / "cuda-tests.txt").exists() else []
bench = {}
for path in sorted(work.glob("bench-*.json")):
    _, depth, mode = path.stem.split("-")
    bench[(int(depth), mode)] = load(path)
memory = load(work / "memory-1202.json")
iterations, runs_per_gpu, batch = map(int, (work / "sweep-settings.txt").read_text().split())
sweep_exit, sweep_s = map(int, (work / "sweep-exit.txt").read_text().split())
runs = {}
for path in sorted((work / "sweep").glob("*/result.json")):
    result = load(path)
    if result:
        runs[path.parent.name] = result

lines = ["# GPU check", "",
         f"{environment.get('gpu') or 'no GPU'} ({environment.get('gpu_memory_gib')} GiB), driver {environment.get('driver')}, "
         f"CUDA {environment.get('cuda')}, cuDNN {environment.get('cudnn')}, torch {environment.get('torch')}, "
         f"Python {environment.get('python')}, {environment.get('cpu_cores')} CPU cores; whole check {total_s} s.", "",
         "## CUDA tests", "", f"`{tests[-2] if len(tests) > 1 else (tests[-1] if tests else 'not run')}`", "",
         f"## Training throughput (resexp bench, batch {next((r['settings']['batch_size'] for r in bench.values() if r), '-')})",
         "",
         "| net | pipeline | images/s | ms/step | % of bf16 peak | steady peak MiB | first step s |",
         "|---|---|---|---|---|---|---|"]
ratios = {}
for (depth, mode), record in sorted(bench.items()):
    if not record:
        lines.append(f"| ResNet-{depth} | {mode} | did not finish | | | | |")
        continue
    rows = [(mode, record["resexp"])] + ([("reference", record["reference"])] if record.get("reference") else [])
    for label, figures in rows:
        share = figures.get("bf16_peak_fraction")
        lines.append(f"| ResNet-{depth} | {label} | {figures['images_per_s']:.0f} | {figures['ms_per_step']:.2f} | "
                     f"{100 * share:.2f} | {figures['peak_memory_mb']:.0f} | {figures['first_step_s']:.1f} |"
                     if share is not None else
                     f"| ResNet-{depth} | {label} | {figures['images_per_s']:.0f} | {figures['ms_per_step']:.2f} | - | "
                     f"{figures['peak_memory_mb']:.0f} | {figures['first_step_s']:.1f} |")
    if record.get("ratio"):
        ratios[depth] = record["ratio"]
lines.append("")
for depth, ratio in sorted(ratios.items()):
    target = " (target: at least 4x)" if depth == 56 else ""
    lines.append(f"- ResNet-{depth}: resexp / reference pipeline = {ratio:.2f}x{target}")
if memory:
    peak = memory["memory"]["cuda_peak_bytes"]
    lines.append(f"- ResNet-1202, bf16, batch 128: steady-state peak {peak / 2**30:.2f} GiB; estimate (parameter state + "
                 f"saved activations) {memory['memory']['estimate_bytes'] / 2**30:.2f} GiB" if peak else
                 "- ResNet-1202 memory: no CUDA peak")

lines += ["", "## Figure-6 sweep", "",
          f"{len(runs)} runs, {iterations} iterations each, batch {batch}, "
          f"{f'{runs_per_gpu} at once on one GPU' if gpu else 'one after another on the CPU'}; wall time {sweep_s} s "
          f"(exit code {sweep_exit}).", "",
          "| run | status | iterations | train error | test error | images/s | s per 1k iterations |", "|---|---|---|---|---|---|---|"]
estimates = []
for name, result in runs.items():
    ips = result.get("images_per_s")
    per_k = 1000 * batch / ips if ips else None
    if per_k:
        estimates.append(PAPER_ITERATIONS / 1000 * per_k)
    def pct(value):
        return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"
    lines.append(f"| {name} | {result.get('status')} | {result.get('iterations_done')} | "
                 f"{pct(result.get('final_train_error'))} | {pct(result.get('final_test_error'))} | "
                 f"{ips or '-'} | {per_k and round(per_k, 1) or '-'} |")
estimate_s = max(estimates) if estimates else None
if estimate_s and gpu:
    lines += ["", f"Estimate for the paper's schedule ({PAPER_ITERATIONS} iterations), the nine nets {runs_per_gpu} at "
              f"once as here: the slowest run's measured step time x {PAPER_ITERATIONS} = {estimate_s / 60:.1f} min, "
              "plus compiling (target: at most 10 min)."]
for figure in ("curves.png", "error_vs_depth.png"):
    if (work / "sweep" / figure).exists():
        shutil.copy(work / "sweep" / figure, out / figure)
        lines += ["", f"![{figure}]({figure})"]

record = {"gpu": gpu, "total_s": total_s, "environment": environment, "cuda_tests": tests[-2:],
          "bench": {f"{depth}-{mode}": value for (depth, mode), value in bench.items()}, "memory_1202": memory,
          "sweep": {"iterations": iterations, "runs_per_gpu": runs_per_gpu, "wall_s": sweep_s, "exit": sweep_exit,
                    "runs": runs, "paper_schedule_estimate_s": estimate_s}}
(out / "report.md").write_text("\n".join(lines) + "\n")
(out / "record.json").write_text(json.dumps(record, indent=1))
print(f"gpu-check: report {out / 'report.md'}, record {out / 'record.json'}")
EOF
status=$?
[ $status = 0 ] || say "the report could not be written (see $log)"
exit $status
