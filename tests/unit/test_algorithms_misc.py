"""Entropy / log-probs from logits, value loss, DAPO helpers."""

import math

import pytest
import torch

from verlcli.algorithms import (
    dynamic_sampling_filter,
    entropy_from_logits,
    entropy_from_logits_chunked,
    logprobs_from_logits,
    overlong_reward_penalty,
    value_loss,
)
from verlcli.errors import UserError


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# p = [1/4, 3/4] from logits [0, ln 3]; uniform over 4; a near one-hot row.
LOGITS = torch.tensor([[0.0, math.log(3.0), -math.inf, -math.inf], [1.0, 1.0, 1.0, 1.0],
                       [1000.0, 0.0, 0.0, 0.0]])


def test_entropy_hand_values():
    # −(¼ ln ¼ + ¾ ln ¾) = 0.3465736 + 0.2157616 = 0.5623351; ln 4 = 1.3862944; one-hot: 0
    expected = [0.5623351, 1.3862944, 0.0]
    close(entropy_from_logits(LOGITS[:, :4].clamp(min=-1e4)), expected)
    close(entropy_from_logits_chunked(LOGITS[:, :4].clamp(min=-1e4), chunk_size=2), expected)


def test_logprobs_hand_values():
    labels = torch.tensor([1, 3, 0])
    # ln ¾ = −0.2876821; ln ¼ = −1.3862944; ln(1 / (1 + 3e−1000)) = 0
    close(logprobs_from_logits(LOGITS, labels), [-0.2876821, -1.3862944, 0.0])
    low = logprobs_from_logits(LOGITS[:1].bfloat16(), labels[:1])
    assert low.dtype == torch.float32  # half inputs come back in float32 (upcast per chunk)
    close(low, [-0.2876821], atol=1e-2)  # ln 3 itself is rounded in bf16


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_matches_plain_with_gradients(chunk):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    ent = entropy_from_logits_chunked(logits, chunk_size=chunk)
    lp = logprobs_from_logits(logits, labels, chunk_size=chunk)
    (ent.sum() + lp.sum()).backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref_lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    (ref_ent.sum() + ref_lp.sum()).backward()
    assert ent.shape == lp.shape == (2, 3)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(grad, logits.grad)


def test_chunked_keeps_at_most_one_chunk_of_probabilities():
    # Record every tensor autograd saves for backward outside the checkpointed chunks:
    # nothing of size [rows, V] beyond one chunk may be kept.
    logits = torch.randn(64, 50, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = entropy_from_logits_chunked(logits, chunk_size=8)
    out.sum().backward()
    assert max(saved, default=0) <= 8 * 50
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        entropy_from_logits(logits)
    assert max(saved) == 64 * 50  # the plain version keeps the full softmax


def test_value_loss():
    vpreds = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    values = torch.tensor([[1.5, 1.5, 1.5, 1.5]])  # clip window [1.3, 1.7]
    returns = torch.tensor([[2.0, 2.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = value_loss(vpreds, values, returns, mask, cliprange_value=0.2)
    # t0: max((1−2)², (1.3−2)²) = max(1, 0.49) = 1
    # t1: max((2−2)², (1.7−2)²) = max(0, 0.09) = 0.09   ← the clipped term is larger
    # t2: max((3−0)², (1.7−0)²) = max(9, 2.89) = 9
    # 0.5 · (1 + 0.09 + 9) / 3 = 1.6816667
    assert loss.item() == pytest.approx(1.6816667, abs=1e-6)
    assert m["vf_clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # t0: 0.5·2·(1−2)/3 = −1/3; t1: through the clamp's bound → 0; t2: 0.5·2·3/3 = 1
    close(vpreds.grad, [[-1 / 3, 0.0, 1.0, 0.0]])
    loss, m = value_loss(vpreds, values, returns, mask, cliprange_value=None)
    assert loss.item() == pytest.approx(0.5 * 10 / 3) and m["vf_clipfrac"] == 0.0
    # global token count: the share of a 6-token mini-batch
    loss, _ = value_loss(vpreds, values, returns, mask, 0.2, global_tokens=6)
    assert loss.item() == pytest.approx(0.5 * 10.09 / 6, abs=1e-6)


def test_dynamic_sampling_filter():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    keep, dropped = dynamic_sampling_filter(scores, ["a", "a", "b", "b", "c", "c", "d"])
    # a and c are all-equal groups → dropped; b is mixed; d (one response) is kept (verl)
    assert keep.tolist() == [False, False, True, True, False, False, True]
    assert dropped == 2
    keep, dropped = dynamic_sampling_filter(scores[:2], torch.tensor([3, 3]))
    assert keep.tolist() == [False, False] and dropped == 1


def test_overlong_reward_penalty():
    # max 20, buffer 4 → no penalty up to 16, then −(len − 16)/4 · factor
    out = overlong_reward_penalty(torch.tensor([10, 16, 17, 18, 20]), 20, 4, 1.0)
    close(out, [0.0, 0.0, -0.25, -0.5, -1.0])
    close(overlong_reward_penalty([18, 20], 20, 4, 0.5), [-0.25, -0.5])
    for bad in (0, 21):
        with pytest.raises(UserError, match="buffer"):
            overlong_reward_penalty([1], 20, bad, 1.0)
