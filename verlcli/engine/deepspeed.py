"""The DeepSpeed ZeRO training engine (`strategy: deepspeed`, `zero_stage: 1|2|3`).

Same conventions as every engine (`engine/base.py`): sequence layout, `backward` takes this
rank's share of the global loss, `weight_buckets` streams full HF-named weights.

How our loop maps onto DeepSpeed
--------------------------------
Gradient accumulation is ours: the workers call `backward` once per micro-batch and `step`
once per mini-batch, with a number of micro-batches DeepSpeed cannot know in advance. So the
config says `gradient_accumulation_steps: 1` (no 1/gas loss scaling) and
`managed_gradient_accumulation: false`: DeepSpeed then only accumulates in `backward` (stage
2/3 reduce-scatter per micro-batch into the gradient partitions) and finalizes the reduction
in `engine.step()` — our `step`. ZeRO AVERAGES gradients over data-parallel ranks, so
`backward` multiplies this rank's share by the dp size, exactly as the FSDP engine does:
both give the gradient of the global token mean (tests/unit/test_engine_deepspeed.py checks
losses and parameters against FSDP over 3 steps).

The optimizer is torch's AdamW (ours, `engine/optim.py`), handed to `deepspeed.initialize`:
no DeepSpeed C++ optimizer is compiled. The lr schedule is our LambdaLR on that optimizer,
stepped by us (skipped steps advance it too, as in FSDP). Gradient clipping and the
non-finite check are DeepSpeed's (`gradient_clipping`; a non-finite norm skips the update).

Precision: fp32 weights in ZeRO on CPU with `torch.autocast` to bf16 around forward when
the compute dtype resolves to bf16 (same as the FSDP engine, so the two compare fairly); on
GPU with bf16 compute, DeepSpeed's bf16 mode (bf16 weights, fp32 master copy in ZeRO).

Model construction: stages 1–2 keep a full copy of the weights on every rank, so every rank
reads them. Stage 3 builds the model under `deepspeed.zero.Init` (each rank materializes only
its partition) and rank 0 alone reads the checkpoint, copying it in one module at a time
through `GatheredParameters(modifier_rank=0)`.

On CPU: `DS_ACCELERATOR=cpu`, gloo (the process group the worker already made), no JIT ops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from verlcli.config.schema import LoraConfig, OptimConfig
from verlcli.engine import checkpoint as ckpt
from verlcli.engine import ds_checkpoint, packing
from verlcli.engine.base import Kind, NamedTensors, TrainEngine
from verlcli.engine.fsdp import (
    _apply_lora,
    _device_for,
    _hf_config,
    _hf_model,
    _tied_aliases,
    resolve_compute_dtype,
)
from verlcli.engine.heads import HFHeads
from verlcli.engine.optim import build_optimizer, build_scheduler

# Bucket sizes (elements) for ZeRO's reduce / all-gather buffers. DeepSpeed's defaults (5e8)
# allocate GBs of host memory per rank on CPU; past ~2e7 a bigger bucket buys nothing there.
CPU_BUCKET_ELEMENTS = 20_000_000


def import_deepspeed(device_type: str):
    """`import deepspeed` with its accelerator chosen first (it is fixed at import time)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device_type == "cpu" else "cuda")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # its INFO lines (whole config dumps) drown the run's output
    return deepspeed


def ds_config(stage: int, optim: OptimConfig | None, *, bf16: bool, on_gpu: bool,
              offload_params: bool, offload_optimizer: bool) -> dict:
    """The DeepSpeed config for our loop (see the module docstring for why each key)."""
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if not on_gpu:
        zero.update(reduce_bucket_size=CPU_BUCKET_ELEMENTS, allgather_bucket_size=CPU_BUCKET_ELEMENTS)
        if stage == 3:
            # memory_efficient_linear swaps F.linear for a custom autograd function that CPU
            # autocast does not reach: the update then runs in fp32, ~3x slower (measured).
            zero.update(stage3_prefetch_bucket_size=CPU_BUCKET_ELEMENTS, memory_efficient_linear=False)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": optim.grad_clip if optim is not None else 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: nothing to compile
        "zero_force_ds_cpu_optimizer": False,  # ... also with optimizer offload
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _lora_unit(name: str) -> str:
    """Parameters that must travel in one bucket: a LoRA layer's base weight and adapters
    (they are merged together); any other parameter alone."""
    for marker in (".base_layer.", ".lora_A.", ".lora_B."):
        if marker in name:
            return name.split(marker, 1)[0]
    return name


class DeepSpeedEngine(HFHeads, TrainEngine):
    """A HF model under DeepSpeed ZeRO on this rank, with optimizer and schedule."""

    strategy = "deepspeed"

    def __init__(self, model_path: str | Path, *, zero_stage: int = 3, kind: Kind = "causal_lm",
                 optim: OptimConfig | None = None, total_optimizer_steps: int = 1,
                 device: str = "cpu", compute_dtype: str = "auto",
                 gradient_checkpointing: bool = False, lora: LoraConfig | None = None,
                 offload_params: bool = False, offload_optimizer: bool = False, seed: int = 1,
                 remove_padding: str | bool = False):
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine needs torch.distributed initialized (a 1-rank "
                               "group is fine): call dist.init_process_group first")
        if kind not in ("causal_lm", "value"):
            raise ValueError(f"kind must be 'causal_lm' or 'value', got {kind!r}")
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage must be 1, 2 or 3, got {zero_stage!r}")
        self.model_path = Path(model_path)
        self.kind, self.zero_stage = kind, int(zero_stage)
        self.optim_config = optim
        self.lora = lora if lora is not None and lora.rank > 0 else None
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = _device_for(device)
        on_gpu = self.device.type == "cuda"
        # DeepSpeed insists on LOCAL_RANK (torchrun sets it; our Ray workers do not). On a GPU
        # it must name the device this rank already uses.
        os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0) if on_gpu else "0")
        self.ds = import_deepspeed(self.device.type)
        self.compute_dtype = resolve_compute_dtype(self.device.type, compute_dtype)
        # GPU: DeepSpeed's own bf16 mode. CPU: fp32 ZeRO + autocast, as the FSDP engine does.
        self.ds_bf16 = on_gpu and self.compute_dtype == torch.bfloat16
        # Offload only means something when the weights would otherwise live on a GPU.
        self.offload_params = offload_params and on_gpu and self.zero_stage == 3
        self.offload_optimizer = offload_optimizer and on_gpu
        self.config = ds_config(self.zero_stage, optim, bf16=self.ds_bf16, on_gpu=on_gpu,
                                offload_params=self.offload_params,
                                offload_optimizer=self.offload_optimizer and optim is not None)

        torch.manual_seed(seed)  # LoRA A init must agree on every rank
        self.hf_config = _hf_config(self.model_path, kind)
        self.model, self.hf_model = self._build(gradient_checkpointing)
        # Padding removal (engine/packing.py): log_probs/values run on packed rows.
        self.pack_mode = packing.resolve(remove_padding)
        packing.use_attention(self.hf_model, self.pack_mode, self.device.type, self.compute_dtype)
        self.tied_aliases = _tied_aliases(self.hf_model)
        self.model_class = type(self.hf_model).__name__
        self.model.train(optim is not None)
        torch.manual_seed(seed + self.rank)  # dropout streams differ per rank, as in DDP

        self.engine = self.optimizer = self.scheduler = None
        if optim is None:  # inference only (reference model): no graph, no grads
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if optim is not None:
            self.optimizer = build_optimizer(self.trainable, optim)
            self.engine, *_ = self.ds.initialize(model=self.model, optimizer=self.optimizer,
                                                 config=self.config, dist_init_required=False)
            # After initialize: ZeRO has put its flat partitions into these param groups.
            self.scheduler = build_scheduler(self.optimizer, optim, total_optimizer_steps)
        elif self.zero_stage == 3:  # ZeRO-3 inference: the engine gathers layers on demand
            self.engine, *_ = self.ds.initialize(model=self.model, config=self.config,
                                                 dist_init_required=False)
        elif on_gpu:
            self.model.to(self.device)
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ set-up

    def _param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.ds_bf16 else torch.float32

    def _build(self, gradient_checkpointing: bool) -> tuple[nn.Module, nn.Module]:
        """(model to train — peft-wrapped with LoRA —, the plain transformers model)."""
        if self.zero_stage < 3:  # every rank holds full weights anyway: every rank reads them
            hf_model = _hf_model(self.model_path, self.kind, self.hf_config, on_meta=False)
            model = self._finish(hf_model, gradient_checkpointing)
            return model, hf_model
        # Rank 0 reads the weights (and initializes LoRA / the value head) into a full copy;
        # every rank builds its partition under zero.Init and rank 0 fills it module by module.
        full = None
        if self.rank == 0:
            full_hf = _hf_model(self.model_path, self.kind, self.hf_config, on_meta=False)
            full = self._finish(full_hf, False)
        from transformers.initialization import no_init_weights

        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

        cls = AutoModelForCausalLM if self.kind == "causal_lm" else AutoModelForTokenClassification
        # No dtype= for zero.Init: DeepSpeed 0.19.8 then ignores it on CPU (picks bf16); from the
        # config it takes bf16 exactly when our bf16 mode is on, else fp32.
        with self.ds.zero.Init(config_dict_or_path=self.config), \
                no_init_weights():  # values come from rank 0 below
            hf_model = cls.from_config(self.hf_config, dtype=self._param_dtype())
        if getattr(self.hf_config, "tie_word_embeddings", False):
            hf_model.tie_weights()  # skipped with the weight init: lm_head must BE the embedding
        # LoRA outside zero.Init: peft sizes the adapters from the base weights, which are
        # empty partitions in there. The small adapters stay whole until initialize()
        # partitions them with the rest.
        model = self._finish(hf_model, gradient_checkpointing)
        self._copy_from_rank0(model, full)
        del full
        return model, hf_model

    def _finish(self, hf_model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
        if gradient_checkpointing:
            hf_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        return _apply_lora(hf_model, self.lora, self.kind) if self.lora else hf_model

    def _copy_from_rank0(self, model: nn.Module, full: nn.Module | None) -> None:
        """Fill the ZeRO-3 partitions from rank 0's full model, one module at a time."""
        src = dict(full.named_parameters(remove_duplicate=False)) if full is not None else {}
        src_buffers = dict(full.named_buffers()) if full is not None else {}
        for prefix, module in model.named_modules():
            params = list(module.named_parameters(prefix=prefix, recurse=False))
            if params:
                with self.ds.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                    if self.rank == 0:
                        with torch.no_grad():
                            for name, p in params:
                                p.data.copy_(src[name].data.to(p.dtype))
                for _, p in params:
                    if not hasattr(p, "ds_id"):  # not partitioned yet (LoRA adapters)
                        dist.broadcast(p.data, src=0)
            for name, buf in module.named_buffers(prefix=prefix, recurse=False):
                if self.rank == 0:
                    buf.data.copy_(src_buffers[name].data)
                dist.broadcast(buf.data, src=0)

    # ------------------------------------------------------------------ forward

    def _forward(self, input_ids, attention_mask, position_ids, **kwargs):
        module = self.engine if self.engine is not None else self.model
        if attention_mask is not None and attention_mask.is_floating_point() and self.ds_bf16:
            attention_mask = attention_mask.to(torch.bfloat16)  # additive mask in compute dtype
        with self.autocast():
            return module(input_ids=input_ids.to(self.device),
                          attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                          position_ids=position_ids.to(self.device), use_cache=False, **kwargs)

    # ------------------------------------------------------------------ training

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates gradients of this rank's share of the global loss."""
        if self.optimizer is None:
            raise RuntimeError("this engine was built without an optimizer (optim=None)")
        self.engine.backward(loss * self.dp_size)  # ZeRO averages over ranks

    def step(self) -> dict[str, float]:
        """Finalize the reduction, clip, update (DeepSpeed skips a non-finite gradient),
        zero grads, advance the schedule. Returns grad_norm (before clipping), lr, skipped."""
        if self.optimizer is None:
            raise RuntimeError("this engine was built without an optimizer (optim=None)")
        lr = float(self.scheduler.get_last_lr()[0])
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        applied = self.engine.was_step_applied() and math.isfinite(grad_norm)
        self.scheduler.step()  # the schedule counts attempted steps, skipped ones too
        self.optimizer_steps += 1
        return {"grad_norm": grad_norm if applied else float("inf"), "lr": lr,
                "skipped": 0.0 if applied else 1.0}

    def all_reduce_sum(self, x: float | int | torch.Tensor) -> float | torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None)
        t = t.detach().clone().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t if torch.is_tensor(x) else float(t)

    def num_parameters(self) -> tuple[int, int]:
        def numel(p):  # ZeRO-3 partitions hold ds_numel elements in all
            return getattr(p, "ds_numel", p.numel())

        return (sum(numel(p) for p in self.trainable),
                sum(numel(p) for p in self.model.parameters()))

    # ------------------------------------------------------------------ weights out

    @property
    def lora_scale(self) -> float | None:
        return self.lora.alpha / self.lora.rank if self.lora else None

    def _units(self) -> list[list[tuple[str, nn.Parameter]]]:
        """Parameters in model order, grouped so a LoRA layer never spans two buckets."""
        units: list[list[tuple[str, nn.Parameter]]] = []
        last = None
        for name, p in self.model.named_parameters():
            key = _lora_unit(name)
            if units and key == last:
                units[-1].append((name, p))
            else:
                units.append([(name, p)])
            last = key
        return units

    def _gathered(self, named: list[tuple[str, nn.Parameter]]):
        if self.zero_stage == 3:
            return self.ds.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        return contextlib.nullcontext()

    def _bucket(self, named, dtype) -> NamedTensors:
        with self._gathered(named), torch.no_grad():
            sd = {n: p.data.detach().clone() for n, p in named}
        # A bucket without a LoRA layer has nothing to merge (merge_lora insists on one).
        scale = self.lora_scale if any(".base_layer." in n for n in sd) else None
        sd = ckpt.to_hf_state_dict(sd, scale, self.tied_aliases)
        return [(k, v.to(dtype) if dtype is not None else v) for k, v in sd.items()]

    def weight_buckets(self, bucket_bytes: int,
                       dtype: torch.dtype | None = None) -> Iterator[NamedTensors]:
        """Full weights under HF names, at most `bucket_bytes` gathered at a time (one unit
        larger than that goes alone). LoRA merged; tied weights under every name."""
        pending: list[tuple[str, nn.Parameter]] = []
        size = 0
        for unit in self._units():
            unit_bytes = sum(getattr(p, "ds_numel", p.numel()) * (dtype or p.dtype).itemsize
                             for _, p in unit)
            if pending and size + unit_bytes > bucket_bytes:
                yield self._bucket(pending, dtype)
                pending, size = [], 0
            pending += unit
            size += unit_bytes
        if pending:
            yield self._bucket(pending, dtype)

    # ------------------------------------------------------------------ memory

    def _moves_states(self) -> bool:
        # DeepSpeed's offload_states: GPU only, a training engine, and not with parameters
        # already offloaded by ZeRO-Offload (it asserts both).
        return (self.device.type == "cuda" and self.optimizer is not None and not self.offload_params
                and hasattr(self.engine.optimizer, "offload_states"))

    def offload_to_cpu(self) -> None:
        """Free the GPU for rollout (DeepSpeed's offload_states). No-op on CPU."""
        if self._moves_states():
            self.engine.offload_states()
            torch.cuda.empty_cache()

    def load_to_device(self) -> None:
        if self._moves_states():
            self.engine.reload_states()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        """DeepSpeed's checkpoint in `path/model` plus our state beside it (collective)."""
        return ds_checkpoint.save(self, Path(path), extra or {})

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore model, optimizer, schedule and RNG; returns the saved `extra` dict."""
        return ds_checkpoint.load(self, Path(path))
