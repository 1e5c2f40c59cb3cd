#!/usr/bin/env bash
# Create .venv in the project folder and install resexp into it (editable), with the test tools.
# torch/torchvision are pinned to a matching pair (override with TORCH_SPEC="torch==X torchvision==Y").
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "installed: .venv/bin/resexp"
