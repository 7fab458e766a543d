#!/usr/bin/env bash
# Create .venv (if missing) and install openus_hub with its test extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
# the CPU build of torch first (a local wheel on our machines); a range it satisfies then installs nothing more
.venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[test]"
