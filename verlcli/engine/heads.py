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


class HFHeads:
    """`forward_logits` / `log_probs` / `values` of the engines that run a transformers model
    through `self._forward(input_ids, attention_mask, position_ids, **kwargs)` (FSDP,
    DeepSpeed): padded rows, or packed ones when `self.pack_mode` is set (engine/packing.py).
    Megatron has its own (vocab-parallel logits)."""

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T, V]` (bf16 under bf16 compute). Grad mode is the caller's."""
        return self._forward(input_ids, attention_mask, position_ids).logits

    def log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, response_len: int, temperature: float = 1.0,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log p(response token | everything before it) `[B, R]`, entropy `[B, R]` or
        None), float32. Only the positions that predict response tokens go through the output
        layer; the log-softmax and entropy are computed in row chunks (no `[B, R, V]` copy)."""
        from verlcli.engine import packing

        if self.kind != "causal_lm":
            raise RuntimeError("log_probs needs kind='causal_lm'")
        R = int(response_len)
        if not 0 < R < input_ids.shape[1]:
            raise ValueError(f"response_len {R} must be in [1, {input_ids.shape[1] - 1}]")
        if packing.applies(self.pack_mode, attention_mask, R):
            return packing.hf_log_probs(self._forward, packing.pack(input_ids, attention_mask, position_ids, R),
                                        self.pack_mode, self.device, self.compute_dtype, temperature, with_entropy)
        logits = self._forward(input_ids, attention_mask, position_ids, logits_to_keep=R + 1).logits
        return response_log_probs(logits, input_ids.to(self.device), R, temperature, with_entropy)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, response_len: int) -> torch.Tensor:
        """Value at each response position `[B, R]`, float32: `values[:, -R-1:-1]`."""
        from verlcli.engine import packing

        if self.kind != "value":
            raise RuntimeError("values needs kind='value'")
        if packing.applies(self.pack_mode, attention_mask, response_len):
            return packing.hf_values(self._forward, packing.pack(input_ids, attention_mask, position_ids, response_len),
                                     self.pack_mode, self.device, self.compute_dtype)
        return response_values(self._forward(input_ids, attention_mask, position_ids).logits,
                               int(response_len))
