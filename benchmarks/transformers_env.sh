#!/usr/bin/env bash
# Side environment for `fastvlm bench-vs-transformers` (issue 15): .venv-hf with transformers'
# FastVlmForConditionalGeneration and what it needs, beside this package.
#
#   transformers' FastVLM tower is a timm model (fastvit_mci3, timm >= 1.0.20), and timm needs
#   torchvision. The main .venv's CPU torch 2.13.0 has no matching torchvision (PyPI's fails to
#   import beside it), so this environment takes torch 2.14.1 + torchvision 0.29.1, which pip on
#   Python 3.11 installs from this machine's disk: a CUDA build that runs on the CPU (~5.5 GB).
#   transformers is pinned to a release inside our ">=5.0,<6" that has the FastVlm classes.
#   Our package goes in with --no-deps (so pip leaves that torch alone), then the light
#   dependencies the CLI and the benchmark import; the training/serving extras are left out.
#   Not part of `make test`. Run again: it skips the install when .venv-hf is already built with
#   the same pins, and prints the versions.
#
#   bash benchmarks/transformers_env.sh
#   .venv-hf/bin/fastvlm bench-vs-transformers
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-hf}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.24.0}
TIMM_VERSION=${TIMM_VERSION:-1.0.31}
PINS="torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION transformers==$TRANSFORMERS_VERSION timm==$TIMM_VERSION"
# what our package needs besides torch and transformers (ninja builds fastvlm.native's kernels)
LIGHT_DEPS="tokenizers>=0.20 safetensors>=0.4 huggingface_hub>=0.24 pillow>=10.0 numpy>=1.24 tqdm>=4.66 ninja>=1.11 pytest"
MARKER="$VENV/.installed"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$PINS $LIGHT_DEPS" ]; then
    echo "$VENV is already built ($PINS)"
else
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --quiet)
    "${PIP[@]}" --upgrade pip
    "${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    "${PIP[@]}" "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" "timm==$TIMM_VERSION"
    "${PIP[@]}" --no-deps -e .
    # shellcheck disable=SC2086  # one argument per requirement
    "${PIP[@]}" "torch==$TORCH_VERSION" $LIGHT_DEPS
    echo "$PINS $LIGHT_DEPS" > "$MARKER"
fi
"$VENV/bin/python" - <<'PY'
import platform

import timm
import torch
import transformers
from transformers import FastVlmForConditionalGeneration  # noqa: F401  (the class the benchmark needs)

import fastvlm

print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"timm {timm.__version__}, fastvlm {fastvlm.__version__ if hasattr(fastvlm, '__version__') else 'dev'}")
PY
