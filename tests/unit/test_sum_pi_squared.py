"""Σπ² for the optimal token baseline, from the real engine on tiny-qwen2 (one gloo rank in
this process): the same log-probs and entropy as the engine's own pass, and Σπ² is the sum
of squared softmax probabilities of the temperature-scaled logits."""

import pytest
import torch

from verlcli.workers.losses import log_probs_and_sum_pi_squared

from _ranks import one_rank_group


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from verlcli.engine import FSDPEngine
    from verlcli.models.resolve import resolve_model

    with one_rank_group(tmp_path_factory.mktemp("pg")):
        yield FSDPEngine(resolve_model("tiny-qwen2"), kind="causal_lm", optim=None, device="cpu",
                         compute_dtype="float32")


def test_matches_the_engines_log_probs(engine):
    ids = torch.randint(10, 3000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        lp, ent, s2 = log_probs_and_sum_pi_squared(engine, inputs, 4, temperature=0.7)
        ref_lp, ref_ent = engine.log_probs(**inputs, response_len=4, temperature=0.7, with_entropy=True)
        probs = torch.softmax(engine.forward_logits(**inputs)[:, -5:-1].float() / 0.7, dim=-1)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-4, rtol=0)
    torch.testing.assert_close(s2, probs.pow(2).sum(-1))
    assert s2.shape == (2, 4) and bool(((s2 >= lp.exp() ** 2 - 1e-6) & (s2 <= 1)).all())
