"""The one rollout interface: prompt token ids in; response ids and per-token log-probs out.

Both engines (`vllm`, `hf`) implement `RolloutEngine` with the same conventions:

* Order: `generate` returns `len(prompts) * n` outputs, prompt-major
  (p0 s0 .. p0 s(n-1), p1 s0, ...), each carrying its `prompt_index`.
* End of a response: EOS (the EOS id IS included in `response_ids`, so the policy learns to
  stop), a stop string (the tokens up to and including the one that completed the string;
  `finish_reason="stop"`), or `max_tokens` / the context limit (`finish_reason="length"`).
  With `ignore_eos` an EOS is kept as a sampled token and generation goes on.
* Log-probs ("processed" log-probs): the log-prob of each sampled token under the
  distribution it was actually sampled from, i.e.
      log_softmax(mask_top_k_top_p(logits / temperature))[token]
  With top_k off and top_p = 1 this is exactly log_softmax(logits / T), which is what the
  trainer recomputes (logits / temperature), so rollout and trainer log-probs mean the same
  thing. With top-k/top-p on, the distribution is renormalised over the kept tokens (the true
  behaviour policy); the trainer's full-vocabulary value then differs by the log of the kept
  mass. Greedy (temperature 0) reports log_softmax(logits), i.e. temperature 1.
  vLLM's default (`raw_logprobs`) would instead report the temperature-1 log-prob even when
  sampling at another temperature; the vLLM engine sets `logprobs_mode="processed_logprobs"`.
* Weight sync moves named tensors in memory (never through disk) and returns timings.
"""

from __future__ import annotations

import abc
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

WeightsLike = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


@dataclass
class SamplingSpec:
    """How to sample. temperature 0 = greedy; top_k -1 (or 0) = off; top_p 1 = off."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # EOS is sampled like any token but does not end the response (vLLM's ignore_eos; the
    # distribution is not masked, so log-probs keep their meaning): exactly max_tokens tokens
    # unless a stop string or the context limit ends it first.
    ignore_eos: bool = False

    def __post_init__(self):
        # Programming errors, not user input: the config schema validates user values first.
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSpec.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingSpec.top_k must be -1 (off) or >= 0, got {self.top_k}")
        self.stop = [s for s in (self.stop or []) if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RolloutOutput:
    """One response. `logprobs[i]` is the processed log-prob of `response_ids[i]`."""

    prompt_index: int
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


class RolloutEngine(abc.ABC):
    """What the actor worker calls; see the module docstring for the conventions."""

    tied: bool = False  # tied word embeddings: lm_head.weight is added to syncs when absent
    weights_dropped: bool = False  # drop_weights ran and no sync has come since

    def reseed(self, seed: int) -> None:
        """Restart the engine's own sampling stream (`_rng`, a PrivateRNG) from `seed`.
        trainer.deterministic reseeds every step from (seed, step, rank), so a resumed run
        samples exactly what an uninterrupted one did."""
        self._rng = PrivateRNG(seed)

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[RolloutOutput]:
        ...

    def sync_weights(self, named_tensors: WeightsLike) -> dict[str, float]:
        """Load new weights in memory; returns {"sync_s", "sync_gb", "sync_gbps"}. All of
        them are at hand, so an incomplete set is refused before anything is loaded."""
        weights = prepare_weights(named_tensors, self.tied)
        self.check_names(weights)
        return self.sync_weight_buckets([weights])

    @abc.abstractmethod
    def sync_weight_buckets(self, buckets: Iterable[WeightsLike]) -> dict[str, float]:
        """Load new weights streamed in buckets (each a dict or (name, tensor) pairs, e.g.
        `TrainEngine.weight_buckets`), consuming one bucket at a time so the caller never
        materializes the whole model. Every tensor must arrive: a missing one raises
        ValueError after the stream (it would otherwise stay stale silently). Returns
        {"sync_s", "sync_gb", "sync_gbps", "sync_buckets"}.

        Why a pull (an iterable) and not push calls per bucket: vLLM's in-place reload
        processes a layer once all of its tensors arrived within ONE `reload_weights` call;
        a layer split over two calls would be finalized half-loaded."""

    def check_names(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError when `weights` lacks a tensor the model has."""

    def sleep(self) -> None:
        """Free accelerator memory while training (no-op where unsupported)."""

    def wake(self, tags: list[str] | None = None) -> None:
        """Undo `sleep` before the next sync/`generate` (tags: only part of it, see vLLM)."""

    def drop_weights(self) -> None:
        """The trainer is about to change the weights and a sync will follow: free this
        engine's copy now where that saves memory (no-op where unsupported). Until the next
        sync the engine cannot generate (`weights_dropped`)."""

    def shutdown(self) -> None:
        """Release the engine; it cannot be used afterwards."""


# ---------------------------------------------------------------- helpers shared by engines


def check_prompts(prompts: list[list[int]], max_model_len: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= max_model_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, which leaves no room to generate "
                             f"within max_model_len={max_model_len}; raise max_model_len "
                             "(rollout/model config) or shorten prompts (data.max_prompt_length)")


def _plain(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 state dicts gathered without full_state_dict hold DTensors; engines need plain ones.
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


def prepare_weights(named_tensors: WeightsLike, tied_embeddings: bool) -> dict[str, torch.Tensor]:
    """Named tensors as a plain dict, with `lm_head.weight` added for tied-embedding models.

    Why: vLLM keeps the output layer's own processed copy of the tied weight; a sync without
    `lm_head.weight` silently leaves the old output layer in place (log-probs off by up to ~2).
    """
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    weights = {name: _plain(t) for name, t in items}
    if tied_embeddings and "lm_head.weight" not in weights:
        for embed in ("model.embed_tokens.weight", "model.embed_in.weight",
                      "transformer.wte.weight"):
            if embed in weights:
                weights["lm_head.weight"] = weights[embed]
                break
    return weights


def check_complete(weights: Mapping[str, torch.Tensor], expected: Iterable[str]) -> None:
    """Every checkpoint tensor must be in a sync: a missing one would silently stay stale."""
    missing = sorted(n for n in expected if n not in weights and not n.endswith("inv_freq"))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"weight sync is missing {len(missing)} tensor(s) the model has: {shown}. "
                         "Pass the full (unsharded) state dict with the checkpoint's names.")


def _nbytes(weights: Mapping[str, torch.Tensor]) -> int:
    # Tied tensors are counted once: that is what actually moved.
    seen, nbytes = set(), 0
    for t in weights.values():
        key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            nbytes += t.numel() * t.element_size()
    return nbytes


class SyncTally:
    """Walks a stream of weight buckets for an engine: tied fix-up per bucket, and a record
    of the names and bytes that went by (completeness check and stats afterwards)."""

    def __init__(self, tied: bool):
        self.tied = tied
        self.start = time.perf_counter()
        self.names: set[str] = set()
        self.nbytes = 0
        self.buckets = 0

    def each_bucket(self, buckets: Iterable[WeightsLike]) -> Iterable[dict[str, torch.Tensor]]:
        for bucket in buckets:
            weights = prepare_weights(bucket, self.tied)
            self.names.update(weights)
            self.nbytes += _nbytes(weights)
            self.buckets += 1
            yield weights
            del weights  # the engine has it now; do not pin it while the next one gathers

    def each_tensor(self, buckets: Iterable[WeightsLike]) -> Iterable[tuple[str, torch.Tensor]]:
        for weights in self.each_bucket(buckets):
            for name in list(weights):  # popped: a loaded tensor is not pinned by us
                yield name, weights.pop(name)

    def stats(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        gb = self.nbytes / 1e9
        return {"sync_s": seconds, "sync_gb": gb, "sync_gbps": gb / seconds if seconds > 0 else 0.0,
                "sync_buckets": float(self.buckets)}


def first_stop(text_of, n_tokens: int, stops: list[str]) -> int | None:
    """Smallest k such that the text of the first k tokens contains a stop string, or None.

    `text_of(k)` decodes the first k tokens. Containment is monotone in k, so binary search
    needs O(log n) decodes instead of one per token.
    """
    if not stops or not any(s in text_of(n_tokens) for s in stops):
        return None
    lo, hi = 1, n_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in text_of(mid) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


class PrivateRNG:
    """An RNG stream of the engine's own, swapped in around engine calls.

    Why: vLLM's `LLM(seed=...)` reseeds the process-global torch/numpy/python RNGs, and its CPU
    sampler (like HF `generate`) draws from the global torch RNG. Without this, creating or
    using an engine would change the trainer's random stream (dropout, data shuffling).
    """

    def __init__(self, seed: int):
        caller = self._capture()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self._state = self._capture()
        self._restore(caller)

    @staticmethod
    def _capture():
        cuda = (torch.cuda.get_rng_state_all()
                if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda

    @staticmethod
    def _restore(state) -> None:
        py, npy, cpu, cuda = state
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_initialized():
            torch.cuda.set_rng_state_all(cuda)

    def __enter__(self):
        self._caller = self._capture()
        self._restore(self._state)
        return self

    def __exit__(self, *exc):
        self._state = self._capture()
        self._restore(self._caller)
        return False
