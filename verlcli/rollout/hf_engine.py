"""`HFRollout`: transformers `generate` behind the rollout interface.

Slower than vLLM (~4x on CPU) but needs nothing beyond transformers, so it is the fallback and
the reference. It holds its own unsharded copy of the model; `sync_weights` is a
`load_state_dict` (in memory).

Sampling does not use transformers' own temperature/top-k/top-p warpers: `_SampleWarper`
applies the same transforms as vLLM's sampler (same order, same top-p rule) and records each
sampled token's log-prob under the processed distribution as it goes. That keeps the log-prob
convention of base.py identical across engines, and memory at one [batch, vocab] tensor
instead of `output_scores`' [steps, batch, vocab].
"""

from __future__ import annotations

import os
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from verlcli.rollout.base import (PrivateRNG, RolloutEngine, RolloutOutput, SamplingSpec,
                                  SyncTally, check_complete, check_prompts, first_stop)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def mask_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """vLLM's rule (apply_top_k_top_p_pytorch): drop logits below the k-th largest, then drop
    the low tail whose cumulative probability is <= 1 - top_p, always keeping the top token."""
    if top_k <= 0 and top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if 0 < top_k < logits.shape[-1]:
        kth = sorted_logits[:, -top_k].unsqueeze(1)  # ascending: k-th largest
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p < 1.0:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class _SampleWarper(LogitsProcessor):
    """A logits processor: applies temperature/top-k/top-p and records log-probs.

    `generate` calls it once per step with the sequences so far; the token chosen at the
    previous step is the last column, so its log-prob is gathered then. The final step's token
    is gathered by `finish` after `generate` returns.
    """

    def __init__(self, spec: SamplingSpec):
        self.spec = spec
        self.pending: torch.Tensor | None = None  # [B, V] log-probs of the previous step
        self.logprobs: list[torch.Tensor] = []  # one [B] tensor per step

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.logprobs.append(self.pending.gather(-1, tokens[:, None])[:, 0])
            self.pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        scores = scores.float()
        if not self.spec.greedy:
            scores = mask_top_k_top_p(scores / self.spec.temperature, self.spec.top_k,
                                      self.spec.top_p)
        self.pending = scores.log_softmax(dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, steps] log-probs of the generated tokens."""
        self._take(sequences[:, -1])
        return torch.stack(self.logprobs, dim=1)


class HFRollout(RolloutEngine):
    def __init__(self, model_path: str | os.PathLike, *, device: str = "cpu",
                 dtype="float32", max_model_len: int = 2048, seed: int = 0,
                 micro_batch_size: int = 64, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        start = time.perf_counter()
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        self.micro_batch_size = micro_batch_size
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(
            torch, str(dtype).removeprefix("torch."))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
        self.model = model.to(self.device).eval()
        config = self.model.generation_config
        self.eos_ids = sorted(set(_ids(config.eos_token_id))
                              | set(_ids(self.tokenizer.eos_token_id)))
        pad = _ids(config.pad_token_id) or _ids(self.tokenizer.pad_token_id) or self.eos_ids[:1]
        self.pad_id = pad[0]
        # Only token ids: the model's sampling defaults (e.g. a repetition penalty in
        # generation_config.json) must not leak into rollouts; SamplingSpec decides.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids,
                                                        pad_token_id=self.pad_id)
        self.tied = bool(getattr(self.model.config.get_text_config(), "tie_word_embeddings",
                                 False))
        self._rng = PrivateRNG(seed)
        self.create_s = time.perf_counter() - start

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[RolloutOutput]:
        check_prompts(prompts, self.max_model_len)
        # n samples per prompt = the prompt repeated n times, prompt-major.
        flat = [(i, list(p)) for i, p in enumerate(prompts) for _ in range(spec.n)]
        outputs: list[RolloutOutput] = []
        with self._rng, torch.no_grad():
            if spec.seed is not None:
                torch.manual_seed(spec.seed)
            for at in range(0, len(flat), self.micro_batch_size):
                outputs += self._generate_batch(flat[at:at + self.micro_batch_size], spec)
        return outputs

    def _generate_batch(self, batch: list[tuple[int, list[int]]], spec: SamplingSpec):
        from transformers import GenerationConfig

        width = max(len(p) for _, p in batch)
        # Left padding: every row's last prompt token sits in the same column.
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, p) in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        budget = [min(spec.max_tokens, self.max_model_len - len(p)) for _, p in batch]
        warper = _SampleWarper(spec)
        # The warper does temperature/top-k/top-p; transformers' own must stay off (top_k=0:
        # unset, it would default to 50).
        own = {} if spec.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        eos = None if spec.ignore_eos else self.eos_ids
        config = GenerationConfig(
            do_sample=not spec.greedy, max_new_tokens=max(budget), eos_token_id=eos,
            pad_token_id=self.pad_id, stop_strings=spec.stop or None, **own)
        model_config = self.model.generation_config
        if spec.ignore_eos:
            # generate() fills an unset eos_token_id from the model's config: hide it for this
            # call, so EOS neither stops a row nor is masked (vLLM's ignore_eos: same log-probs).
            self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id)
        try:
            sequences = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                generation_config=config, logits_processor=LogitsProcessorList([warper]),
                tokenizer=self.tokenizer)
        finally:
            self.model.generation_config = model_config
        new = sequences[:, width:].cpu()
        logprobs = warper.finish(sequences).cpu()
        return [self._cut(prompt_index, new[row].tolist(), logprobs[row].tolist(), budget[row],
                          spec.stop, spec.ignore_eos)
                for row, (prompt_index, _) in enumerate(batch)]

    def _cut(self, prompt_index: int, ids: list[int], logprobs: list[float], budget: int,
             stops: list[str], ignore_eos: bool = False) -> RolloutOutput:
        """Trim a generated row at its end: EOS (kept), a stop string, or the token budget."""
        end, reason = budget, "length"
        eos = None if ignore_eos else next(
            (i for i, t in enumerate(ids[:budget]) if t in self.eos_ids), None)
        if eos is not None:
            end, reason = eos + 1, "stop"

        def text_of(k: int) -> str:
            # The same text vLLM matches stop strings against (special tokens skipped).
            return self.tokenizer.decode(ids[:k], skip_special_tokens=True)

        cut = first_stop(text_of, end, stops)
        if cut is not None:
            end, reason = cut, "stop"
        return RolloutOutput(prompt_index, ids[:end], logprobs[:end], reason)

    # ------------------------------------------------------------------ weights

    def check_names(self, weights) -> None:
        expected = self.model.state_dict().keys()
        check_complete(weights, expected)
        unexpected = sorted(set(weights) - set(expected))
        if unexpected:
            raise ValueError(f"weight sync has tensors the model does not: {unexpected[:5]}")

    def sync_weight_buckets(self, buckets) -> dict[str, float]:
        tally = SyncTally(self.tied)
        expected = set(self.model.state_dict())
        for weights in tally.each_bucket(buckets):
            unexpected = sorted(set(weights) - expected)
            if unexpected:  # before loading: load_state_dict(strict=False) would drop them
                raise ValueError(f"weight sync has tensors the model does not: {unexpected[:5]}")
            self.model.load_state_dict(weights, strict=False)  # copies into our own params
        check_complete(dict.fromkeys(tally.names), expected)
        return tally.stats()

    def shutdown(self) -> None:
        self.model = None
