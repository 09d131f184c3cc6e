#!/usr/bin/env bash
# The GPU check, for the lent GPU machine (one H200 lately): Python 3.12, torch, transformers,
# no Ray, no vLLM, no network, this repo copied there; one call of at most ~8 minutes.
#
#   bash bench/gpu_check.sh            # from the repo root; results also go to $OUT if set
#
# What it runs: the FSDP engine at world size 1 (launcher=local) with the hf rollout,
# GRPO and PPO on random-init Qwen2.5-0.5B and -1.5B shapes, 3 steps each, one summary line
# per run (per-phase seconds, actor-update MFU, generation tokens/s, weight-sync GB/s, peak
# GPU memory, and `verl plan`'s estimate for the same config), then `pytest -m gpu tests/gpu`.
# Knobs (env): GPU_CHECK_SHAPES ("qwen2.5-0.5b qwen2.5-1.5b"), GPU_CHECK_ALGOS ("grpo ppo"),
# GPU_CHECK_PROMPTS (16), GPU_CHECK_N (4), GPU_CHECK_RESPONSE (128), GPU_CHECK_STEPS (3),
# GPU_CHECK_BUDGET_S (330: runs that would start after this are skipped, so pytest still
# runs), GPU_CHECK_DEVICE (cuda; cpu with GPU_CHECK_SHAPES=tiny tries the script anywhere).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$REPO/bench/results}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpuchk.XXXX")"
trap 'rm -rf "$WORK"' EXIT
RESULTS="$OUT_DIR/gpu_check.jsonl"
: >"$RESULTS"
START=$SECONDS
SHAPES="${GPU_CHECK_SHAPES:-qwen2.5-0.5b qwen2.5-1.5b}"
ALGOS="${GPU_CHECK_ALGOS:-grpo ppo}"
PROMPTS="${GPU_CHECK_PROMPTS:-16}"
N="${GPU_CHECK_N:-4}"
RESPONSE="${GPU_CHECK_RESPONSE:-128}"
STEPS="${GPU_CHECK_STEPS:-3}"
BUDGET="${GPU_CHECK_BUDGET_S:-330}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"

# Our package without installing anything (pip could not fetch a build backend offline).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export VERL_HOME="$WORK/home" VERL_PEAK_TFLOPS="${VERL_PEAK_TFLOPS:-989}"  # H100/H200 dense bf16
verl() { "$PY" -m verlcli.cli "$@"; }

echo "[gpu_check] $(date -u +%FT%TZ) on $(hostname)"
"$PY" - <<'EOF'
import importlib, sys
import torch
print(f"[gpu_check] python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}")
missing = [m for m in ("transformers", "pydantic", "yaml", "typer", "rich", "pyarrow", "safetensors", "tokenizers")
           if importlib.util.find_spec(m) is None]
for m in ("ray", "vllm"):
    print(f"[gpu_check] {m}: {'present' if importlib.util.find_spec(m) else 'absent (fine: launcher=local, rollout.engine=hf)'}")
if missing:
    sys.exit(f"[gpu_check] missing Python packages: {', '.join(missing)} — nothing can run")
EOF
[[ $? -eq 0 ]] || exit 1

# Device memory for `verl plan`, when the schema has the key (another engineer's work).
PLAN_EXTRA=()
if "$PY" -c "from verlcli.config.schema import ResourcesConfig as R; assert 'device_memory_gb' in R.model_fields" 2>/dev/null \
   && [[ "$DEVICE" == cuda ]]; then
  MEM=$("$PY" -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))")
  PLAN_EXTRA=("resources.device_memory_gb=$MEM")
fi
HAVE_PLAN=0
verl plan --help >/dev/null 2>&1 && HAVE_PLAN=1

cd "$WORK"
verl prepare-data arithmetic --train-size 256 --test-size 16 --seed 0 >/dev/null || exit 1

for shape in $SHAPES; do
  if (( SECONDS - START > BUDGET )); then echo "[gpu_check] SKIPPED $shape (budget ${BUDGET}s spent)"; continue; fi
  model="$WORK/models/$shape"
  t0=$SECONDS
  "$PY" "$REPO/bench/gpu_check.py" model "$shape" "$model" || { echo "[gpu_check] FAILED building $shape"; continue; }
  echo "[gpu_check] $shape built in $((SECONDS - t0)) s"
  for algo in $ALGOS; do
    if (( SECONDS - START > BUDGET )); then echo "[gpu_check] SKIPPED $shape $algo (budget ${BUDGET}s spent)"; continue; fi
    run="$WORK/runs/$shape-$algo"
    args=(--preset tiny-cpu "model.path=$model" launcher=local rollout.engine=hf
          resources.nodes=1 resources.devices_per_node=1 "resources.device=$DEVICE" resources.compute_dtype=auto
          rollout.dtype=auto "rollout.n=$N" "data.train_prompts_per_step=$PROMPTS"
          "actor.mini_batch_prompts=$((PROMPTS / 2))" "critic.mini_batch_prompts=$((PROMPTS / 2))"
          actor.micro_batch_sequences_per_device=8 critic.micro_batch_sequences_per_device=8
          data.max_prompt_tokens=128 "data.max_response_tokens=$RESPONSE" actor.use_kl_loss=true
          "trainer.total_steps=$STEPS" trainer.val_before_train=false trainer.val_every=0
          "trainer.run_dir=$run" logging.progress_bar=false)
    [[ "$algo" == ppo ]] && args+=(algorithm.adv_estimator=gae)  # the verb sets it; `verl plan` must see it too
    plan_log="$WORK/plan-$shape-$algo.log"
    if (( HAVE_PLAN )); then
      COLUMNS=200 verl plan --kind "$algo" "${args[@]}" "${PLAN_EXTRA[@]}" >"$plan_log" 2>&1 \
        || echo "[gpu_check] verl plan exited $? for $shape $algo (see below)"
      grep -E "verdict|time per step" "$plan_log" | sed "s/^/[gpu_check] plan $shape $algo: /"
    fi
    t0=$SECONDS
    if verl "$algo" "${args[@]}" >"$WORK/$shape-$algo.log" 2>&1; then
      echo "[gpu_check] $shape $algo: $STEPS steps in $((SECONDS - t0)) s (start-up included)"
      "$PY" "$REPO/bench/gpu_check.py" summary "$shape-$algo" "$run" "$plan_log" --out "$RESULTS"
    else
      echo "[gpu_check] FAILED $shape $algo after $((SECONDS - t0)) s; last lines:"
      tail -n 30 "$WORK/$shape-$algo.log"
    fi
    cp "$WORK/$shape-$algo.log" "$OUT_DIR/" 2>/dev/null || true
    rm -rf "$run"  # checkpoints of 1.5B actor + critic are ~36 GB: free the disk for the next run
  done
  rm -rf "$model"
done

cd "$REPO"
echo "[gpu_check] pytest -m gpu tests/gpu ($((SECONDS - START)) s so far)"
"$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -n 25
echo "[gpu_check] done in $((SECONDS - START)) s; results: $RESULTS"
