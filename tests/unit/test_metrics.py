import torch

from verlcli.data.batch import Batch
from verlcli.models.resolve import resolve_model
from verlcli.trainer.metrics import count_params, throughput


def test_count_params_reads_safetensors_headers():
    # tiny-qwen2: 985,216 parameters (tied embeddings stored once)
    assert count_params(resolve_model("tiny-qwen2")) == 985_216


def test_mfu_only_on_gpu_and_by_hand():
    b = Batch({"response_mask": torch.ones(2, 3), "attention_mask": torch.ones(2, 5)})
    timing = {"timing/step_s": 2.0, "timing/gen_s": 1.0, "timing/update_actor_s": 1.0}
    cpu = throughput(b, timing, 1, 10**9, "cpu")
    assert "perf/mfu_actor_update" not in cpu and cpu["perf/tokens_per_s"] == 5.0
    gpu = throughput(b, timing, 2, 10**9, "cuda")
    # 6 · 1e9 params · 10 tokens / 1 s / (989e12 · 2 GPUs)
    assert abs(gpu["perf/mfu_actor_update"] - 6e10 / 1.978e15) < 1e-12
