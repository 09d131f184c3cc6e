"""Policy losses against hand-computed losses, gradients and metrics."""

import math

import pytest
import torch

from verlcli.algorithms import POLICY_LOSSES, PolicyLossConfig
from verlcli.errors import UserError

LN = math.log


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def run(name, old, new, adv, mask, mode="token-mean", cfg=None, **kw):
    log_prob = torch.tensor(new, requires_grad=True)
    loss, metrics = POLICY_LOSSES.get(name)(
        torch.tensor(old), log_prob, torch.tensor(adv), torch.tensor(mask), mode, cfg, **kw)
    loss.backward()
    return loss, metrics, log_prob.grad


# Four tokens, old log-prob 0, ratios 1.5, 0.5, 0.5, 5 and advantages +1, +1, −1, −1.
VANILLA = dict(old=[[0.0] * 4], new=[[LN(1.5), LN(0.5), LN(0.5), LN(5.0)]],
               adv=[[1.0, 1.0, -1.0, -1.0]], mask=[[1, 1, 1, 1]])


def test_vanilla_ppo_with_dual_clip():
    loss, m, grad = run("vanilla", **VANILLA)
    # t0 A=+1 r=1.5: max(−1.5, −1.2) = −1.2   (clipped above)
    # t1 A=+1 r=0.5: max(−0.5, −0.8) = −0.5   (unclipped)
    # t2 A=−1 r=0.5: max(0.5, 0.8) = 0.8      (clipped below), dual min(0.8, 3) = 0.8
    # t3 A=−1 r=5:   max(5, 1.2) = 5,          dual min(5, 3) = 3
    # token-mean: (−1.2 − 0.5 + 0.8 + 3) / 4 = 0.525
    assert loss.item() == pytest.approx(0.525, abs=1e-6)
    assert m["pg_clipfrac"] == pytest.approx(0.5)  # t0 and t2
    assert m["pg_clipfrac_lower"] == pytest.approx(0.25)  # t3
    # ppo_kl = mean(old − new) = −ln(1.5·0.5·0.5·5)/4 = −ln(1.875)/4
    assert m["ppo_kl"] == pytest.approx(-0.1571522, abs=1e-6)
    # only t1 carries gradient: d(−A·r)/d log π = −A·r = −0.5, over 4 tokens
    close(grad, [[0.0, -0.125, 0.0, 0.0]])


def test_vanilla_clip_higher():
    loss, _, _ = run("vanilla", **VANILLA, cfg=PolicyLossConfig(clip_ratio_high=0.28))
    # t0 now clipped at 1.28: (−1.28 − 0.5 + 0.8 + 3) / 4 = 0.505
    assert loss.item() == pytest.approx(0.505, abs=1e-6)


def test_truncated_importance_sampling():
    base = dict(old=[[-1.0, -1.0]], new=[[-1.0, -1.0]], adv=[[1.0, 1.0]], mask=[[1, 1]])
    rollout = torch.tensor([[-1.0 - LN(3.0), -1.0 + LN(2.0)]])  # π_old/π_rollout = 3, 0.5
    loss, _, _ = run("vanilla", **base, cfg=PolicyLossConfig(tis_imp_ratio_cap=2.0), rollout_log_prob=rollout)
    # per-token loss −1 (r = 1), weights min(3, 2) = 2 and 0.5 → (−2 − 0.5) / 2
    assert loss.item() == pytest.approx(-1.25, abs=1e-6)
    loss, _, _ = run("vanilla", **base, rollout_log_prob=rollout)  # cap 0 = off
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)


def test_gspo_sequence_ratio():
    loss, m, grad = run(
        "gspo", old=[[0.0, 0.0], [0.0, 0.0]], new=[[LN(2.0), 0.0], [LN(0.9), 5.0]],
        adv=[[1.0, 1.0], [-1.0, -1.0]], mask=[[1, 1], [1, 0]],
        mode="token-mean",  # ignored: GSPO always aggregates seq-mean-token-mean
    )
    # row 0: s = exp((ln 2 + 0)/2) = √2 = 1.414 > 1.2, A=+1 → −1.2 on both tokens
    # row 1: s = exp(ln 0.9 / 1) = 0.9 (padding ignored), A=−1 → max(0.9, 0.9) = 0.9
    # seq-mean-token-mean: (−1.2 + 0.9) / 2 = −0.15
    assert loss.item() == pytest.approx(-0.15, abs=1e-6)
    assert m["pg_clipfrac"] == pytest.approx(2 / 3)
    # gradient only in row 1: −A·s = 0.9, times 1/2 (sequences) · 1/1 (tokens)
    close(grad, [[0.0, 0.0], [0.45, 0.0]])


def test_cispo_keeps_gradient_of_clipped_tokens():
    loss, m, grad = run(
        "cispo", old=[[-1.0 - LN(2.0), -2.0, -0.5 + LN(2.0)]], new=[[-1.0, -2.0, -0.5]],
        adv=[[1.0, -1.0, 1.0]], mask=[[1, 1, 1]],
    )
    # ratios 2, 1, 0.5 → detached weights 1.2, 1, 0.8; loss −w·A·log π:
    # −1.2·1·(−1) = 1.2, −1·(−1)·(−2) = −2, −0.8·1·(−0.5) = 0.4 → mean −0.4/3
    assert loss.item() == pytest.approx(-0.4 / 3, abs=1e-6)
    assert m["pg_clipfrac"] == pytest.approx(2 / 3)
    # gradient −w·A / 3 on EVERY token, clipped or not
    close(grad, [[-0.4, 1 / 3, -0.8 / 3]])


def test_gpg():
    loss, m, grad = run("gpg", old=[[-1.0, -2.0]], new=[[-1.0, -2.0]], adv=[[1.0, 0.5]], mask=[[1, 1]])
    # −A·log π = 1 and 1 → mean 1; gradient −A / 2
    assert loss.item() == pytest.approx(1.0)
    close(grad, [[-0.5, -0.25]])
    assert m == {"pg_clipfrac": 0.0, "pg_clipfrac_lower": 0.0, "ppo_kl": 0.0}


# log π = −1, −3, −2, −2 and A = 2, −2, 1, 0: mean A = 0.25, mean log π = −2, so the
# covariance terms (A − 0.25)(log π + 2) are 1.75, 2.25, 0, 0.
COV = dict(new=[[-1.0, -3.0, -2.0, -2.0]], adv=[[2.0, -2.0, 1.0, 0.0]], mask=[[1, 1, 1, 1]])


def test_clip_cov():
    cfg = PolicyLossConfig(clip_cov_ratio=0.5, clip_cov_lb=1.0, clip_cov_ub=5.0)
    # t0 has ratio 1.5 with A=2: PPO clips it (max(−3, −2.4) = −2.4), so it is no candidate;
    # t1 (cov 2.25 ∈ (1, 5)) is the only candidate; 0.5·4 = 2 cuts allowed, 1 made.
    loss, m, grad = run("clip_cov", old=[[-1.0 - LN(1.5), -3.0, -2.0, -2.0]], **COV, cfg=cfg)
    # losses −2.4, 0 (cut), −1, 0 → −3.4 / 4
    assert loss.item() == pytest.approx(-0.85, abs=1e-6)
    assert m["pg_clipfrac"] == pytest.approx(0.25)
    close(grad, [[0.0, 0.0, -0.25, 0.0]])  # t0 clipped, t1 cut, t2: −A/4, t3: A = 0


def test_kl_cov():
    old = [[-1.0 - LN(2.0), -3.0 + LN(2.0), -2.0, -2.0]]  # ratios 2, 0.5, 1, 1
    # unclipped −A·r: −4, 1, −1, 0. Top-1 covariance (2.25) is t1: + |ln 0.5| there.
    loss, m, _ = run("kl_cov", old=old, **COV, cfg=PolicyLossConfig(kl_cov_ratio=0.25, ppo_kl_coef=1.0))
    assert loss.item() == pytest.approx((-4 + 1 + LN(2.0) - 1) / 4, abs=1e-6)  # −0.8267132
    assert m["pg_clipfrac"] == pytest.approx(0.25)
    assert m["ppo_kl"] == pytest.approx(0.0, abs=1e-7)  # (−ln 2 + ln 2 + 0 + 0)/4
    # ratio 0.5 → top-2: t1 and t0 (1.75), both + ln 2
    loss, _, _ = run("kl_cov", old=old, **COV, cfg=PolicyLossConfig(kl_cov_ratio=0.5, ppo_kl_coef=1.0))
    assert loss.item() == pytest.approx((-4 + 1 - 1 + 2 * LN(2.0)) / 4, abs=1e-6)  # −0.6534264


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_extreme_log_ratios_stay_finite(name):
    # log-ratios of ±1e4 would overflow exp(); the clamp to [−20, 20] keeps everything finite.
    loss, m, grad = run(
        name, old=[[0.0, 0.0, 0.0, 0.0, 0.0]], new=[[1e4, -1e4, 30.0, -30.0, -1.0]],
        adv=[[1.0, -1.0, -1.0, 1.0, 0.5]], mask=[[1, 1, 1, 1, 1]])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_fully_masked_rows_and_padding_garbage(name):
    # Row 1 is all padding and holds garbage log-probs; it must change nothing.
    loss, m, grad = run(
        name, old=[[-1.0, -2.0], [0.0, 0.0]], new=[[-0.9, -2.2], [-1e30, 1e30]],
        adv=[[1.0, -1.0], [5.0, 5.0]], mask=[[1, 1], [0, 0]])
    ref, ref_m, _ = run(name, old=[[-1.0, -2.0]], new=[[-0.9, -2.2]], adv=[[1.0, -1.0]], mask=[[1, 1]])
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[1].abs().sum() == 0
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6) and m == pytest.approx(ref_m)


def test_vanilla_micro_batches_sum_to_the_mini_batch_loss():
    torch.manual_seed(0)
    old = torch.randn(4, 5)
    new = old + 0.3 * torch.randn(4, 5)
    adv = torch.randn(4, 5)
    mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4, 1])[:, None]).long()
    whole, _ = POLICY_LOSSES.get("vanilla")(old, new, adv, mask)
    parts = [
        POLICY_LOSSES.get("vanilla")(old[i:i + 2], new[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                                     global_tokens=12)[0]
        for i in (0, 2)
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-6)


def test_config_validation():
    with pytest.raises(UserError, match="clip_ratio_c"):
        PolicyLossConfig(clip_ratio_c=1.0)
    with pytest.raises(UserError, match="clip_ratio_low"):
        PolicyLossConfig(clip_ratio_low=-0.1)
    PolicyLossConfig(clip_ratio_low=1.0)  # CISPO's "no lower bound" setting is allowed
