"""agg_loss and the masked helpers: hand-computed values and split invariance."""

import pytest
import torch

from verlcli.algorithms import (
    LOSS_AGG_MODES,
    agg_loss,
    count_tokens_and_seqs,
    masked_mean,
    masked_whiten,
)
from verlcli.errors import UserError

# Row 0: 2 valid tokens (1, 2), row 1: 1 valid token (4), row 2: all padding.
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("seq-mean-token-sum", 3.5),  # (3 + 4) / 2 non-empty rows; the padding row does not count
        ("seq-mean-token-mean", 2.75),  # (3/2 + 4/1) / 2
        ("seq-mean-token-sum-norm", 7 / 6),  # (3/3 + 4/3) / 2 with L = T = 3
    ],
)
def test_modes_local(mode, expected):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expected, abs=1e-6)


def test_global_counts_and_scale_factor():
    # With the whole mini-batch's counts the micro-batch result is a share of the mean.
    assert agg_loss(LOSS, MASK, "token-mean", global_tokens=14).item() == pytest.approx(0.5)  # 7/14
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum", global_seqs=7).item() == pytest.approx(1.0)  # 7/7
    # (3/10 + 4/10) / 2 = 0.35
    got = agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", loss_scale_factor=10).item()
    assert got == pytest.approx(0.35)


def test_padding_garbage_and_all_masked():
    poisoned = LOSS.clone()
    poisoned[0, 2] = float("nan")
    poisoned[2, :] = float("inf")
    assert agg_loss(poisoned, MASK, "token-mean").item() == pytest.approx(7 / 3)
    nothing = torch.zeros_like(MASK)
    for mode in LOSS_AGG_MODES:
        assert agg_loss(poisoned, nothing, mode).item() == 0.0  # not NaN
        assert agg_loss(poisoned, nothing, mode, global_tokens=5, global_seqs=2).item() == 0.0


def test_unknown_mode_is_user_error():
    with pytest.raises(UserError, match="token-mean"):
        agg_loss(LOSS, MASK, "token-sum")


def _micro_batches(loss, mask, sizes, trim):
    """Cut rows into consecutive micro-batches; with `trim` each one is cut to its own
    longest response (as a packer/padder would), so T differs between micro-batches."""
    start = 0
    for size in sizes:
        sub_loss, sub_mask = loss[start:start + size], mask[start:start + size]
        if trim:
            width = max(int(sub_mask.sum(-1).max()), 1)
            sub_loss, sub_mask = sub_loss[:, :width], sub_mask[:, :width]
        yield sub_loss, sub_mask
        start += size


LENGTHS = [6, 1, 3, 0, 5, 2, 6, 4]  # uneven, one empty row


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize(
    "sizes, trim",
    [([8], False), ([4, 4], False), ([2, 2, 2, 2], False), ([1] * 8, False),
     ([3, 5], False), ([3, 5], True), ([2, 2, 2, 2], True), ([1, 6, 1], True)],
)
def test_split_invariance(mode, sizes, trim):
    loss = (torch.arange(48, dtype=torch.float64).reshape(8, 6) - 20) / 7
    mask = (torch.arange(6)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    tokens, seqs = count_tokens_and_seqs(mask)
    assert (tokens, seqs) == (27, 7)
    # Each micro-batch is a (rank, micro-step) slice; all of them summed must give the mean.
    total = sum(
        agg_loss(l, m, mode, global_tokens=tokens, global_seqs=seqs, loss_scale_factor=6)
        for l, m in _micro_batches(loss, mask, sizes, trim)
    )
    unsplit = agg_loss(loss, mask, mode, loss_scale_factor=6)
    assert torch.allclose(total, unsplit, rtol=0, atol=1e-12)
    # ... and the unsplit value is the definition, written out independently:
    valid = mask.bool()
    row_sums = (loss * mask).sum(-1)
    nonempty = valid.any(-1)
    direct = {
        "token-mean": (loss * mask).sum() / valid.sum(),
        "seq-mean-token-sum": row_sums[nonempty].sum() / nonempty.sum(),
        "seq-mean-token-mean": (row_sums[nonempty] / valid.sum(-1)[nonempty]).sum() / nonempty.sum(),
        "seq-mean-token-sum-norm": (row_sums[nonempty] / 6).sum() / nonempty.sum(),
    }[mode]
    assert torch.allclose(unsplit, direct, rtol=0, atol=1e-12)


def test_local_normalisation_is_not_split_invariant():
    # Why the global counts exist: averaging per-micro-batch means weighs a 1-token
    # micro-batch like a 6-token one.  Rows: [6 tokens of 1.0], [1 token of 8.0].
    loss = torch.tensor([[1.0] * 6, [8.0] + [0.0] * 5])
    mask = torch.tensor([[1] * 6, [1] + [0] * 5])
    mean_of_means = (agg_loss(loss[:1], mask[:1]) + agg_loss(loss[1:], mask[1:])) / 2  # (1 + 8)/2
    assert mean_of_means.item() == pytest.approx(4.5)
    assert agg_loss(loss, mask).item() == pytest.approx(2.0)  # (6 + 8) / 7


def test_masked_mean_and_whiten():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)  # (1+2+3)/3
    assert masked_mean(values, mask, dim=-1).tolist() == pytest.approx([1.5, 3.0])
    # mean 2, unbiased var ((−1)² + 0 + 1²)/(3−1) = 1, so (x − 2)/sqrt(1 + 1e-8)
    expected = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(values, mask), expected, atol=1e-6, rtol=0)
    # fewer than 2 valid entries: no spread to normalise by → zeros, not NaN / an error
    assert masked_whiten(values, torch.tensor([[1, 0, 0], [0, 0, 0]])).abs().sum().item() == 0.0
    assert masked_whiten(values, torch.zeros_like(mask)).abs().sum().item() == 0.0
