"""Padding removal (engine/packing.py) in the FSDP engine, one rank, tiny-qwen2, fp32.

Packed rows must give what padded rows give: log-probs, entropy and values at every real
response token within 1e-5 (measured ~1e-6: float summation order), and the same gradient
for one update within 1e-5 (atol; grads are O(1e-2..1)). The DeepSpeed ZeRO-3 and Megatron
versions ride in their 2-rank harnesses (test_engine_deepspeed.py, test_megatron.py).
"""

from __future__ import annotations

import pytest
import torch

from verlcli.config.schema import OptimConfig
from verlcli.engine import packing

from _ranks import one_rank_group

P, R = 6, 5
TOL = 1e-5
MODES = ("varlen", "block_mask", "position_ids")


def _rows():
    """Worker layout with ragged prompts and responses, one row with a 1-token response."""
    g = torch.Generator().manual_seed(0)
    lengths = [(6, 5), (3, 1), (4, 3), (2, 5), (5, 4)]
    ids = torch.randint(10, 3000, (len(lengths), P + R), generator=g)
    mask = torch.zeros(len(lengths), P + R, dtype=torch.long)
    for i, (p, r) in enumerate(lengths):
        mask[i, P - p:P + r] = 1
    return ids.masked_fill(mask == 0, 0), mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    with one_rank_group(tmp_path_factory.mktemp("pg")):
        yield


def _engine(kind, optim=None):
    from verlcli.engine.fsdp import FSDPEngine
    from verlcli.models.resolve import resolve_model

    # varlen's attention falls back to SDPA for padded rows: one engine serves every mode.
    return FSDPEngine(resolve_model("tiny-qwen2"), kind=kind, optim=optim, compute_dtype="float32",
                      remove_padding="varlen")


@pytest.fixture(scope="module")
def actor(group):
    return _engine("causal_lm", OptimConfig(lr=1e-3))


def _run(engine, mode, fn):
    engine.pack_mode = mode
    try:
        return fn()
    finally:
        engine.pack_mode = "varlen"


def test_packed_log_probs_and_entropy_equal_padded(actor):
    ids, mask, pos = _rows()
    real = mask[:, -R:].bool()
    with torch.no_grad():
        lp0, ent0 = _run(actor, None, lambda: actor.log_probs(ids, mask, pos, R, 0.7, with_entropy=True))
        for mode in MODES:
            lp, ent = _run(actor, mode, lambda: actor.log_probs(ids, mask, pos, R, 0.7, with_entropy=True))
            assert lp.shape == ent.shape == (len(ids), R)
            assert (lp - lp0)[real].abs().max() < TOL, mode
            assert (ent - ent0)[real].abs().max() < TOL, mode
            assert not lp[~real].any() and not ent[~real].any()  # no token there: zeros


def test_packed_values_equal_padded(group):
    critic = _engine("value")
    with torch.no_grad():  # a fresh head is all zeros: give it something to compare
        for p in packing_head(critic).parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # one rank: the whole tensor
            local.copy_(torch.randn(local.shape, generator=torch.Generator().manual_seed(1)))
    ids, mask, pos = _rows()
    real = mask[:, -R:].bool()
    with torch.no_grad():
        v0 = _run(critic, None, lambda: critic.values(ids, mask, pos, R))
        assert v0[real].abs().min() > 0
        for mode in MODES:
            v = _run(critic, mode, lambda: critic.values(ids, mask, pos, R))
            assert (v - v0)[real].abs().max() < TOL, mode


def packing_head(engine):
    from verlcli.engine.fsdp import value_head

    return value_head(engine.hf_model)


def test_one_update_has_the_same_gradient_packed_and_padded(actor):
    ids, mask, pos = _rows()
    loss_mask = mask[:, -R:].float()

    def grads(mode):
        actor.model.zero_grad(set_to_none=True)
        lp, ent = _run(actor, mode, lambda: actor.log_probs(ids, mask, pos, R, with_entropy=True))
        loss = -((lp + 0.01 * ent) * loss_mask).sum() / loss_mask.sum()
        actor.backward(loss)
        return {n: p.grad.full_tensor().clone() for n, p in actor.model.named_parameters()}

    padded = grads(None)
    for mode in ("varlen", "block_mask"):
        packed = grads(mode)
        for name, g in padded.items():
            torch.testing.assert_close(packed[name], g, atol=TOL, rtol=0, msg=lambda m: f"{mode} {name}: {m}")
    actor.model.zero_grad(set_to_none=True)


def test_pack_scatter_round_trip_and_refusals():
    ids, mask, pos = _rows()
    p = packing.pack(ids, mask, pos, R)
    assert p.input_ids.shape == (1, int(mask.sum()))
    assert p.cu_seqlens.tolist() == [0, 11, 15, 22, 29, 38]
    assert p.position_ids[0, :11].tolist() == list(range(11))
    back = packing.scatter(p, p.labels.float())
    assert torch.equal(back.long(), ids[:, -R:] * mask[:, -R:])
    with pytest.raises(ValueError, match="position ids"):
        packing.pack(ids, mask, pos + 1, R)
    no_prompt = mask.clone()
    no_prompt[0, :P] = 0
    with pytest.raises(ValueError, match="first token"):
        packing.pack(ids, no_prompt, (no_prompt.cumsum(-1) - 1).clamp(min=0), R)
    assert packing.resolve("auto") == "varlen" and packing.resolve(False) is None
    no_response = mask.clone()
    no_response[:, P:] = 0  # nothing to predict: the engines keep padded rows (and their graph)
    assert packing.applies("varlen", mask, R) and not packing.applies("varlen", no_response, R)
