"""The megatron-core training engine: NVIDIA's `GPTModel` and tensor-parallel layers.

One `MegatronEngine` per rank, in a process where `torch.distributed` is initialized. The
world is split by megatron's `parallel_state` into tensor-parallel (TP) groups of
`tensor_parallel_size` consecutive ranks and data-parallel (DP) groups across them
(megatron's default order "tp-cp-ep-dp-pp": TP varies fastest), so `dp_rank = rank // TP`
and every rank of a TP group must get the same rows (the worker group's `dp` dispatch does
that from `dp_coords`).

What runs where. The model is megatron-core's `GPTModel` with the local (non-Transformer
Engine) layer spec, built with `use_cpu_initialization=True` and fusions off; weights come
from the HF safetensors through `megatron_convert` (each rank reads only its slices). Four
CUDA assumptions of megatron-core are stepped around: the attention score buffer comes
from megatron's global memory buffer, which allocates on `torch.cuda.current_device()`
(replaced by a host-memory one on CPU); the RNG tracker is
megatron's inference tracker (`model_parallel_cuda_manual_seed(..., inference_rng_tracker=
True)`: the default tracker calls `torch.cuda`; our models have no dropout); RoPE is
computed here from the caller's `position_ids` (megatron's `RotaryEmbedding.get_emb` moves
`inv_freq` to `torch.cuda.current_device()`, and it only knows positions 0..T-1, not
left-padded or packed rows); the attention mask is always passed (with none, the default
causal mask is built with `device="cuda"`). Megatron's pipeline schedules, DDP grad buffers
and distributed optimizer need CUDA (`megatron/core/distributed/param_and_grad_buffer.py`
allocates with `torch.cuda.current_device()`), so this engine runs its own micro-batch loop:
plain backward, a DP all-reduce of gradients, a TP-aware gradient norm, torch AdamW.

Loss scaling. Callers pass `backward` this rank's share of the global loss (normalized by
counts summed over DP ranks, see `engine/base.py`). Gradients are SUMMED over DP ranks in
`step`, so no factor is needed; all ranks of a TP group compute the same loss, and
megatron's autograd functions make each shard's gradient exact.

Precision: fp32 weights and compute (bf16 autocast does not pass through megatron's custom
linear autograd functions on CPU: their backward mixes bf16 grads with fp32 weights).
"""

from __future__ import annotations

import json
import math
import shutil
import types
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.utils.checkpoint
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from verlcli.config.schema import LoraConfig, OptimConfig
from verlcli.engine import checkpoint as ckpt
from verlcli.engine import megatron_convert as conv
from verlcli.engine import packing
from verlcli.engine.base import Kind, NamedTensors, TrainEngine
from verlcli.engine.megatron_convert import check_parallel_sizes
from verlcli.engine.optim import build_optimizer, build_scheduler
from verlcli.errors import UserError
from verlcli.io import write_json_atomic

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": by design
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

def _init_parallel(tp: int, seed: int) -> None:
    """megatron's process groups, once per process (all engines in a process share them)."""
    if ps.model_parallel_is_initialized():
        have = ps.get_tensor_model_parallel_world_size()
        if have != tp:
            raise UserError(f"this process already runs megatron with tensor_parallel_size={have}, "
                            f"another engine asks for {tp}",
                            fix="give actor and critic the same tensor_parallel_size, or place "
                                "the critic separately (critic.placement=separate)")
        return
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
    if not torch.cuda.is_available():
        # DotProductAttention takes its score buffer from megatron's global memory buffer,
        # which allocates on torch.cuda.current_device() (megatron/core/utils.py,
        # GlobalMemoryBuffer.get_tensor): the same buffer, in host memory.
        ps._GLOBAL_MEMORY_BUFFER = _HostMemoryBuffer()


class _HostMemoryBuffer:
    """megatron's GlobalMemoryBuffer (reused scratch tensors by name), allocating on the host."""

    def __init__(self):
        self.buffer = {}

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        n = math.prod(tensor_shape)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.buffer[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(*tensor_shape)


def _transformer_config(hf, layout: conv.Layout) -> TransformerConfig:
    return TransformerConfig(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, num_attention_heads=layout.heads,
        num_query_groups=layout.kv_heads, kv_channels=layout.head_dim,
        normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=layout.qkv_bias,
        hidden_dropout=0.0, attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        tensor_model_parallel_size=layout.tp, use_cpu_initialization=True,
        perform_initialization=False,  # every weight is loaded from the HF files
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True, params_dtype=torch.float32)


class _SafetensorsReader:
    """Reads single HF tensors from a model directory (one at a time: low peak memory)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{path} has no *.safetensors weights",
                            fix="the megatron engine loads safetensors HF directories")
        self.where = {}
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        for h in self.handles:
            for k in h.keys():
                self.where[k] = h

    def get(self, name: str) -> torch.Tensor | None:
        h = self.where.get(name)
        return None if h is None else h.get_tensor(name).float()


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


class _GatherVocab(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's slice (every TP rank computes
    the same loss). megatron's gather_from_tensor_model_parallel_region does the same but
    allocates its output on torch.cuda.current_device() (tensor_parallel/mappings.py,
    _gather_along_last_dim)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        r = dist.get_rank(ctx.group)
        return grad[..., r * ctx.width:(r + 1) * ctx.width].contiguous(), None


class MegatronEngine(TrainEngine):
    """A HF Llama/Qwen2 model as a megatron-core GPTModel on this rank's TP shard."""

    strategy = "megatron"

    def __init__(self, model_path: str | Path, *, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, kind: Kind = "causal_lm",
                 optim: OptimConfig | None = None, total_optimizer_steps: int = 1,
                 device: str = "cpu", compute_dtype: str = "auto",
                 gradient_checkpointing: bool = False, lora: LoraConfig | None = None,
                 offload_params: bool = False, offload_optimizer: bool = False, seed: int = 1,
                 trust_remote_code: bool = False, remove_padding: str | bool = False):
        if not dist.is_initialized():
            raise RuntimeError("MegatronEngine needs torch.distributed initialized")
        if lora is not None and lora.rank > 0:
            raise UserError("model.lora.rank > 0 is not supported with strategy=megatron",
                            fix="set model.lora.rank=0, or use strategy=fsdp for LoRA")
        if compute_dtype == "bfloat16":
            raise UserError("the megatron engine computes in float32 (resources.compute_dtype="
                            "bfloat16 asked for)", fix="set resources.compute_dtype=auto or float32")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        check_parallel_sizes(tensor_parallel_size, pipeline_parallel_size, self.world_size, device)
        self.model_path = Path(model_path)
        self.kind = kind
        self.optim_config = optim
        self.total_optimizer_steps = total_optimizer_steps
        self.seed = seed
        self.lora = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.compute_dtype = torch.float32
        # Padding removal: packed rows with a block-diagonal mask, the one way megatron's local
        # (non-TE) attention can keep sequences apart; THD/varlen (PackedSeqParams) needs TE.
        self.pack_mode = packing.resolve(remove_padding) and "block_mask"
        _init_parallel(tensor_parallel_size, seed)
        self.tp = tensor_parallel_size
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        if self.dp_rank != self.rank // self.tp:  # the worker group's dispatch relies on it
            raise RuntimeError(f"megatron placed rank {self.rank} in DP slice {self.dp_rank}, "
                               f"expected {self.rank // self.tp}")

        from transformers import AutoConfig

        # Remote-code models are not Llama/Qwen2, so layout_from_hf refuses them below.
        self.hf_config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        if kind == "value":
            self.hf_config.num_labels = 1
            self.hf_config.classifier_dropout = 0.0
        arch = (self.hf_config.architectures or ["LlamaForCausalLM"])[0]
        self.model_class = arch.replace("ForCausalLM", "ForTokenClassification") if kind == "value" else arch
        try:
            self.layout = conv.layout_from_hf(self.hf_config, self.tp, kind)
        except ValueError as e:
            raise UserError(f"{self.model_path}: {e}", fix="use strategy=fsdp for this model") from None
        self.entries = conv.entries(self.layout)
        self.tied_aliases = ([("model.embed_tokens.weight", "lm_head.weight")]
                             if kind == "causal_lm" and self.layout.tied else [])
        torch.manual_seed(seed)
        self.model = self._build(gradient_checkpointing)
        self._rope_inv_freq = self._inv_freq()
        self._load_hf_weights()
        self.model.to(self.device)
        self.model.train(optim is not None)
        self.params = dict(self.model.named_parameters())
        self.optimizer = self.scheduler = None
        if optim is None:
            for p in self.model.parameters():
                p.requires_grad_(False)
        else:
            self.optimizer = build_optimizer(self.model.parameters(), optim)
            self.scheduler = build_scheduler(self.optimizer, optim, total_optimizer_steps)
        self.optimizer_steps = 0
        self._mesh = None

    # ------------------------------------------------------------------ set-up

    @property
    def dp_rank(self) -> int:
        return ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def _build(self, gradient_checkpointing: bool) -> nn.Module:
        config = _transformer_config(self.hf_config, self.layout)
        tied = self.kind == "causal_lm" and self.layout.tied
        model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=self.layout.padded_vocab,
                         max_sequence_length=self.hf_config.max_position_embeddings,
                         share_embeddings_and_output_weights=tied,
                         position_embedding_type="rope", parallel_output=True)
        if gradient_checkpointing:
            # megatron's own recompute (tensor_parallel/random.py, CheckpointFunction) saves
            # the CUDA RNG state with torch.cuda.random.get_rng_state: torch's non-reentrant
            # checkpoint per decoder layer does the same job on any device.
            for layer in model.decoder.layers:
                layer.forward = _checkpointed(layer.forward)
        if self.kind == "value":
            model.output_layer = None  # the critic reads hidden states through its own head
            model.value_head = nn.Linear(self.hf_config.hidden_size, 1)  # replicated on TP ranks
        return model

    def _inv_freq(self) -> torch.Tensor:
        """RoPE frequencies as transformers computes them (rope scaling types included)."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rot = LlamaRotaryEmbedding(self.hf_config)
        if float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
            raise UserError(f"{self.model_path}: RoPE attention scaling "
                            f"{rot.attention_scaling} is not in the Megatron mapping",
                            fix="use strategy=fsdp for this model")
        return rot.inv_freq.float().to(self.device)

    def _load_hf_weights(self) -> None:
        reader = _SafetensorsReader(self.model_path)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for kind, mname, hnames in self.entries:
                fulls = [reader.get(h) for h in hnames]
                if mname.startswith("value_head.") and fulls[0] is None:
                    params[mname].zero_()  # a new value head starts at V = 0, as in FSDP
                    continue
                if any(t is None for t in fulls):
                    missing = hnames[[t is None for t in fulls].index(True)]
                    raise UserError(f"{self.model_path}: weight {missing} is missing",
                                    fix="point model.path at a complete HF checkpoint")
                locals_ = [conv.hf_full_to_local(kind, t, self.layout, self.tp_rank) for t in fulls]
                params[mname].copy_(conv.hf_local_to_mcore(kind, locals_, self.layout))
                del fulls, locals_

    # ------------------------------------------------------------------ forward

    def _mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Megatron's boolean mask [B, 1, T, T], True = do not attend."""
        m = attention_mask.to(self.device)
        if m.dim() == 4:  # additive (packed rows): 0 where allowed
            return m < 0
        T = m.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None, None] & (m[:, None, None, :] > 0)
        return ~allowed

    def _rope(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[T, B, 1, head_dim] rotation angles from each row's own positions."""
        freqs = position_ids.to(self.device).t().float()[..., None] * self._rope_inv_freq
        return torch.cat([freqs, freqs], dim=-1)[:, :, None, :]

    def _hidden(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Final hidden states [T, B, H] (after the last norm)."""
        ids = input_ids.to(self.device)
        pos = position_ids.to(self.device)
        emb = self.model.embedding(input_ids=ids, position_ids=pos)
        return self.model.decoder(hidden_states=emb, attention_mask=self._mask(attention_mask),
                                  rotary_pos_emb=self._rope(pos))

    def _vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the logits [T, B, V/TP]; padded rows → -inf-ish."""
        weight = self.model.shared_embedding_or_output_weight() if self.layout.tied else None
        logits, _ = self.model.output_layer(hidden, weight=weight)
        start, stop = conv.vocab_rows(self.layout, self.tp_rank)
        real = stop - start
        if real < logits.shape[-1]:  # vocabulary padding to a multiple of TP: never a token
            keep = torch.arange(logits.shape[-1], device=logits.device) < real
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        return logits

    def forward_logits(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Full-vocabulary logits [B, T, V] (gathered over TP ranks: tests, SFT)."""
        if self.kind != "causal_lm":
            raise RuntimeError("forward_logits needs kind='causal_lm'")
        local = self._vocab_logits(self._hidden(input_ids, attention_mask, position_ids))
        full = _GatherVocab.apply(local, self.tp_group) if self.tp > 1 else local
        return full[..., :self.layout.vocab].transpose(0, 1)

    def log_probs(self, input_ids, attention_mask, position_ids, response_len: int,
                  temperature: float = 1.0, with_entropy: bool = False):
        """(log-probs [B, R], entropy [B, R] or None), float32, from vocab-parallel logits:
        no rank ever holds the full-vocabulary logits."""
        if self.kind != "causal_lm":
            raise RuntimeError("log_probs needs kind='causal_lm'")
        R = int(response_len)
        if not 0 < R < input_ids.shape[1]:
            raise ValueError(f"response_len {R} must be in [1, {input_ids.shape[1] - 1}]")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if packing.applies(self.pack_mode, attention_mask, R):
            p = packing.pack(input_ids, attention_mask, position_ids, R)
            hidden = self._packed_hidden(p)  # [K, 1, H]: the positions before response tokens
            lp, ent = self._token_log_probs(hidden, p.labels[:, None], temperature, with_entropy)
            return packing.scatter(p, lp[:, 0]), (packing.scatter(p, ent[:, 0]) if with_entropy else None)
        hidden = self._hidden(input_ids, attention_mask, position_ids)[-R - 1:-1]
        lp, ent = self._token_log_probs(hidden, input_ids[:, -R:].t(), temperature, with_entropy)
        return lp.t(), (ent.t() if with_entropy else None)

    def _packed_hidden(self, p) -> torch.Tensor:
        """Hidden states [K, 1, H] of packed rows at the K positions that predict a response
        token; the block-diagonal mask keeps the sequences apart (data/packing.py's)."""
        mask = packing.model_kwargs(p, "block_mask", self.device, torch.float32)["attention_mask"]
        return self._hidden(p.input_ids, mask, p.position_ids)[p.src.to(self.device)]

    def _token_log_probs(self, hidden, labels, temperature: float, with_entropy: bool):
        """(log-probs, entropy or None) [S, B] of `labels` [S, B] from hidden states [S, B, H]."""
        logits = self._vocab_logits(hidden).float()
        if temperature != 1.0:
            logits = logits / temperature
        labels = labels.to(self.device).contiguous()
        entropy = self._entropy(logits) if with_entropy else None
        # megatron's cross entropy works in place on its input: give it its own copy when
        # the entropy's graph still needs these logits.
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.clone() if with_entropy else logits, labels)
        return -ce, entropy

    def _entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy of softmax over the vocabulary split across TP ranks (differentiable:
        `reduce_from_tensor_model_parallel_region` sums forward, passes grads through)."""
        reduce = tensor_parallel.reduce_from_tensor_model_parallel_region
        m = logits.detach().amax(-1, keepdim=True)
        if self.tp > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.tp_group)
        shifted = logits - m
        e = shifted.exp()
        z = reduce(e.sum(-1), group=self.tp_group)
        s = reduce((e * shifted).sum(-1), group=self.tp_group)
        return z.log() - s / z

    def values(self, input_ids, attention_mask, position_ids, response_len: int) -> torch.Tensor:
        """Value at each response position [B, R]: values[:, -R-1:-1]."""
        if self.kind != "value":
            raise RuntimeError("values needs kind='value'")
        R = int(response_len)
        if packing.applies(self.pack_mode, attention_mask, R):
            p = packing.pack(input_ids, attention_mask, position_ids, R)
            return packing.scatter(p, self.model.value_head(self._packed_hidden(p))[:, 0, 0].float())
        hidden = self._hidden(input_ids, attention_mask, position_ids)[-R - 1:-1]
        return self.model.value_head(hidden).squeeze(-1).t().float()

    # ------------------------------------------------------------------ training

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients are summed over DP ranks in `step`: this rank's share needs no factor."""
        loss.backward()

    def _grads(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.grad) for n, p in self.params.items() if p.grad is not None]

    def _all_reduce_grads(self) -> None:
        grads = [g for _, g in self._grads()]
        if self.dp_size == 1 or not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def _grad_norm(self) -> float:
        """Global L2 norm, every parameter counted once: TP shards on every rank, replicated
        tensors (norms, value head) only on TP rank 0; then summed over the TP group."""
        kinds = {m: k for k, m, _ in self.entries}
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, g in self._grads():
            if kinds[name] != "replicated" or self.tp_rank == 0:
                total += g.double().pow(2).sum()
        if self.tp > 1:
            dist.all_reduce(total, group=self.tp_group)
        return float(total.sqrt())

    def step(self) -> dict[str, float]:
        if self.optimizer is None:
            raise RuntimeError("this engine was built without an optimizer (optim=None)")
        self._all_reduce_grads()
        grad_norm = self._grad_norm()
        lr = float(self.scheduler.get_last_lr()[0])
        finite = math.isfinite(grad_norm)
        if finite:
            coef = self.optim_config.grad_clip / (grad_norm + 1e-6)
            if coef < 1.0:
                for _, g in self._grads():
                    g.mul_(coef)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.optimizer_steps += 1
        return {"grad_norm": grad_norm, "lr": lr, "skipped": 0.0 if finite else 1.0}

    def all_reduce_sum(self, x):
        """Sum over DP ranks (the ranks of a TP group hold the same rows)."""
        t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None)
        t = t.detach().clone().to(self.device)
        dist.all_reduce(t, group=self.dp_group)
        return t if torch.is_tensor(x) else float(t)

    def num_parameters(self) -> tuple[int, int]:
        """(trainable, total) of the whole model: the full HF shapes, tied weights once."""
        n = 0
        for kind, mname, _ in self.entries:
            parts = conv.mcore_to_hf_local(kind, self.params[mname], self.layout, self.tp_rank)
            n += sum(self._hf_shape(kind, p, conv.HF_SHARD_DIM[kind]).numel() for p in parts)
        return (n if self.optimizer is not None else 0, n)

    # ------------------------------------------------------------------ offload

    def _move(self, device) -> None:
        self.model.to(device)
        for state in (self.optimizer.state.values() if self.optimizer is not None else ()):
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device)

    def offload_to_cpu(self) -> None:
        """Parameters and Adam moments to host memory while the rollout runs (GPU only)."""
        if self.device.type == "cuda":
            self._move("cpu")
            torch.cuda.empty_cache()

    def load_to_device(self) -> None:
        if self.device.type == "cuda":
            self._move(self.device)

    # ------------------------------------------------------------------ weights out

    def _gather_hf(self, kind: str, local: torch.Tensor) -> list[torch.Tensor]:
        """This rank's Megatron tensor → the full HF tensors (all-gather over TP)."""
        parts = conv.mcore_to_hf_local(kind, local.detach(), self.layout, self.tp_rank, trim=False)
        if conv.HF_SHARD_DIM[kind] is None or self.tp == 1:
            return [conv.join_hf([p], kind, self.layout) for p in parts]
        out = []
        for p in parts:
            p = p.contiguous()
            pieces = [torch.empty_like(p) for _ in range(self.tp)]
            dist.all_gather(pieces, p, group=self.tp_group)
            out.append(conv.join_hf(pieces, kind, self.layout))
        return out

    def weight_buckets(self, bucket_bytes: int, dtype: torch.dtype | None = None) -> Iterator[NamedTensors]:
        """Full HF weights, TP shards gathered one Megatron tensor at a time, in buckets."""
        bucket, size = [], 0
        for kind, mname, hnames in self.entries:
            for h, full in zip(hnames, self._gather_hf(kind, self.params[mname])):
                full = full.to(dtype=dtype or full.dtype, copy=True)  # never a view of a live parameter
                names = [h] + [alias for kept, alias in self.tied_aliases if kept == h]
                for name in names:
                    if bucket and size + full.numel() * full.element_size() > bucket_bytes:
                        yield bucket
                        bucket, size = [], 0
                    bucket.append((name, full))
                    size += full.numel() * full.element_size()
        if bucket:
            yield bucket

    # ------------------------------------------------------------------ checkpoints
    # The model and Adam moments are stored in HF names and HF layout, each rank writing its
    # TP slice as a DTensor shard (Replicate over DP, Shard over TP): DCP then reloads at
    # any TP size, and `engine.checkpoint.load_full_state_dict` reads it like an FSDP one.

    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.dp_size, self.tp),
                                          mesh_dim_names=("dp", "tp"))
        return self._mesh

    def _hf_sharded(self, tensors: dict[str, torch.Tensor], suffix: str = "") -> dict:
        """Megatron-named local tensors → {HF name + suffix: DTensor of the full HF shape}."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        out = {}
        for kind, mname, hnames in self.entries:
            if mname not in tensors:
                continue
            parts = conv.mcore_to_hf_local(kind, tensors[mname], self.layout, self.tp_rank)
            dim = conv.HF_SHARD_DIM[kind]
            placements = [Replicate(), Replicate() if dim is None else Shard(dim)]
            for h, part in zip(hnames, parts):
                shape = self._hf_shape(kind, part, dim)
                stride = torch.empty(shape, device="meta").stride()
                out[h + suffix] = DTensor.from_local(part.detach().contiguous().clone(), self.mesh(), placements,
                                                     run_check=False, shape=shape, stride=stride)
        return out

    def _hf_shape(self, kind, part, dim) -> torch.Size:
        if dim is None:
            return part.shape
        shape = list(part.shape)
        shape[dim] = self.layout.vocab if kind == "vocab" else part.shape[dim] * self.tp
        return torch.Size(shape)

    def _from_hf_sharded(self, sharded: dict, suffix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for kind, mname, hnames in self.entries:
            if hnames[0] + suffix in sharded:
                locals_ = [sharded[h + suffix].to_local() for h in hnames]
                out[mname] = conv.hf_local_to_mcore(kind, locals_, self.layout)
        return out

    def _moments(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {"exp_avg": {}, "exp_avg_sq": {}}
        for name, p in self.params.items():
            state = self.optimizer.state.get(p, {})
            for key in out:
                if key in state:
                    out[key][name] = state[key]
        return out

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._hf_sharded({n: p for n, p in self.params.items()}), checkpoint_id=str(tmp / "model"))
        has_optim = self.optimizer is not None and bool(self.optimizer.state)
        adam_step = 0.0
        if has_optim:
            moments = self._moments()
            osd = {**self._hf_sharded(moments["exp_avg"], ".exp_avg"),
                   **self._hf_sharded(moments["exp_avg_sq"], ".exp_avg_sq")}
            dcp.save(osd, checkpoint_id=str(tmp / "optim"))
            adam_step = float(next(iter(self.optimizer.state.values()))["step"])
        torch.save(ckpt.rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            if self.scheduler is not None:
                write_json_atomic(tmp / "scheduler.json", {"scheduler": self.scheduler.state_dict(),
                                                           "optimizer_steps": self.optimizer_steps,
                                                           "adam_step": adam_step})
            write_json_atomic(tmp / "extra.json", extra or {})
            # _copy_hf_files reads model_path, model_class and the config off an engine.
            shim = types.SimpleNamespace(model_path=self.model_path, model_class=self.model_class,
                                         hf_model=types.SimpleNamespace(config=self.hf_config))
            ckpt._copy_hf_files(shim, tmp / "hf")
            write_json_atomic(tmp / "meta.json", self._meta(has_optim))
        return ckpt.publish_dir(tmp, path, self.rank)

    def _meta(self, has_optim: bool) -> dict:
        return {"format_version": ckpt.FORMAT_VERSION, "strategy": "megatron", "kind": self.kind,
                "model_class": self.model_class, "lora": None, "lora_scale": None, "peft_prefix": "",
                "tied_aliases": [list(p) for p in self.tied_aliases], "world_size": self.world_size,
                "tensor_parallel_size": self.tp, "base_model_path": str(self.model_path.resolve()),
                "param_dtype": "float32", "compute_dtype": "float32",
                "has_optimizer_state": has_optim, "optimizer_steps": self.optimizer_steps,
                "layout": "hf"}  # model/ holds HF names and layout, sharded by TP

    def load_checkpoint(self, path: str | Path) -> dict:
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        meta = ckpt.read_meta(path)
        if meta["kind"] != self.kind:
            raise UserError(f"checkpoint {path} holds a {meta['kind']} model, not {self.kind}",
                            fix="resume the actor from an actor checkpoint and the critic from a critic one")
        if meta.get("strategy", "fsdp") != "megatron":
            raise UserError(f"checkpoint {path} was written by strategy={meta.get('strategy', 'fsdp')}",
                            fix="resume with the strategy that wrote it, or start from its merged HF model")
        sd = self._hf_sharded(self.params)
        dcp.load(sd, checkpoint_id=str(path / "model"))
        with torch.no_grad():
            for name, t in self._from_hf_sharded(sd).items():
                self.params[name].copy_(t)
        if self.optimizer is not None and meta.get("has_optimizer_state"):
            state = json.loads((path / "scheduler.json").read_text())
            zeros = {n: torch.zeros_like(p) for n, p in self.params.items()}
            osd = {**self._hf_sharded(zeros, ".exp_avg"), **self._hf_sharded(zeros, ".exp_avg_sq")}
            dcp.load(osd, checkpoint_id=str(path / "optim"))
            avg, sq = self._from_hf_sharded(osd, ".exp_avg"), self._from_hf_sharded(osd, ".exp_avg_sq")
            for name, p in self.params.items():
                self.optimizer.state[p] = {"step": torch.tensor(float(state["adam_step"])),
                                           "exp_avg": avg[name].to(p.device), "exp_avg_sq": sq[name].to(p.device)}
        if self.scheduler is not None and (path / "scheduler.json").is_file():
            ckpt._load_scheduler(self, path)
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=True))
        dist.barrier()
        return json.loads((path / "extra.json").read_text())
