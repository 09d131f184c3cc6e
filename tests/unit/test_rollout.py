"""Rollout engines (vllm, hf) on tiny-qwen2 in fp32: agreement with each other and with a
transformers forward pass, the log-prob convention, n/order, stop/EOS/length, weight sync
(with the tied-embedding trap), and the caller's RNG.

One engine of each kind per module: creating a vLLM engine costs ~10 s on this machine.
Tests that change weights put the original ones back before they finish.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from verlcli.config.kv_cache import auto_kv_cache_bytes, kv_bytes_per_token
from verlcli.errors import UserError
from verlcli.models.shape import load_shape
from verlcli.models.resolve import resolve_model
from verlcli.rollout import SamplingSpec, make_rollout

ATOL = 1e-3
MAX_LEN = 256
TEXTS = ["What is 2 + 3?", "Tom has 5 apples and buys 7 more apples for $3 each.", "Hello"]


def _rng_snapshot():
    return (torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy())


def _same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny-qwen2")


@pytest.fixture(scope="module")
def ref(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_weights(ref):
    return {k: v.clone() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def prompts(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    return [tok(t).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def vllm_engine(tiny):
    try:
        import vllm  # noqa: F401
    except Exception as e:  # not installed, or broken by a mismatched torchvision
        pytest.skip(f"vllm not importable: {e}")
    torch.manual_seed(123)
    before = _rng_snapshot()
    # The smallest KV cache verl ever asks for (config/kv_cache.py: one max-length sequence +
    # the null block, 0.75 MiB here): vLLM must accept it and queue what does not fit.
    floor = auto_kv_cache_bytes(1, 1, MAX_LEN, kv_bytes_per_token(load_shape(tiny), 1, 4))
    engine = make_rollout("vllm", tiny, device="cpu", dtype="float32", max_model_len=MAX_LEN,
                          seed=0, cpu_kvcache_gb=floor / 2**30, enable_sleep=True)
    engine.caller_rng_kept = _same_rng(before, _rng_snapshot())
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_engine(tiny):
    return make_rollout("hf", tiny, device="cpu", dtype="float32", max_model_len=MAX_LEN, seed=0)


@pytest.fixture(params=["vllm", "hf"])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


def _mask(logits, top_k, top_p):
    """Reference top-k/top-p, written independently of the engines: keep a token if it is
    among the k largest and the mass of the tokens ranked above it is < top_p."""
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        above = probs.cumsum(-1) - probs
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, above < top_p)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def recompute(model, prompt, response, temperature=0.0, top_k=-1, top_p=1.0):
    """Log-probs of `response` under the convention of verlcli/rollout/base.py."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    if temperature > 0:
        logits = _mask(logits / temperature, top_k, top_p)
    logp = logits.log_softmax(-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0], logits.argmax(-1).tolist()


def assert_matches(model, prompts, outs, **convention):
    for o in outs:
        ref_lp, _ = recompute(model, prompts[o.prompt_index], o.response_ids, **convention)
        got = torch.tensor(o.logprobs)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, ref_lp, atol=ATOL), (got - ref_lp).abs().max()


# ---------------------------------------------------------------- generation


def test_greedy_engines_agree_and_match_transformers(vllm_engine, hf_engine, ref, prompts):
    spec = SamplingSpec(temperature=0, max_tokens=8)
    v, h = vllm_engine.generate(prompts, spec), hf_engine.generate(prompts, spec)
    assert [o.prompt_index for o in v] == [o.prompt_index for o in h] == [0, 1, 2]
    for a, b in zip(v, h):
        assert a.response_ids == b.response_ids
        _, argmax = recompute(ref, prompts[a.prompt_index], a.response_ids)
        assert a.response_ids == argmax  # greedy = transformers' argmax chain
        assert np.allclose(a.logprobs, b.logprobs, atol=ATOL)
    assert_matches(ref, prompts, v)  # greedy reports temperature-1 log-probs
    assert_matches(ref, prompts, h)


def test_sampling_n_order_and_temperature_scaled_logprobs(engine, ref, prompts):
    spec = SamplingSpec(n=3, temperature=0.7, max_tokens=6, seed=7)
    outs = engine.generate(prompts[:2], spec)
    assert [o.prompt_index for o in outs] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(o.response_ids) for o in outs[:3]}) > 1  # n real samples, not copies
    # Matching under each output's own prompt also proves the prompt-major ordering.
    assert_matches(ref, prompts, outs, temperature=0.7)
    # ... and they are not the temperature-1 values (vLLM's default "raw" mode would be).
    raw, _ = recompute(ref, prompts[0], outs[0].response_ids)
    assert (torch.tensor(outs[0].logprobs) - raw).abs().max() > 1e-2


def test_top_k_top_p_logprobs_are_over_the_kept_tokens(engine, ref, prompts):
    spec = SamplingSpec(n=2, temperature=0.9, top_k=40, top_p=0.8, max_tokens=5, seed=3)
    outs = engine.generate(prompts, spec)
    assert_matches(ref, prompts, outs, temperature=0.9, top_k=40, top_p=0.8)


def test_greedy_n_copies_and_max_tokens_length(engine, prompts):
    outs = engine.generate(prompts[:2], SamplingSpec(n=2, temperature=0, max_tokens=3))
    assert [o.prompt_index for o in outs] == [0, 0, 1, 1]
    assert outs[0].response_ids == outs[1].response_ids
    assert all(len(o.response_ids) == len(o.logprobs) == 3 for o in outs)
    assert all(o.finish_reason == "length" for o in outs)


def test_context_limit_and_empty_prompt(engine):
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[5] * MAX_LEN], SamplingSpec(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingSpec(max_tokens=2))


def test_seed_reproducible_and_caller_rng_untouched(engine, prompts):
    torch.manual_seed(99)
    before = _rng_snapshot()
    seeded = SamplingSpec(n=2, temperature=1.0, max_tokens=6, seed=11)
    a, b = engine.generate(prompts, seeded), engine.generate(prompts, seeded)
    assert [o.response_ids for o in a] == [o.response_ids for o in b]
    free = SamplingSpec(n=2, temperature=1.0, max_tokens=6)
    c, d = engine.generate(prompts, free), engine.generate(prompts, free)
    assert [o.response_ids for o in c] != [o.response_ids for o in d]  # the engine's stream moves
    assert _same_rng(before, _rng_snapshot())


def test_vllm_creation_keeps_caller_rng(vllm_engine):
    assert vllm_engine.caller_rng_kept


def test_stop_string_ends_response(engine, tiny, prompts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    full = engine.generate(prompts[:1], SamplingSpec(temperature=0, max_tokens=12))[0]
    stop = tok.decode(full.response_ids[3:5])
    assert stop.strip()
    out = engine.generate(prompts[:1], SamplingSpec(temperature=0, max_tokens=12, stop=[stop]))[0]
    k = len(out.response_ids)
    assert out.finish_reason == "stop" and k <= 5
    assert out.response_ids == full.response_ids[:k] and out.logprobs == pytest.approx(
        full.logprobs[:k], abs=ATOL)
    assert stop in tok.decode(out.response_ids) and stop not in tok.decode(out.response_ids[:-1])


# ---------------------------------------------------------------- weight sync


def _load(model, weights):
    model.load_state_dict(weights, strict=False)
    model.tie_weights()


def test_eos_ends_response_unless_ignore_eos(engine, ref, base_weights, tiny, prompts):
    """Weights that make EOS the greedy next token: the residual stream is the input
    embedding (attention and MLP outputs zeroed), and EOS's (tied) embedding is 10x that of
    the prompt's last token, so it wins the output layer."""
    eos = ref.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    last = prompts[0][-1]
    w = {k: v.clone() for k, v in base_weights.items() if k != "lm_head.weight"}
    for k in w:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            w[k].zero_()
    w["model.embed_tokens.weight"][eos] = 10 * w["model.embed_tokens.weight"][last]
    try:
        engine.sync_weights(w)
        out = engine.generate(prompts[:1], SamplingSpec(temperature=0, max_tokens=5))[0]
        assert out.response_ids == [eos] and out.finish_reason == "stop"
        # ignore_eos: the same weights, and every response is exactly max_tokens long (EOS is
        # kept as a token, not masked: the log-probs still match the unmasked model).
        spec = SamplingSpec(n=2, temperature=0.7, max_tokens=5, ignore_eos=True)
        full = engine.generate(prompts[:2], spec)
        assert [len(o.response_ids) for o in full] == [5] * 4
        assert all(len(o.logprobs) == 5 and o.finish_reason == "length" for o in full)
        assert full[0].response_ids[0] == eos
        _load(ref, w)
        assert_matches(ref, prompts, [out])
        assert_matches(ref, prompts, full, temperature=0.7)
    finally:
        engine.sync_weights(base_weights)
        _load(ref, base_weights)


def test_sync_perturbed_weights_without_lm_head(engine, ref, base_weights, prompts):
    g = torch.Generator().manual_seed(0)
    w = {k: v + 0.05 * torch.randn(v.shape, generator=g)
         for k, v in base_weights.items() if k != "lm_head.weight"}  # as FSDP often gives it
    try:
        stats = engine.sync_weights(w)
        assert set(stats) == {"sync_s", "sync_gb", "sync_gbps", "sync_buckets"}
        assert stats["sync_gb"] > 0 and stats["sync_s"] > 0
        outs = engine.generate(prompts, SamplingSpec(temperature=0, max_tokens=8))
        _load(ref, w)
        for o in outs:
            _, argmax = recompute(ref, prompts[o.prompt_index], o.response_ids)
            assert o.response_ids == argmax
        # Without the lm_head fix-up vLLM's output layer would keep the old weights and these
        # log-probs would be off by far more than ATOL.
        assert_matches(ref, prompts, outs)
    finally:
        engine.sync_weights(base_weights.items())  # an iterable of pairs works too
        _load(ref, base_weights)
    again = engine.generate(prompts, SamplingSpec(temperature=0, max_tokens=8))
    assert_matches(ref, prompts, again)


def test_sync_rejects_incomplete_weights(engine, base_weights):
    partial = {k: v for k, v in base_weights.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="missing"):
        engine.sync_weights(partial)


# ---------------------------------------------------------------- the rest


def _kv_bytes(engine) -> int:
    from verlcli.rollout.vllm_engine import _kv_storages

    return sum(engine.llm.collective_rpc(lambda w: sum(s.nbytes() for s in _kv_storages(w.model_runner))))


def test_sleep_and_dropped_weights_on_cpu(engine, prompts, base_weights):
    """vLLM on CPU frees its KV cache's pages while asleep and its packed weights between
    drop_weights and the next sync; greedy output is the same afterwards. hf: no-ops."""
    greedy = SamplingSpec(temperature=0, max_tokens=6)
    before = [o.response_ids for o in engine.generate(prompts, greedy)]
    is_vllm = hasattr(engine, "llm")
    kv = _kv_bytes(engine) if is_vllm else 0
    engine.sleep()
    if is_vllm:
        assert kv > 0 and _kv_bytes(engine) == 0
        with pytest.raises(RuntimeError, match="asleep"):
            engine.generate(prompts, greedy)
    engine.wake()
    assert not is_vllm or _kv_bytes(engine) == kv
    assert [o.response_ids for o in engine.generate(prompts, greedy)] == before
    engine.drop_weights()
    assert engine.weights_dropped == is_vllm
    if is_vllm:
        with pytest.raises(RuntimeError, match="sync weights"):
            engine.generate(prompts, greedy)
        engine.sync_weights(base_weights)
    assert not engine.weights_dropped
    assert [o.response_ids for o in engine.generate(prompts, greedy)] == before


def test_unknown_engine_is_a_user_error(tiny):
    with pytest.raises(UserError, match="rollout.engine"):
        make_rollout("sglang", tiny, device="cpu", dtype="float32", max_model_len=64, seed=0)


@pytest.mark.parametrize("bad", [dict(n=0), dict(max_tokens=0), dict(temperature=-1),
                                 dict(top_p=0), dict(top_k=-2)])
def test_sampling_spec_validation(bad):
    with pytest.raises(ValueError):
        SamplingSpec(**bad)
