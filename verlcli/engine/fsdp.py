"""The one training engine: a Hugging Face model sharded with FSDP2 (`fully_shard`).

Used by the RL actor, critic and reference model and by SFT. One `FSDPEngine` per rank,
constructed inside a process where `torch.distributed` is already initialized (gloo on
CPU, NCCL on GPU; world size 1 works too).

Conventions the callers rely on
-------------------------------
Sequence layout. Every batch is `[prompt, left-padded | response, right-padded]`, the
response in the last R positions. The log-prob of response token j comes from the logits
at the position before it, so `log_probs` uses `logits[:, -R-1:-1] / temperature` against
`input_ids[:, -R:]`, and `values` returns `values[:, -R-1:-1]` (verl's convention: the
value of the state *before* each response token is emitted).

Loss scaling over data-parallel ranks. Callers pass `backward` this rank's share of the
global loss (normalized by counts summed over all ranks, see `engine/base.py`). FSDP
AVERAGES gradients over ranks (the reduce-scatter divides by world size), so `backward`
multiplies by the world size to get the gradient of the exact global mean.

Precision. fp32 master weights always. On GPU, bf16 compute through FSDP's
`MixedPrecisionPolicy` (fp32 gradient reduction); on CPU, `torch.autocast` to bf16
around forward when the compute dtype resolves to bf16 (2–2.7× faster on CPUs with
bf16 instructions, see `resolve_compute_dtype`).

Initialization with several ranks. Only rank 0 reads the weights; the other ranks build
the model on the meta device, and after sharding the weights and buffers are broadcast
from rank 0 — so host memory holds one full fp32 copy per node, not one per rank.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from verlcli.config.schema import LoraConfig, OptimConfig
from verlcli.engine import checkpoint as ckpt
from verlcli.engine import packing
from verlcli.engine.base import Kind, NamedTensors, TrainEngine
from verlcli.engine.heads import HFHeads
from verlcli.engine.optim import build_optimizer, build_scheduler

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16() -> bool:
    """Whether /proc/cpuinfo lists a bf16 matmul instruction set."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return any(f in line.split(":", 1)[1].split() for f in BF16_CPU_FLAGS)
    return False


def resolve_compute_dtype(device: str, requested: str) -> torch.dtype:
    """`auto` → bf16 on GPU; on CPU bf16 only with avx512_bf16/amx_bf16 (without them
    bf16 autocast is slower than fp32), else fp32. Explicit choices are kept."""
    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        return torch.bfloat16
    if requested != "auto":
        raise ValueError(f"compute_dtype must be auto, float32 or bfloat16, got {requested!r}")
    if device == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def _device_for(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", -1))
    # torchrun sets LOCAL_RANK; Ray narrows CUDA_VISIBLE_DEVICES so device 0 is ours.
    if 0 <= local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    return torch.device("cuda", torch.cuda.current_device())


def _hf_config(model_path: Path, kind: Kind, trust_remote_code: bool = False):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if kind == "value":
        config.num_labels = 1
        config.classifier_dropout = 0.0  # values must not be stochastic
    return config


def _hf_model(model_path: Path, kind: Kind, config, on_meta: bool,
              trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForTokenClassification
    if on_meta:  # shapes only; rank 0 broadcasts the values after sharding
        with torch.device("meta"):
            return cls.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = cls.from_pretrained(model_path, config=config, dtype=torch.float32,
                                trust_remote_code=trust_remote_code)
    if kind == "value":
        head = value_head(model)
        with torch.no_grad():  # new head: start from V = 0 (bias included)
            for p in head.parameters():
                p.zero_()
    return model


def value_head(model: nn.Module) -> nn.Module:
    """The token-classification head of a value model (`score` in transformers)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no value head (score/classifier)")


def _tied_aliases(model: nn.Module) -> list[tuple[str, str]]:
    """(kept name, alias name) for parameters registered under two names (tied embeddings)."""
    first: dict[int, str] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append((first[id(p)], name))
        else:
            first[id(p)] = name
    return pairs


def _apply_lora(model: nn.Module, lora: LoraConfig, kind: Kind) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), bias="none")
    model = get_peft_model(model, peft_cfg)
    if kind == "value":  # the new head must learn too (kept under its plain name)
        for p in value_head(model.get_base_model()).parameters():
            p.requires_grad_(True)
    return model


def _decoder_layers(model: nn.Module, hf_model: nn.Module) -> list[nn.Module]:
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class FSDPEngine(HFHeads, TrainEngine):
    """A HF model on this rank's shard of an FSDP2 mesh, with optimizer and schedule.

    See the module docstring for the sequence layout and the loss-scaling convention.
    """

    def __init__(self, model_path: str | Path, *, kind: Kind = "causal_lm",
                 optim: OptimConfig | None = None, total_optimizer_steps: int = 1,
                 device: str = "cpu", compute_dtype: str = "auto",
                 gradient_checkpointing: bool = False, lora: LoraConfig | None = None,
                 offload_params: bool = False, offload_optimizer: bool = False, seed: int = 1,
                 trust_remote_code: bool = False, remove_padding: str | bool = False):
        if not dist.is_initialized():
            raise RuntimeError("FSDPEngine needs torch.distributed initialized (a 1-rank "
                               "group is fine): call dist.init_process_group first")
        if kind not in ("causal_lm", "value"):
            raise ValueError(f"kind must be 'causal_lm' or 'value', got {kind!r}")
        self.model_path = Path(model_path)
        self.kind = kind
        self.optim_config = optim
        self.total_optimizer_steps = total_optimizer_steps
        self.lora = lora if lora is not None and lora.rank > 0 else None
        self.seed = seed
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = _device_for(device)
        self.compute_dtype = resolve_compute_dtype(self.device.type, compute_dtype)
        on_gpu = self.device.type == "cuda"
        # CPU offload only means something when the weights would otherwise live on a GPU.
        self.offload_params = offload_params and on_gpu
        self.offload_optimizer = offload_optimizer and on_gpu and not self.offload_params

        torch.manual_seed(seed)  # LoRA A init must agree on every rank
        self.hf_config = _hf_config(self.model_path, kind, trust_remote_code)
        on_meta = self.world_size > 1 and self.rank != 0
        hf_model = _hf_model(self.model_path, kind, self.hf_config, on_meta, trust_remote_code)
        self.tied_aliases = _tied_aliases(hf_model)
        self.model_class = type(hf_model).__name__  # before fully_shard renames it FSDP…
        # Padding removal (engine/packing.py): log_probs/values run on packed rows.
        self.pack_mode = packing.resolve(remove_padding)
        packing.use_attention(hf_model, self.pack_mode, self.device.type, self.compute_dtype)
        if gradient_checkpointing:
            hf_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = _apply_lora(hf_model, self.lora, kind) if self.lora else hf_model
        self.hf_model = hf_model  # the unwrapped transformers model (config, class)
        full_sd = self.model.state_dict() if self.world_size > 1 and self.rank == 0 else None
        self._shard(hf_model)
        if self.world_size > 1:
            self._broadcast_from_rank0(full_sd)
        del full_sd
        self.model.train(optim is not None)
        torch.manual_seed(seed + self.rank)  # dropout streams differ per rank, as in DDP

        self.optimizer = self.scheduler = None
        if optim is None:  # inference only (reference model): no graph, no grads
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if optim is not None:
            self.optimizer = build_optimizer(self.trainable, optim)
            self.scheduler = build_scheduler(self.optimizer, optim, total_optimizer_steps)
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ set-up

    def _shard(self, hf_model: nn.Module) -> None:
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        kwargs = dict(mesh=mesh)
        if self.device.type == "cuda" and self.compute_dtype == torch.bfloat16:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                       reduce_dtype=torch.float32)
        kwargs["offload_policy"] = CPUOffloadPolicy() if self.offload_params else OffloadPolicy()
        for layer in _decoder_layers(self.model, hf_model):
            fully_shard(layer, **kwargs)
        fully_shard(self.model, **kwargs)

    def _broadcast_from_rank0(self, full_sd: dict | None) -> None:
        """Give the meta-initialized ranks rank 0's weights and buffers (as verl does)."""
        if self.rank != 0:
            self.model.to_empty(device=self.device)
        elif self.offload_params:
            self.model.to(self.device)
        set_model_state_dict(self.model, full_sd if self.rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True,
                                                      broadcast_from_rank0=True,
                                                      cpu_offload=self.offload_params))
        # Non-persistent buffers (rotary inv_freq) are in no state dict.
        with torch.no_grad():
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)
        if self.offload_params:  # shards back to host memory; buffers stay on the GPU
            self.model.to("cpu")
            for buf in self.model.buffers():
                buf.data = buf.data.to(self.device)

    # ------------------------------------------------------------------ forward

    def _forward(self, input_ids, attention_mask, position_ids, **kwargs):
        with self.autocast():
            return self.model(input_ids=input_ids.to(self.device),
                              attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                              position_ids=position_ids.to(self.device),
                              use_cache=False, **kwargs)

    # ------------------------------------------------------------------ training

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates gradients of this rank's share of the global loss."""
        (loss * self.world_size).backward()  # FSDP averages over ranks

    def step(self) -> dict[str, float]:
        """Clip, update (skipped if the gradient norm is not finite), zero grads, advance
        the schedule. Returns grad_norm (before clipping), the lr this step used, and
        skipped (1.0 when the update was dropped)."""
        if self.optimizer is None:
            raise RuntimeError("this engine was built without an optimizer (optim=None)")
        if self.offload_optimizer:
            self._move_optimizer_state(self.device)
        grad_norm = self._clip_grad_norm(self.optim_config.grad_clip)
        lr = float(self.scheduler.get_last_lr()[0])
        finite = math.isfinite(grad_norm)
        if finite:  # the norm is global, so every rank takes the same branch
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step is not a misuse
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()  # the schedule counts attempted steps, skipped ones too
        self.optimizer_steps += 1
        if self.offload_optimizer:
            self._move_optimizer_state("cpu")
        return {"grad_norm": grad_norm, "lr": lr, "skipped": 0.0 if finite else 1.0}

    def _clip_grad_norm(self, max_norm: float) -> float:
        """`clip_grad_norm_` split in two, because with CPU-offloaded shards the partial
        norm (a DTensor on the host) must move to the GPU before it can be reduced."""
        grads = [p.grad for p in self.trainable if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0).to(self.device)
        torch.nn.utils.clip_grads_with_norm_(self.trainable, max_norm, total)
        if isinstance(total, DTensor):  # sharded grads: a pending sum over ranks
            total = total.full_tensor()
        return float(total)

    def all_reduce_sum(self, x: float | int | torch.Tensor) -> float | torch.Tensor:
        """Sum over ranks; a Python number comes back as a float, a tensor as a tensor."""
        t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None)
        t = t.detach().clone().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t if torch.is_tensor(x) else float(t)

    def num_parameters(self) -> tuple[int, int]:
        # FSDP2 parameters are DTensors: numel() is the full (unsharded) size on every rank.
        return (sum(p.numel() for p in self.trainable),
                sum(p.numel() for p in self.model.parameters()))

    # ------------------------------------------------------------------ weights out

    def weight_buckets(self, bucket_bytes: int,
                       dtype: torch.dtype | None = None) -> Iterator[NamedTensors]:
        """Full weights under HF names in buckets of at most `bucket_bytes` (collective).
        Each tensor is cast on its shard and all-gathered on its own (see engine/buckets.py),
        so a rank holds one bucket plus one tensor, never the whole model. LoRA adapters
        come merged into the base weights (W + alpha/r · B·A); tied weights appear under
        every name."""
        from verlcli.engine.buckets import stream_weights

        sharded = self.model.state_dict()  # references to the local shards, no copies
        yield from stream_weights(list(sharded), lambda name, dt: self._gather(sharded[name], dt),
                                  bucket_bytes, dtype, self.lora_scale, self.tied_aliases)

    def _gather(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full tensor behind one shard (a collective), on the compute device, cast to
        `dtype` on the shard first (fewer bytes gathered; no full fp32 copy)."""
        if isinstance(t, DTensor):
            live = t.to_local().data_ptr()
            if t.device.type != self.device.type:  # CPU-offloaded shards on a GPU mesh
                t = t.to(self.device)
            if dtype is not None and t.dtype != dtype:
                t = t.to(dtype)
            full = t.full_tensor()
            # One rank: the "gathered" tensor may be the live parameter; callers keep
            # buckets across optimizer steps (full_state_dict), so hand out a copy.
            t = full.clone() if full.data_ptr() == live else full
        return t.detach()

    @property
    def lora_scale(self) -> float | None:
        return self.lora.alpha / self.lora.rank if self.lora else None

    # ------------------------------------------------------------------ offload

    def _move_optimizer_state(self, device) -> None:
        if self.optimizer is None:
            return
        # non_blocking only host→GPU: a GPU→host copy must be complete before anything
        # on the host (a checkpoint) reads it.
        to_gpu = torch.device(device).type == "cuda"
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":  # Adam's step stays on CPU
                    state[key] = value.to(device, non_blocking=to_gpu)

    def offload_to_cpu(self) -> None:
        """Free the GPU for rollout: parameters and optimizer state to host memory.
        No-op on CPU (and for parts already offloaded by policy)."""
        if self.device.type != "cuda":
            return
        if not self.offload_params:
            self.model.to("cpu")
            self._move_optimizer_state("cpu")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def load_to_device(self) -> None:
        """Undo `offload_to_cpu` (optimizer state stays on CPU with offload_optimizer)."""
        if self.device.type != "cuda":
            return
        if not self.offload_params:
            self.model.to(self.device)
            if not self.offload_optimizer:
                self._move_optimizer_state(self.device)
        torch.cuda.synchronize()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        """Sharded checkpoint into `path` (collective; see `engine.checkpoint`)."""
        return ckpt.save_checkpoint(self, path, extra or {})

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore model, optimizer, schedule and RNG; returns the saved `extra` dict."""
        return ckpt.load_checkpoint(self, path)
