"""Padding removal for the RL forwards: a micro-batch's rows packed into one row, and back.

The workers hand every engine `[B, T]` rows (`[prompt, left-padded | response,
right-padded]`, workers/seq.py) and get `[B, R]` log-probs / entropy / values back. With
padding removal on, the engine instead runs the model on ONE row holding only the real tokens
of all B sequences (`pack`), with each sequence's own position ids (0, 1, ... restarting per
sequence, as `seq.position_ids` made them), and attention that cannot cross a sequence
boundary. Only the positions that predict a response token go through the output layer, and
`scatter` puts the per-token results back into `[B, R]` (zeros where a row has no token).
Same math as the padded forward: tests/unit/test_remove_padding.py checks it in fp32.

How the boundaries are kept (`MODES`; bench/remove_padding.py measures them, BENCHMARKS.md):
- `varlen`: attention runs per sequence on the packed row. On GPU with flash-attn installed,
  transformers' `flash_attention_2` with `cu_seq_lens_*` (its varlen kernel); elsewhere our
  `verl_varlen` attention (below): one causal SDPA call per sequence. No `[N, N]` mask and no
  cross-sequence scores are ever computed. The default (fastest measured on CPU).
- `block_mask`: an additive block-diagonal causal mask `[1, 1, N, N]` (data/packing.py's
  `block_causal_mask`, shared with SFT packing), one SDPA call over all N tokens.
- `position_ids`: no mask; transformers detects the sequence starts from the position ids and
  builds the same mask itself (data/packing.py's docstring: needs `attention_mask=None` AND
  `use_cache=False`, which every engine forward passes).
Megatron packs with `block_mask` (its local attention takes any mask; THD/varlen needs TE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from verlcli.data.packing import block_causal_mask

MODES = ("varlen", "block_mask", "position_ids")
DEFAULT_MODE = "varlen"
VARLEN_ATTENTION = "verl_varlen"


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(setting: str | bool) -> str | None:
    """`model.remove_padding` → a packing mode, or None (padded rows). `auto` = on: the packed
    forward was faster than padded rows on every measured micro-batch (BENCHMARKS.md)."""
    setting = {True: "true", False: "false"}.get(setting, setting)
    if setting == "false":
        return None
    if setting in ("true", "auto"):
        return DEFAULT_MODE
    if setting in MODES:  # internal/bench: one mode by name
        return setting
    raise ValueError(f"remove_padding must be auto, true or false, got {setting!r}")


def attention_implementation(mode: str | None, device_type: str,
                             compute_dtype: torch.dtype = torch.float32) -> str | None:
    """The transformers attention a model needs for `mode` (None: leave the model's own).
    flash-attn only computes in 16 bits: fp32 runs on a GPU take the per-sequence SDPA."""
    if mode != "varlen":
        return None
    if device_type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16) and flash_attn_available():
        return "flash_attention_2"
    register_varlen_attention()
    return VARLEN_ATTENTION


def applies(mode: str | None, attention_mask: torch.Tensor, response_len: int) -> bool:
    """Pack this call? Only `[B, T]` padding masks (a 4D mask is already packed: SFT), and
    only when some row has a response token (else padded rows keep the graph intact)."""
    return (mode is not None and attention_mask.dim() == 2
            and bool(attention_mask[:, -int(response_len):].any()))


@dataclass
class Packed:
    """One packed row and where its results go back in `[B, R]`."""

    input_ids: torch.Tensor      # [1, N] real tokens of all rows, row after row
    position_ids: torch.Tensor   # [1, N] each sequence's own positions
    cu_seqlens: torch.Tensor     # [B+1] int32 sequence starts in the packed row
    max_len: int
    rows: torch.Tensor           # [K] row b of each real response token
    cols: torch.Tensor           # [K] its response column j (0..R-1)
    src: torch.Tensor            # [K] packed index of the position that predicts it
    labels: torch.Tensor         # [K] the response token itself
    shape: tuple[int, int]       # (B, R)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
         response_len: int) -> Packed:
    """Pack the real tokens (attention_mask == 1) of `[B, T]` rows into one row."""
    if attention_mask.dim() != 2:
        raise ValueError("pack takes a [B, T] padding mask, got a "
                         f"{attention_mask.dim()}D one (rows already packed?)")
    B, T = input_ids.shape
    R = int(response_len)
    real = attention_mask.bool().cpu()
    flat = real.flatten().nonzero().squeeze(1)
    lengths = real.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    pos = position_ids.cpu().flatten()[flat]
    # Every sequence must count 0, 1, 2, ...: the position-id mask detection and the block
    # mask (data/packing.py) start a new sequence where the position does not go up by 1.
    seq_of = torch.repeat_interleave(torch.arange(B), lengths)
    expected = torch.arange(len(flat)) - cu[:-1].long()[seq_of]
    if not torch.equal(pos, expected):
        raise ValueError("packing needs position ids 0..n-1 over each row's real tokens "
                         "(seq.position_ids); got others")
    index = real.flatten().cumsum(0).view(B, T) - 1   # packed index of every real token
    resp = real[:, T - R:]
    rows, cols = resp.nonzero(as_tuple=True)
    at = index[:, T - R:][rows, cols]
    if bool((at <= cu[:-1].long()[rows]).any()):
        raise ValueError("a response token is the first token of its row: nothing predicts it")
    ids = input_ids.cpu()
    return Packed(input_ids=ids.flatten()[flat][None], position_ids=pos[None], cu_seqlens=cu,
                  max_len=int(lengths.max()) if B else 0, rows=rows, cols=cols, src=at - 1,
                  labels=ids[:, T - R:][rows, cols], shape=(B, R))


def model_kwargs(p: Packed, mode: str, device: torch.device, mask_dtype: torch.dtype) -> dict:
    """`attention_mask` and the extra forward kwargs that keep the sequences of `p` apart."""
    if mode == "block_mask":
        return {"attention_mask": block_causal_mask(p.position_ids, mask_dtype).to(device)}
    if mode == "position_ids":
        return {"attention_mask": None}
    if mode == "varlen":
        cu = p.cu_seqlens.to(device)
        return {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": p.max_len, "max_length_k": p.max_len}
    raise ValueError(f"unknown packing mode {mode!r}; known: {', '.join(MODES)}")


def scatter(p: Packed, x: torch.Tensor) -> torch.Tensor:
    """Per-response-token values `[K]` → `[B, R]` (zeros where a row has no token);
    differentiable."""
    out = torch.zeros(p.shape, dtype=x.dtype, device=x.device)
    return out.index_put((p.rows.to(x.device), p.cols.to(x.device)), x)


# --------------------------------------------------------------------- varlen attention (CPU)

def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, cu_seq_lens_q=None, **kwargs):
    """transformers attention function: one causal SDPA call per packed sequence when the
    forward got `cu_seq_lens_q`, else plain SDPA (padded rows, 4D masks: SFT, forward_logits)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("varlen attention takes one packed row")
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    bounds = cu_seq_lens_q.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            outs.append(F.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                scale=scaling, is_causal=True, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register_varlen_attention() -> None:
    """Make `verl_varlen` a transformers attention implementation. Its mask function is
    SDPA's, so padded forwards still get their mask; packed ones never read it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, sdpa_mask)


# --------------------------------------------------------------------- HF-model engines

def hf_log_probs(forward, p: Packed, mode: str, device: torch.device, mask_dtype: torch.dtype,
                 temperature: float, with_entropy: bool):
    """Log-probs (and entropy) `[B, R]` of a transformers causal LM on packed rows; `forward`
    is the engine's `_forward(input_ids, attention_mask, position_ids, **kwargs)`. Only the K
    positions before real response tokens go through the output layer (`logits_to_keep`
    takes their indices)."""
    from verlcli.engine.heads import token_log_probs

    kw = model_kwargs(p, mode, device, mask_dtype)
    logits = forward(p.input_ids, position_ids=p.position_ids, logits_to_keep=p.src.to(device),
                     **kw).logits
    lp, ent = token_log_probs(logits[0], p.labels.to(device), temperature, with_entropy)
    return scatter(p, lp), (scatter(p, ent) if ent is not None else None)


def hf_values(forward, p: Packed, mode: str, device: torch.device,
              mask_dtype: torch.dtype) -> torch.Tensor:
    """Values `[B, R]` of a transformers token-classification model on packed rows."""
    out = forward(p.input_ids, position_ids=p.position_ids,
                  **model_kwargs(p, mode, device, mask_dtype)).logits
    return scatter(p, out[0, p.src.to(device), 0].float())


def use_attention(hf_model, mode: str | None, device_type: str,
                  compute_dtype: torch.dtype = torch.float32) -> None:
    """Switch a transformers model to the attention `mode` needs (varlen: per-sequence)."""
    impl = attention_implementation(mode, device_type, compute_dtype)
    if impl is not None:
        hf_model.set_attn_implementation(impl)
