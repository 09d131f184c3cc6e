#!/usr/bin/env bash
# Set up, then run the test suite (unit + e2e; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python3 -m pytest -q tests/unit tests/e2e tests/gpu "$@"
