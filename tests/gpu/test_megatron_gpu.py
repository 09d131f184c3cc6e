"""The megatron engine on one CUDA device (TP=1, NCCL world of 1): logits equal transformers'
and a training step runs. Skipped without CUDA or without megatron-core. Pipeline parallel
is not tested anywhere: the engine refuses pipeline_parallel_size > 1 (see engine/megatron.py)."""

import os
import socket

import pytest
import torch

pytest.importorskip("megatron.core")


@pytest.mark.gpu
def test_megatron_tp1_on_cuda_matches_transformers():
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from verlcli.config.schema import OptimConfig
    from verlcli.engine.megatron import MegatronEngine
    from verlcli.models.resolve import resolve_model

    path = str(resolve_model("tiny-qwen2"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    eng = MegatronEngine(path, device="cuda", compute_dtype="float32", optim=OptimConfig(lr=1e-3),
                         total_optimizer_steps=2)
    ids = torch.randint(10, 3000, (2, 12))
    mask = torch.ones_like(ids)
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        got = eng.forward_logits(ids, mask, pos).cpu()
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(input_ids=ids).logits
    assert (got - ref).abs().max() < 1e-3  # TF32 matmuls may be on
    lp, _ = eng.log_probs(ids, mask, pos, 4)
    eng.backward(-lp.mean())
    assert eng.step()["grad_norm"] > 0
