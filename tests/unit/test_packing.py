"""Sequence packing: the packed loss equals the unpacked loss, and samples in one row never
see each other (transformers' position-id packing, checked on the installed version)."""

from __future__ import annotations

import pytest
import torch

from verlcli.data.packing import block_causal_mask, build_micro_batch, pack_rows, segment_ids, shifted_targets
from verlcli.workers.sft import token_loss_sum

PAD = 0


def _samples(seed: int = 0, lengths=(9, 5, 12, 3, 7, 6)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, 3000, (n,), generator=g).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)  # "prompt" half, then "assistant" half
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    from verlcli.models.resolve import resolve_model

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(resolve_model("tiny-qwen2")), dtype=torch.float32,
                                             attn_implementation="sdpa")
    return m.eval()


def _forward(model, mb, explicit: bool = False):
    """explicit: packed rows get the 4D additive mask (what SFTWorker does); else position ids
    alone (attention_mask=None). use_cache=False matters: a cache turns the detection off."""
    mask = mb["attention_mask"]
    if mask is None and explicit:
        mask = block_causal_mask(mb["position_ids"])
    return model(input_ids=mb["input_ids"], attention_mask=mask, position_ids=mb["position_ids"],
                 use_cache=False).logits


def _loss(model, mb, explicit: bool = False):
    s, n = token_loss_sum(_forward(model, mb, explicit), mb["targets"], mb["target_mask"])
    return s / n, n

BOTH = pytest.mark.parametrize("explicit", [False, True], ids=["position_ids", "4d_mask"])


# ---------------------------------------------------------------- layout, no model


def test_pack_rows_first_fit_decreasing_respects_capacity():
    lengths = [9, 5, 12, 3, 7, 6]
    rows = pack_rows(lengths, capacity=16)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 16 for r in rows)
    assert len(rows) == 3  # 42 tokens need at least 3 rows of 16
    with pytest.raises(ValueError, match="over the row capacity"):
        pack_rows([20], capacity=16)


def test_position_ids_restart_per_sample_and_targets_stay_inside_samples():
    samples = _samples()
    mb = build_micro_batch(samples, PAD, packing=True, capacity=16)
    assert mb["attention_mask"] is None
    assert mb["tokens"] == sum(len(s["input_ids"]) for s in samples)
    for r in range(mb["input_ids"].shape[0]):
        pos, ids = mb["position_ids"][r].tolist(), mb["input_ids"][r].tolist()
        starts = [t for t in range(len(pos)) if pos[t] == 0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            assert pos[a:b] == list(range(b - a))  # 0, 1, 2, ... per sample (and for the padding)
        # The token predicted at the last position of a sample is never in the loss.
        for t in starts[1:]:
            assert mb["target_mask"][r, t - 1] == 0
        # Every target is the next token of the same row where the mask is on.
        for t in range(len(pos) - 1):
            if mb["target_mask"][r, t]:
                assert mb["targets"][r, t] == ids[t + 1] and pos[t + 1] == pos[t] + 1
    assert segment_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert shifted_targets([5, 6, 7], [0, 1, 1], PAD) == ([6, 7, PAD], [1, 1, 0])


def test_unpacked_rows_are_right_padded_with_a_2d_mask():
    samples = _samples()
    mb = build_micro_batch(samples, PAD, packing=False, capacity=16)
    assert mb["input_ids"].shape == (6, 12)
    assert mb["attention_mask"].sum(-1).tolist() == [len(s["input_ids"]) for s in samples]
    assert mb["input_ids"][3, 3:].eq(PAD).all() and mb["target_mask"][3, 2:].eq(0).all()


# ---------------------------------------------------------------- with a real model


@BOTH
def test_packed_loss_equals_unpacked_loss(model, explicit):
    samples = _samples()
    unpacked = build_micro_batch(samples, PAD, packing=False, capacity=16)
    packed = build_micro_batch(samples, PAD, packing=True, capacity=16)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    with torch.no_grad():
        lu, nu = _loss(model, unpacked)
        lp, np_ = _loss(model, packed, explicit)
    assert nu == np_ == sum(sum(s["loss_mask"][1:]) for s in samples)
    torch.testing.assert_close(lp, lu, rtol=1e-6, atol=1e-6)


def test_packed_gradients_equal_unpacked_gradients(model):
    samples = _samples(seed=1)
    grads = []
    for packing in (False, True):
        model.zero_grad(set_to_none=True)
        loss, _ = _loss(model, build_micro_batch(samples, PAD, packing=packing, capacity=20), explicit=True)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@BOTH
def test_no_cross_sample_attention_in_a_packed_row(model, explicit):
    a, b = _samples(seed=2, lengths=(8, 6))
    a2 = {**a, "input_ids": [(t * 7 + 11) % 3000 for t in a["input_ids"]]}  # A changed, B the same
    with torch.no_grad():
        rows = [build_micro_batch([x, b], PAD, packing=True, capacity=32) for x in (a, a2)]
        assert rows[0]["input_ids"].shape[0] == 1  # both samples share one row
        logits = [_forward(model, mb, explicit)[0] for mb in rows]
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits[0]
    torch.testing.assert_close(logits[0][8:14], logits[1][8:14], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[0][8:14], alone, rtol=1e-5, atol=1e-5)
    assert (logits[0][:8] - logits[1][:8]).abs().max() > 1e-2  # A's own logits did change


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_the_traps_that_would_leak_across_samples(model, impl):
    """A 2D mask of ones, or a KV cache, turns position-id packing off; a bool 4D mask is
    wrong under eager. The additive 4D mask is right under both implementations."""
    from transformers import AutoModelForCausalLM

    from verlcli.models.resolve import resolve_model

    if impl == "eager":
        model = AutoModelForCausalLM.from_pretrained(str(resolve_model("tiny-qwen2")), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    a, b = _samples(seed=3, lengths=(8, 6))
    mb = build_micro_batch([a, b], PAD, packing=True, capacity=32)
    ids, pos = mb["input_ids"], mb["position_ids"]

    def b_logits(**kw):
        return model(input_ids=ids, position_ids=pos, **kw).logits[0, 8:14]

    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits[0]
        leaky_mask = b_logits(attention_mask=torch.ones_like(ids), use_cache=False)
        leaky_cache = b_logits(use_cache=True)
        with_bool = b_logits(attention_mask=block_causal_mask(pos) == 0, use_cache=False)
        additive = b_logits(attention_mask=block_causal_mask(pos), use_cache=False)
    assert (leaky_mask - alone).abs().max() > 1e-2
    assert (leaky_cache - alone).abs().max() > 1e-2
    assert ((with_bool - alone).abs().max() < 1e-4) == (impl == "sdpa")  # eager adds it: wrong
    torch.testing.assert_close(additive, alone, rtol=1e-5, atol=1e-5)
