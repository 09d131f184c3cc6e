"""GRPO on one GPU: the hybrid engine with NCCL, bf16 FSDP2 and vLLM with sleep/wake."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _verl(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "verlcli.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


@pytest.mark.gpu
def test_grpo_one_gpu(tmp_path):
    # The lent GPU machine has neither vLLM nor Ray: hf rollout and the local launcher there.
    engine = "vllm" if importlib.util.find_spec("vllm") else "hf"
    launcher = "ray" if importlib.util.find_spec("ray") else "local"
    _verl("prepare-data", "arithmetic", "--train-size", "64", "--test-size", "16", cwd=tmp_path)
    run = tmp_path / "run"
    _verl("grpo", "--preset", "tiny-cpu", "resources.device=cuda", "resources.devices_per_node=1",
          "rollout.dtype=bfloat16", "resources.compute_dtype=bfloat16", f"rollout.engine={engine}", f"launcher={launcher}",
          f"trainer.run_dir={run}", "trainer.total_steps=3", "logging.progress_bar=false", cwd=tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "score/mean" in r][-1]
    assert last["step"] == 3 and last["mem/peak_gpu_gb"] > 0 and last["perf/mfu_actor_update"] > 0
    assert last["rollout/logprob_gap_mean"] < 0.2  # bf16 rollout vs bf16 trainer
