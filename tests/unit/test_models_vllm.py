"""tiny-qwen2 loads and generates in vLLM, and agrees with transformers (fp32, greedy)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_tiny_qwen2_in_vllm(tmp_path_factory, monkeypatch):
    # The CPU recipe from DESIGN.md: in-process engine, small KV cache, eager mode.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VERL_HOME", str(tmp_path_factory.mktemp("verl_home_vllm")))
    try:
        from vllm import LLM, SamplingParams
    except Exception as e:  # missing, or broken by a mismatched torchvision
        pytest.skip(f"vllm not importable: {e}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verlcli.models import resolve_model

    path = resolve_model("tiny-qwen2")
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                     tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids

    llm = LLM(model=str(path), enforce_eager=True, dtype="float32", seed=0)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt_ids}], params)[0].outputs[0]
    assert len(out.token_ids) == 6

    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([prompt_ids + list(out.token_ids)])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0, len(prompt_ids) - 1:-1]
    hf_logp = logp.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    vllm_logp = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
    assert torch.allclose(hf_logp, vllm_logp, atol=1e-3)
    assert list(out.token_ids) == logp.argmax(-1).tolist()  # greedy = transformers' argmax
