#!/usr/bin/env bash
# Create .venv (if missing) and install openus_hub with its test, timm and plot extras. Idempotent: a second run only
# checks what is there.
#
# What it installs, and roughly how large (measured on Linux x86-64, Python 3.11):
#   1. torch 2.14.1 + torchvision 0.29.1: the default torch build is a CUDA build (it also runs on a CPU) and pulls
#      in NVIDIA's CUDA libraries: about 3 GB of wheels, about 5.5 GB installed. Installed first so that the package's
#      version ranges install nothing more.
#   2. openus_hub (editable) with transformers, huggingface_hub, safetensors, pydicom, timm, matplotlib, pytest,
#      jupyter's kernel and their dependencies: about 0.5 GB installed.
# Expect about 6 GB in .venv and several minutes (most of it unpacking torch and the CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { printf '\n==> [%s] %s\n' "$1" "$2"; }

if [ ! -x .venv/bin/python ]; then
  step 1/5 "creating .venv with $(python3 --version)"
  python3 -m venv .venv
else
  step 1/5 "using the existing .venv ($(.venv/bin/python --version))"
fi
step 2/5 "upgrading pip"
.venv/bin/pip install --upgrade --progress-bar on pip
step 3/5 "torch 2.14.1 + torchvision 0.29.1 (CUDA build, runs on CPU too): ~3 GB of wheels, ~5.5 GB installed"
.venv/bin/pip install --progress-bar on "torch==2.14.1" "torchvision==0.29.1"
step 4/5 "openus_hub (editable) with the test, timm and plot extras: ~0.5 GB installed"
.venv/bin/pip install --progress-bar on -e ".[test,timm,plot]"
step 5/5 "building the CPU scan kernel (a second or two, once per machine, shared by every venv)"
# Without a C++ compiler this prints the fix, and openus_hub falls back to the PyTorch scan.
.venv/bin/python -m openus_hub.ops.build || true

printf '\n==> done in %d s: .venv holds %s\n' "$((SECONDS - start))" "$(du -sh .venv 2>/dev/null | cut -f1)"
printf 'next: .venv/bin/python -m training.quickstart --output-dir quickstart_out   # the main job\n'
printf '      .venv/bin/python -m pytest -q                                         # the tests\n'
