"""Padding removal on a GPU: packed rows (flash-attn varlen when installed, else per-sequence
SDPA) give the padded log-probs in bf16 within 0.05 (bf16 logits: ~1e-2 differences)."""

import tempfile

import pytest
import torch
import torch.distributed as dist


@pytest.mark.gpu
def test_packed_log_probs_equal_padded_on_gpu():
    from verlcli.engine import packing
    from verlcli.engine.fsdp import FSDPEngine
    from verlcli.models.resolve import resolve_model

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    try:
        engine = FSDPEngine(resolve_model("tiny-qwen2"), device="cuda", compute_dtype="bfloat16",
                            remove_padding="varlen")
        want = "flash_attention_2" if packing.flash_attn_available() else packing.VARLEN_ATTENTION
        assert engine.hf_model.config._attn_implementation == want
        P, R = 6, 5
        ids = torch.randint(10, 3000, (4, P + R), generator=torch.Generator().manual_seed(0))
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate([(6, 5), (3, 1), (4, 3), (2, 5)]):
            mask[i, P - p:P + r] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        real = mask[:, -R:].bool().cuda()
        with torch.no_grad():
            packed = engine.log_probs(ids, mask, pos, R)[0]
            engine.pack_mode = None
            padded = engine.log_probs(ids, mask, pos, R)[0]
        assert (packed - padded)[real].abs().max() < 0.05
    finally:
        if created:
            dist.destroy_process_group()
