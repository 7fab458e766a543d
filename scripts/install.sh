#!/usr/bin/env bash
# Create .venv (if missing) and install openus_hub with its test and timm extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
# torchvision (for timm) needs its matching torch: 2.14.1 + 0.29.1 (on our machines both come from local disk; the
# torch build is a CUDA one that runs on CPU). Installed first, so the package's ranges install nothing more.
.venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install --quiet -e ".[test,timm]"
# the transformers and timm test suites that tests/models/ runs OpenUS against (from their sdists on the package index)
.venv/bin/python scripts/fetch_peer_tests.py
