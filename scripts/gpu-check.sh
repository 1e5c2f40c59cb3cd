#!/usr/bin/env bash
# Prove the GPU path in one run, in at most GPU_CHECK_BUDGET_S seconds (default 480) on one GPU:
#   1. the environment (GPU, driver, CUDA, torch, cuDNN); a GPU that torch cannot use is an error
#   2. the CUDA tests (pytest -m cuda)
#   3. the compile cache warmed once (the blocks of a plain and a residual net: every depth shares them)
#   4. resexp bench: ResNet-20/56/110 at batch 128 (compiled + CUDA graph) against the reference
#      pipeline, ResNet-56 eager, and the steady-state memory of ResNet-1202 in bf16
#   5. a short real-data sweep with gpus=all, once with runs_per_gpu=1 and once with 3 (under NVIDIA
#      MPS where the host lets it start): wall times, the speed-up, figures
#   6. report.md, record.json, gpu-check.log and the sweep's two figures: five files in one folder
# Every attempted step is a row of the report, with its fate: measured, failed, timed out, or skipped
# and why. Without a GPU it says so in one line, runs the same steps on tiny CPU settings (under two
# minutes; device=cpu) and exits 0, so that the test suite keeps the script working.
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
rm -f "$out"/report.md "$out"/record.json "$out"/curves.png "$out"/error_vs_depth.png
log="$out/gpu-check.log"
: >"$log"
work=$(mktemp -d "${TMPDIR:-/tmp}/resexp-gpu-check.XXXXXX")
mps_started=0
finish() {
  [ "$mps_started" = 1 ] && echo quit | nvidia-cuda-mps-control >>"$log" 2>&1
  rm -rf "$work"
}
trap finish EXIT
rows="$work/rows.tsv"  # one line per attempted step: name, fate, seconds, detail
: >"$rows"

say() { echo "gpu-check: $*" | tee -a "$log" >&2; }
left() { echo $((budget - (SECONDS - start))); }
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$rows"; }

# attempt NAME LIMIT_S COMMAND...: run a step with a time limit and record its fate.
attempt() {
  local name=$1 limit=$2 began=$SECONDS status
  shift 2
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped (${limit}s left in the budget)"
    row "$name" skipped 0 "not enough time left in the ${budget}s budget"
    return 1
  fi
  say "$name (at most ${limit}s)"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$work/step.out" 2>&1
  status=$?
  cat "$work/step.out" >>"$log"
  case $status in
    0) row "$name" measured $((SECONDS - began)) "" ;;
    124|137) row "$name" "timed out" $((SECONDS - began)) "stopped at its ${limit}s limit"; say "$name timed out" ;;
    *) row "$name" failed $((SECONDS - began)) "exit code $status (see gpu-check.log)"; say "$name failed (exit $status)" ;;
  esac
  return $status
}

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
export PYTHONUNBUFFERED=1
# One compile cache for every step, empty at the start: the warm-up's compile time is a cold one.
export TORCHINDUCTOR_CACHE_DIR="$work/inductor-cache"

# --- 1. the environment ---------------------------------------------------------------------------
mode=$("$python" - "$work/environment.json" <<'EOF' 2>>"$log"
import json, platform, subprocess, sys
import torch
from resexp.machine import usable_cores
from resexp.step import nvidia_driver_version, unusable_gpu_problem

usable = torch.cuda.is_available()
record = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
          "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
          "gpu": torch.cuda.get_device_name(0) if usable else None,
          "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if usable else None,
          "gpu_count": torch.cuda.device_count() if usable else 0,
          "driver": nvidia_driver_version(), "cpu_cores": usable_cores(), "unusable_gpu": unusable_gpu_problem()}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    record["driver"] = smi[0] if smi else record["driver"]
except (OSError, subprocess.SubprocessError):
    pass
json.dump(record, open(sys.argv[1], "w"), indent=1)
print("gpu" if usable else "unusable" if record["unusable_gpu"] else "cpu")
EOF
)
case $mode in
  gpu) device=cuda ;;
  cpu) device=cpu; say "no CUDA GPU here: running the CPU checks only (tiny settings), no GPU figures" ;;
  unusable) say "an NVIDIA driver is present but torch cannot use the GPU (see report.md); nothing measured"
     row "GPU" failed 0 "torch cannot use the GPU this machine has"
     device=none ;;
  *) say "the environment could not be read (see $log)"; exit 1 ;;
esac
gpu=0; [ "$mode" = gpu ] && gpu=1

# --- 2. the CUDA tests ----------------------------------------------------------------------------
if [ $gpu = 1 ]; then
  attempt "CUDA tests" $(( $(left) < 150 ? $(left) : 150 )) \
    "$python" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
  grep -E "passed|failed|error|skipped" "$work/step.out" | tail -1 >"$work/cuda-tests.txt"
elif [ "$mode" = cpu ]; then
  row "CUDA tests" skipped 0 "no CUDA GPU"
fi

# --- 3 and 4. the compile cache, then benchmarks ----------------------------------------------------
bench() {  # bench NAME LIMIT ARGS...: one resexp bench row, its record in $work/bench-NAME.json
  local name=$1 limit=$2
  shift 2
  attempt "bench $name" "$limit" "$python" -m resexp bench "$@" device=$device bench.json="$work/bench-$name.json"
}
capped() { local limit=$(( $(left) - $2 )); echo $(( limit < $1 ? limit : $1 )); }  # capped MAX RESERVE
if [ $gpu = 1 ]; then
  quick="schedule.batch_size=128 bench.steps=1 bench.warmup=1 bench.windows=1 bench.reference=false"
  # ResNet-14 has every block shape of the CIFAR nets (each stage's first block and the rest): after these
  # two, any depth finds its compiled blocks in the cache.
  for arch in resnet plain; do
    # shellcheck disable=SC2086
    bench "warm-$arch" "$(capped 90 240)" arch=$arch depth=14 compile=true cuda_graph=auto $quick
  done
  steady="schedule.batch_size=128 bench.steps=30 bench.warmup=5 bench.windows=3"
  for depth in 20 56 110; do
    # shellcheck disable=SC2086
    bench "$depth-graphed" "$(capped 60 200)" depth=$depth compile=true cuda_graph=auto bench.reference=true $steady
  done
  # shellcheck disable=SC2086
  bench "56-eager" "$(capped 45 180)" depth=56 compile=false cuda_graph=false bench.reference=false $steady
  bench "1202-memory" "$(capped 60 170)" bench.measure=memory depth=1202 precision=bf16 compile=false
elif [ "$mode" = cpu ]; then
  bench "8-eager" 60 depth=8 compile=false cuda_graph=false bench.reference=true schedule.batch_size=32 \
    bench.steps=2 bench.warmup=1 bench.windows=1 data.train_size=256 bench.workers=0
  for name in "warm-resnet" "warm-plain" "20-graphed" "56-graphed" "110-graphed" "56-eager" "1202-memory"; do
    row "bench $name" skipped 0 "needs a CUDA GPU (its settings are the GPU's: on a CPU they take far longer than the check may)"
  done
fi

# --- 5. the sweeps ----------------------------------------------------------------------------------
if [ $gpu = 1 ]; then
  data_args="data=cifar10"
  if [ ! -f data/cifar-10-python.tar.gz ] && [ ! -d data/cifar-10-batches-py ]; then
    if [ ! -d data/cifar10-jpeg/train ] && [ -f "$carry/cifar10-jpeg.tar.xz" ]; then
      mkdir -p data/cifar10-jpeg && tar -xJf "$carry/cifar10-jpeg.tar.xz" -C data/cifar10-jpeg
    fi
    data_args="data=imagefolder data.root=data/cifar10-jpeg"
  fi
  # Decode the images once, before runs start side by side (each would otherwise decode them).
  # shellcheck disable=SC2086
  attempt "decode CIFAR-10" "$(capped 90 120)" "$python" -c "import sys; from resexp.config import compose
from resexp.data import load_data
cfg = compose(sys.argv[1:]).data
load_data(cfg.name, cfg.root, download=False)" $data_args
  # Iterations for the time left: the runs' steps, from the graphed bench rows (plus each run's start).
  iterations=$("$python" - "$work" "$(( $(left) - 60 ))" <<'EOF' 2>>"$log"
import json, sys
from pathlib import Path
work, seconds = Path(sys.argv[1]), float(sys.argv[2])
ms = {}
for depth in (20, 56):
    try:
        ms[depth] = json.loads((work / f"bench-{depth}-graphed.json").read_text())["resexp"]["ms_per_step"]
    except (OSError, ValueError, KeyError):
        ms[depth] = {20: 5.0, 56: 12.0}[depth]  # unmeasured: a cautious guess of an H100's step
per_iteration_s = (ms[20] + (ms[20] + ms[56]) / 2 + ms[56]) / 1000  # ResNet-20, -32, -56
# Two sweeps of the three runs: one after another (1x), then side by side (about 1.5x at best); 30 s
# of start-up per run (Python, data, the compiled blocks from the cache) comes out of the budget first.
train_s = max(0.0, seconds - 3 * 30 - 2 * 30)
print(max(200, min(4000, int(train_s / 1.8 / per_iteration_s) // 100 * 100)))
EOF
)
  [ -n "$iterations" ] || iterations=500
  grid="arch=resnet depth=20,32,56 $data_args"
  gpus="gpus=all"
  batch=128
else
  iterations=8
  grid="arch=plain,resnet depth=8 data=synthetic data.train_size=256 data.test_size=64 device=cpu"
  gpus=""
  batch=32
fi
schedule="schedule.iterations=$iterations schedule.milestones=[$((iterations / 2)),$((iterations * 3 / 4))]"
schedule="$schedule schedule.eval_every=$(( iterations / 10 > 1 ? iterations / 10 : 1 ))"
schedule="$schedule schedule.checkpoint_every=$iterations schedule.batch_size=$batch"
echo "$iterations $batch" >"$work/sweep-settings.txt"
sweep() {  # sweep NAME RUNS_PER_GPU: one sweep of the grid, its folder $work/NAME
  local name=$1 per_gpu=$2 slots=""
  [ $gpu = 1 ] && slots="$gpus runs_per_gpu=$per_gpu"
  # shellcheck disable=SC2086
  attempt "sweep $name" "$(capped 240 20)" "$python" -m resexp sweep $grid $schedule $slots progress=false \
    out="$work" name="$name"
}
if [ "$mode" = unusable ]; then
  row "sweeps" skipped 0 "no usable GPU"
else
  sweep one-at-a-time 1
  if [ $gpu = 1 ]; then
    if command -v nvidia-cuda-mps-control >/dev/null; then
      export CUDA_MPS_PIPE_DIRECTORY="$work/mps-pipe" CUDA_MPS_LOG_DIRECTORY="$work/mps-log"
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      if nvidia-cuda-mps-control -d >>"$log" 2>&1; then mps_started=1; fi
    fi
    echo "$mps_started" >"$work/mps.txt"
    sweep three-at-a-time 3
  fi
fi

# --- 6. the report --------------------------------------------------------------------------------
"$python" scripts/gpu_check_report.py "$out" "$work" "$mode" "$((SECONDS - start))" 2>>"$log"
status=$?
[ $status = 0 ] || say "the report could not be written (see $log)"
[ "$mode" = unusable ] && exit 1
exit $status
