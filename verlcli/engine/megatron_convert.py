"""Hugging Face ⇄ megatron-core weights for Llama and Qwen2, sharded per tensor-parallel rank.

One table (`TABLE`) maps every Megatron parameter to the HF tensors it is made of and says
how it is split over TP ranks (`kind`):

- `replicated`  every rank holds the whole tensor (norms, the critic's value head)
- `column`      rows split over ranks (dim 0)                   — not used alone today
- `row`         columns split over ranks (dim 1): o_proj, down_proj
- `vocab`       embedding / lm_head rows, padded to a multiple of TP with zero rows; the
                padded logits are masked by the engine
- `qkv`         Megatron fuses q, k, v per KV group: for each group g the rows are
                [q heads of g | k_g | v_g]; rank r holds the groups r·G/TP … (r+1)·G/TP−1
                (works for weights [*, hidden] and Qwen2's biases [*])
- `gate_up`     Megatron's `linear_fc1` is [gate | up] PER RANK: rank r holds
                [gate rows of r | up rows of r]

"HF local" below means this rank's rows (or columns) of each HF tensor — a contiguous
slice for every kind, so checkpoints can store HF-layout tensors sharded by TP and reload
at any other TP size. Every function here is a pure reindexing: HF → Megatron → HF is
bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

L = "model.layers.{i}."
M = "decoder.layers.{i}."

# (kind, megatron name, HF names, condition): condition picks entries by model features.
TABLE: list[tuple[str, str, tuple[str, ...], str]] = [
    ("vocab", "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "always"),
    ("replicated", M + "input_layernorm.weight", (L + "input_layernorm.weight",), "always"),
    ("qkv", M + "self_attention.linear_qkv.weight",
     (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
     "always"),
    ("qkv", M + "self_attention.linear_qkv.bias",
     (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
     "qkv_bias"),
    ("row", M + "self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",), "always"),
    ("replicated", M + "pre_mlp_layernorm.weight", (L + "post_attention_layernorm.weight",), "always"),
    ("gate_up", M + "mlp.linear_fc1.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
     "always"),
    ("row", M + "mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",), "always"),
    ("replicated", "decoder.final_layernorm.weight", ("model.norm.weight",), "always"),
    ("vocab", "output_layer.weight", ("lm_head.weight",), "untied_lm_head"),
    ("replicated", "value_head.weight", ("score.weight",), "value"),
    ("replicated", "value_head.bias", ("score.bias",), "value_bias"),
]

# Where each kind's HF tensors are split (None: not split).
HF_SHARD_DIM = {"replicated": None, "column": 0, "row": 1, "vocab": 0, "qkv": 0, "gate_up": 0}
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class Layout:
    """What the conversion needs to know about the model and the TP split."""

    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tp: int
    qkv_bias: bool
    tied: bool
    kind: str = "causal_lm"  # or "value"
    value_bias: bool = True

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab // self.tp) * self.tp

    @property
    def q_per_group(self) -> int:
        return self.heads // self.kv_heads

    def features(self) -> set[str]:
        f = {"always"}
        if self.qkv_bias:
            f.add("qkv_bias")
        if self.kind == "causal_lm" and not self.tied:
            f.add("untied_lm_head")
        if self.kind == "value":
            f.add("value")
            if self.value_bias:
                f.add("value_bias")
        return f


def layout_from_hf(hf_config, tp: int, kind: str = "causal_lm", value_bias: bool = True) -> Layout:
    """Layout of a transformers config; raises ValueError for what this mapping cannot hold."""
    mtype = getattr(hf_config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"megatron engine supports model types {SUPPORTED_MODEL_TYPES}, "
                         f"got {mtype!r}")
    if mtype == "llama" and (getattr(hf_config, "attention_bias", False)
                             or getattr(hf_config, "mlp_bias", False)):
        raise ValueError("Llama models with attention_bias/mlp_bias are not in the Megatron "
                         "mapping (only Qwen2-style q/k/v biases are)")
    heads, kv = hf_config.num_attention_heads, hf_config.num_key_value_heads or hf_config.num_attention_heads
    if heads % tp or kv % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the attention heads ({heads}) "
                         f"and the KV heads ({kv})")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return Layout(num_layers=hf_config.num_hidden_layers, heads=heads, kv_heads=kv,
                  head_dim=head_dim, vocab=hf_config.vocab_size, tp=tp,
                  qkv_bias=mtype == "qwen2", tied=bool(hf_config.tie_word_embeddings),
                  kind=kind, value_bias=value_bias)


def entries(layout: Layout) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, megatron name, HF names) for every parameter of this model, layers expanded."""
    out = []
    feats = layout.features()
    for kind, mname, hnames, cond in TABLE:
        if cond not in feats:
            continue
        if "{i}" in mname:
            for i in range(layout.num_layers):
                out.append((kind, mname.format(i=i), tuple(h.format(i=i) for h in hnames)))
        else:
            out.append((kind, mname, hnames))
    return out


PP_BLOCKER = ("pipeline_parallel_size > 1 needs megatron's pipeline schedules "
              "(megatron/core/pipeline_parallel/schedules.py, forward_backward_pipelining_*), "
              "which exchange activations with torch.cuda streams/events")


def check_parallel_sizes(tp: int, pp: int, world: int, device: str, hf_config=None) -> None:
    """Raise UserError for sizes the megatron engine cannot run (preflight and engine)."""
    from verlcli.errors import UserError

    if pp > 1:
        where = "on CPU" if device != "cuda" else "in this engine yet"
        raise UserError(f"pipeline_parallel_size={pp} is not supported {where}: {PP_BLOCKER}",
                        fix="set pipeline_parallel_size=1 (use tensor_parallel_size to split layers)")
    if tp < 1 or world % tp:
        raise UserError(f"tensor_parallel_size={tp} must divide the number of ranks ({world})",
                        fix="choose a tensor_parallel_size that divides resources.nodes × devices_per_node")
    if hf_config is not None:
        try:
            layout_from_hf(hf_config, tp)
        except ValueError as e:
            raise UserError(f"strategy=megatron: {e}", fix="change tensor_parallel_size, or use strategy=fsdp "
                            "for this model") from None


# ---------------------------------------------------------------- one rank's slices


def vocab_rows(layout: Layout, rank: int) -> tuple[int, int]:
    """[start, stop) of the REAL vocabulary rows rank `rank` holds (torch.chunk semantics)."""
    per = layout.padded_vocab // layout.tp
    start = min(rank * per, layout.vocab)
    return start, min(start + per, layout.vocab)


def hf_full_to_local(kind: str, full: torch.Tensor, layout: Layout, rank: int) -> torch.Tensor:
    """This rank's contiguous slice of a full HF tensor (no padding)."""
    dim = HF_SHARD_DIM[kind]
    if dim is None:
        return full
    if kind == "vocab":
        start, stop = vocab_rows(layout, rank)
        return full[start:stop]
    return full.chunk(layout.tp, dim=dim)[rank]


def hf_local_to_mcore(kind: str, locals_: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    """This rank's HF slices → this rank's Megatron tensor."""
    if kind in ("replicated", "row", "column"):
        return locals_[0]
    if kind == "vocab":
        x = locals_[0]
        rows = layout.padded_vocab // layout.tp
        if x.shape[0] == rows:
            return x
        pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
        return torch.cat([x, pad])
    if kind == "gate_up":
        return torch.cat(locals_)
    if kind == "qkv":
        q, k, v = locals_
        groups = layout.kv_heads // layout.tp
        rest = q.shape[1:]
        q = q.reshape(groups, layout.q_per_group * layout.head_dim, *rest)
        k = k.reshape(groups, layout.head_dim, *rest)
        v = v.reshape(groups, layout.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    raise ValueError(f"unknown kind {kind!r}")


def mcore_to_hf_local(kind: str, local: torch.Tensor, layout: Layout, rank: int,
                      trim: bool = True) -> list[torch.Tensor]:
    """This rank's Megatron tensor → this rank's HF slices (views where possible).

    trim=False keeps the vocabulary padding rows (equal sizes on every rank, for all_gather)."""
    if kind in ("replicated", "row", "column"):
        return [local]
    if kind == "vocab":
        if not trim:
            return [local]
        start, stop = vocab_rows(layout, rank)
        return [local[:stop - start]]
    if kind == "gate_up":
        return list(local.chunk(2, dim=0))
    if kind == "qkv":
        groups = layout.kv_heads // layout.tp
        rest = local.shape[1:]
        g = local.reshape(groups, layout.q_per_group + 2, layout.head_dim, *rest)
        q = g[:, :layout.q_per_group].reshape(-1, *rest)
        return [q, g[:, -2].reshape(-1, *rest), g[:, -1].reshape(-1, *rest)]
    raise ValueError(f"unknown kind {kind!r}")


def hf_to_mcore(hf: dict[str, torch.Tensor], layout: Layout, rank: int) -> dict[str, torch.Tensor]:
    """A full HF state dict → rank `rank`'s Megatron state dict (tied lm_head dropped)."""
    out = {}
    for kind, mname, hnames in entries(layout):
        missing = [h for h in hnames if h not in hf]
        if missing:
            raise KeyError(f"HF weights lack {missing[0]} (needed for {mname})")
        locals_ = [hf_full_to_local(kind, hf[h], layout, rank) for h in hnames]
        out[mname] = hf_local_to_mcore(kind, locals_, layout).clone()
    return out


def mcore_shards_to_hf(shards: list[dict[str, torch.Tensor]], layout: Layout) -> dict[str, torch.Tensor]:
    """Every rank's Megatron state dict (in rank order) → the full HF state dict."""
    out = {}
    for kind, mname, hnames in entries(layout):
        per_rank = [mcore_to_hf_local(kind, shards[r][mname], layout, r) for r in range(layout.tp)]
        for j, h in enumerate(hnames):
            out[h] = join_hf([p[j] for p in per_rank], kind, layout)
    if layout.kind == "causal_lm" and layout.tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def join_hf(parts: list[torch.Tensor], kind: str, layout: Layout) -> torch.Tensor:
    """Ranks' HF slices (vocab trimmed or not) → the full HF tensor."""
    dim = HF_SHARD_DIM[kind]
    if dim is None:
        return parts[0]
    full = torch.cat(parts, dim=dim)
    return full[:layout.vocab] if kind == "vocab" else full
