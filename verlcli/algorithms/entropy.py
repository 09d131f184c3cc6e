"""Entropy and log-probs from logits, without blowing up memory.

Logits are `[..., V]` with V ~ 150k for current tokenizers: a softmax over a
`[B·T, V]` tensor is the largest allocation of a training step. The chunked functions here
walk over row chunks and, when gradients are needed, recompute each chunk in the backward
pass (activation checkpointing), so at most one chunk of full-vocabulary probabilities
exists at a time, forward or backward.

bf16/fp16 logits are upcast to float32 chunk by chunk: a logsumexp rounded to bf16 is off
by up to ~0.03 nats, which is the size of the signals PPO works with. Results are float32
for half inputs and keep the dtype of float32/float64 inputs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    # H = logsumexp(x) − Σ softmax(x)·x, which needs no log of a probability that
    # underflowed to 0 (p·log p would give 0·(−inf) = NaN there).
    x = logits.to(_work_dtype(logits.dtype))
    return torch.logsumexp(x, dim=-1) - (torch.softmax(x, dim=-1) * x).sum(dim=-1)


def _label_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # log_softmax(x)[y] = x[y] − logsumexp(x): no [N, V] log-prob tensor is built.
    x = logits.to(_work_dtype(logits.dtype))
    return x.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


def _by_row_chunks(fn, logits: torch.Tensor, chunk_size: int, *row_args: torch.Tensor):
    """Apply `fn(logits_chunk, *row_arg_chunks)` over chunks of the flattened rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    flat_args = [a.reshape(-1) for a in row_args]
    # Recompute in backward only when a graph is being built; otherwise autograd
    # would keep every chunk's softmax alive until backward.
    recompute = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = [flat[start:start + chunk_size]] + [a[start:start + chunk_size] for a in flat_args]
        pieces.append(checkpoint(fn, *chunk, use_reentrant=False) if recompute else fn(*chunk))
    if not pieces:
        return torch.zeros(lead, dtype=_work_dtype(logits.dtype), device=logits.device)
    return torch.cat(pieces).reshape(lead)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim: `[..., V]` → `[...]`."""
    return _entropy(logits)


def entropy_from_logits_chunked(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Same values as `entropy_from_logits`, computed `chunk_size` rows at a time; with
    gradients each chunk is recomputed in backward, so never more than one chunk of
    full-vocabulary probabilities is alive."""
    return _by_row_chunks(_entropy, logits, chunk_size)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(logits)[label]: `[..., V]`, `[...]` → `[...]`, as x_y − logsumexp(x),
    chunked like `entropy_from_logits_chunked`."""
    return _by_row_chunks(_label_logprob, logits, chunk_size, labels)
