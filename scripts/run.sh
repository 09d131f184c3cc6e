#!/usr/bin/env bash
# One command from a fresh machine to a running job: set up, prepare the arithmetic task,
# and train the embedded default (SmolLM2-135M-Instruct, offline) with GRPO on this CPU.
# Extra arguments go to `verl grpo` (e.g. trainer.total_steps=5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
verl prepare-data arithmetic
verl grpo --preset smollm2-135m-cpu "$@"
verl report runs/smollm2-135m-cpu --out runs/smollm2-135m-cpu/plots || true
