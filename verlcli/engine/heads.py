"""Model outputs → the per-response-token tensors every engine returns (base.py's layout).

Shared by the engines so the sequence-layout convention lives in one place: the log-prob of
response token j comes from the logits at the position before it, and the value of the
state before each response token is `values[:, -R-1:-1]` (verl's convention).
"""

from __future__ import annotations

import torch


def response_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, response_len: int,
                       temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logits` are the last R+1 positions (`logits_to_keep=R+1`) or all of them; returns
    (log-probs `[B, R]`, entropy `[B, R]` or None), float32, chunked over rows (no
    `[B, R, V]` float copy)."""
    R = int(response_len)
    return token_log_probs(logits[:, -R - 1:-1], input_ids[:, -R:], temperature, with_entropy)


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logits [..., V]` of the positions that predict `labels [...]` → (log-probs, entropy
    or None) `[...]`, float32. Padded rows (`response_log_probs`) and packed rows
    (engine/packing.py: only the positions before real response tokens) both end here."""
    from verlcli.algorithms.entropy import entropy_from_logits_chunked, logprobs_from_logits

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, labels).float()
    entropy = entropy_from_logits_chunked(logits).float() if with_entropy else None
    return logprobs, entropy


def response_values(outputs: torch.Tensor, response_len: int) -> torch.Tensor:
    """Token-classification outputs `[B, T, 1]` → values `[B, R]`, float32."""
    R = int(response_len)
    return outputs.squeeze(-1).float()[:, -R - 1:-1]
