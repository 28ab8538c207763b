#!/usr/bin/env bash
# Create .venv (if missing) and install adadamp into it with the experiments
# extra (matplotlib, mnist1d) and its test tools.
#
# PyTorch is installed first, and only when the environment has none: a
# plain `pip install torch` resolves to the CUDA build with several GB of GPU
# libraries. TORCH_SPEC picks what to install (default: the CPU build that
# this project's machines carry); set TORCH_PIP_ARGS to add pip options such
# as `--index-url https://download.pytorch.org/whl/cpu` elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086
    pip install $TORCH_PIP_ARGS "$TORCH_SPEC"
fi
# The package requires torch>=2.1, which the install above satisfies: pip adds no second torch.
pip install -e ".[experiments,test]"
