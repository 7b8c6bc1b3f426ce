#!/usr/bin/env bash
# Create the virtual environment and install globalattn with the extras asked for.
#
#   scripts/setup.sh VENV [EXTRAS]      e.g. scripts/setup.sh .venv dev
#
# torch is the one heavy dependency, and a bare "torch" requirement pulls a multi-GB CUDA build.
# So: a torch that is already importable is never reinstalled (the venv sees the system's one);
# otherwise a machine with an NVIDIA driver gets the default build and one without gets the CPU
# build (from pip's own index or find-links first, e.g. a wheel lying on disk; else PyTorch's CPU
# index).
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.5"
  else
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi

"${pip[@]}" -e ".${extras:+[$extras]}"
