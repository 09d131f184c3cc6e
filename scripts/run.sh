#!/usr/bin/env bash
# One command from a fresh machine to a running job: set up, prepare the arithmetic task,
# and train the embedded default (SmolLM2-135M-Instruct, offline) with GRPO on this CPU.
# Extra arguments go to `verl grpo` (e.g. trainer.total_steps=5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Operands 1-12 (what SmolLM2 knows best) and a one-line answer format in the system turn.
verl prepare-data arithmetic --max-operand 12 \
    --system-prompt $'Answer with only the equation and the final number after ####, like: 6 * 7 = 42\n#### 42'
verl grpo --preset smollm2-135m-cpu "$@"
verl report runs/smollm2-135m-cpu --out runs/smollm2-135m-cpu/plots || true
