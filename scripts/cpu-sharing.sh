#!/usr/bin/env bash
# How much of its speed a resexp run keeps on a CPU that a second resexp process shares.
#
# Times `resexp bench` alone, then beside a second `resexp bench` of the same net, and prints
# both rates and their ratio (a fair share of a CPU two processes fill is 50 %). Run it on an
# otherwise quiet machine, from the project folder:
#
#   scripts/cpu-sharing.sh                          # plain-20, batch 64
#   scripts/cpu-sharing.sh arch=resnet depth=32     # any net or batch, keys as for resexp bench
#
# The keys replace the defaults below (bench.steps too: 20 steps in each of the 3 timed windows).
#
# The environment reaches both processes, so OMP_NUM_THREADS or OMP_WAIT_POLICY can be compared.
set -euo pipefail

resexp=${RESEXP:-.venv/bin/resexp}
scratch=$(mktemp -d)
second=
finish() {
    if [ -n "$second" ]; then
        kill "$second" 2>/dev/null || true
        wait "$second" 2>/dev/null || true
    fi
    rm -rf "$scratch"
}
trap finish EXIT

defaults=(arch=plain depth=20 schedule.batch_size=64 device=cpu compile=false bench.reference=false
          bench.warmup=3 data.train_size=2048 progress=false bench.steps=20)
common=()
for setting in "${defaults[@]}"; do  # each default the arguments do not set (a key may be given once)
    given=
    for argument in "$@"; do
        if [ "${argument%%=*}" = "${setting%%=*}" ]; then given=yes; fi
    done
    if [ -z "$given" ]; then common+=("$setting"); fi
done
common+=("$@")

rate() {  # images/s of a bench record
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["resexp_images_per_s"])' "$1"
}

"$resexp" bench "${common[@]}" bench.windows=3 bench.json="$scratch/alone.json" >/dev/null
alone=$(rate "$scratch/alone.json")

# The second process runs far longer than the measured one and is stopped when that one ends.
"$resexp" bench "${common[@]}" bench.windows=1000 bench.json="$scratch/second.json" >/dev/null 2>&1 &
second=$!
sleep 10  # past its start-up (imports, data), into its steps
"$resexp" bench "${common[@]}" bench.windows=3 bench.json="$scratch/beside.json" >/dev/null
beside=$(rate "$scratch/beside.json")

python3 - "$alone" "$beside" <<'EOF'
import sys
alone, beside = map(float, sys.argv[1:])
print(f"alone: {alone:.0f} images/s; beside a second resexp process: {beside:.0f} images/s "
      f"({100 * beside / alone:.0f} % of alone)")
EOF
