#!/usr/bin/env bash
# Create .venv in the project folder and install resexp into it (editable), with the test tools.
# torch/torchvision are pinned to a matching pair; TORCH_SPEC replaces the pair, word for word, e.g.
#   TORCH_SPEC="torch==X torchvision==Y"
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
# (the second is PyTorch's CPU-only build: about 1 GB instead of about 5 GB with the CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "installed: .venv/bin/resexp (or run 'source .venv/bin/activate' once in this shell, then plain resexp)"
