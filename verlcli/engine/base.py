"""The one training-engine interface. Workers, SFT and merge talk to this and nothing else.

Implementations (chosen per role by `actor.strategy` / `critic.strategy` / `sft.strategy`):
`fsdp` (PyTorch FSDP2, `engine/fsdp.py`), and the DeepSpeed ZeRO and megatron-core engines as
they land. Nothing outside `engine/` may know which backend runs: a worker builds one with
`make_engine(role_config, model_path, ...)` and calls only the methods below.

Conventions every implementation keeps
--------------------------------------
Sequence layout. Batches are `[prompt, left-padded | response, right-padded]`, the response
in the last R positions. `log_probs` returns log p(response token j | everything before it)
as `[B, R]`; `values` returns the value of the state before each response token, `[B, R]`.
Both float32, on the engine's device. With padding removal on (`remove_padding`), the
engines pack a `[B, T]` padding mask's rows into one row inside these two calls and scatter
the results back (`engine/packing.py`): callers see the same `[B, R]` layout either way
(zeros at response positions that hold no token).

Loss scaling. `backward(loss)` takes THIS RANK'S SHARE of the global loss: a loss normalized
by counts summed over all data-parallel ranks (`all_reduce_sum`), so that adding the ranks'
losses gives the global mean. The engine applies whatever factor its gradient reduction
needs (FSDP and ZeRO average over ranks, so they multiply by the data-parallel size).
Gradient accumulation over micro-batches is just several `backward` calls before one `step`.

Data parallelism. `dp_rank`/`dp_size` say which slice of the batch this rank owns. With
tensor parallelism (Megatron) several ranks share one slice: `dp_size < world_size`.

Weights out. `weight_buckets` streams the full, unsharded weights under Hugging Face names in
buckets of at most `bucket_bytes` (one tensor larger than that is a bucket of its own), cast
to `dtype`; it is a collective (every rank iterates it to the end) and no rank ever holds
more than one bucket of gathered weights at a time. LoRA adapters come merged; tied weights
appear under every name (a rollout engine otherwise keeps its old output layer).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Literal

import torch

Kind = Literal["causal_lm", "value"]
NamedTensors = list[tuple[str, torch.Tensor]]


class TrainEngine(ABC):
    """A Hugging Face-shaped model on this rank, with optimizer, schedule and checkpoints."""

    kind: Kind
    model: torch.nn.Module  # the backend's (possibly wrapped) module; train/eval mode only
    rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype
    optimizer_steps: int

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    # ------------------------------------------------------------------ forward
    def autocast(self):
        """bf16 autocast around a forward on CPU when the compute dtype is bf16 (the weights
        stay fp32 masters); on GPU the backends cast by their own mixed-precision policy."""
        if self.device.type == "cpu" and self.compute_dtype == torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @abstractmethod
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T, V]` (full vocabulary). Grad mode is the caller's. `attention_mask`
        may be `[B, T]` (padding) or an additive `[B, 1, T, T]` mask (packed rows)."""

    @abstractmethod
    def log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, response_len: int, temperature: float = 1.0,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs `[B, R]`, entropy `[B, R]` or None), float32."""

    @abstractmethod
    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, response_len: int) -> torch.Tensor:
        """Values `[B, R]` (kind='value'), float32."""

    @contextlib.contextmanager
    def eval_mode(self):
        """No dropout inside (validation); the previous mode is restored after."""
        was_training = self.model.training
        self.model.train(False)
        try:
            yield
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ training
    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of this rank's share of the global loss (module docstring)."""

    @abstractmethod
    def step(self) -> dict[str, float]:
        """Clip, update (skipped when the gradient norm is not finite), zero grads, advance
        the schedule. Returns {'grad_norm', 'lr', 'skipped'}."""

    @abstractmethod
    def all_reduce_sum(self, x: float | int | torch.Tensor) -> float | torch.Tensor:
        """Sum over data-parallel ranks; a number comes back as a float."""

    @abstractmethod
    def num_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameters of the whole model, not this rank's shard."""

    # ------------------------------------------------------------------ weights out
    @abstractmethod
    def weight_buckets(self, bucket_bytes: int,
                       dtype: torch.dtype | None = None) -> Iterator[NamedTensors]:
        """Full weights under HF names, streamed in buckets (collective; module docstring)."""

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every full weight at once — for tests and small models only; syncs use buckets."""
        out: dict[str, torch.Tensor] = {}
        for bucket in self.weight_buckets(1 << 62, dtype):
            out.update(bucket)
        return out

    # ------------------------------------------------------------------ memory
    def offload_to_cpu(self) -> None:
        """Free the accelerator for rollout (parameters, grads, optimizer state to host).
        A no-op on CPU."""

    def load_to_device(self) -> None:
        """Undo `offload_to_cpu`."""

    # ------------------------------------------------------------------ checkpoints
    @abstractmethod
    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        """Collective. Everything to resume exactly, plus what merge-checkpoint needs."""

    @abstractmethod
    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore model, optimizer, schedule and RNG; returns the saved `extra` dict."""


STRATEGIES = ("fsdp", "deepspeed", "megatron")


def make_engine(role, model_path: str | Path, **kwargs) -> TrainEngine:
    """Build the engine a role config asks for (`role.strategy` and the backend's own keys).

    `role` is an `ActorConfig`/`CriticConfig`/`SFTConfig`-like object with a `strategy`
    field; the backend reads its own options from it. `kwargs` are the backend-neutral
    arguments (kind, optim, total_optimizer_steps, device, compute_dtype,
    gradient_checkpointing, lora, offload_params, offload_optimizer, seed,
    trust_remote_code, remove_padding: `model.remove_padding`, engine/packing.py)."""
    strategy = getattr(role, "strategy", "fsdp")
    if not kwargs.get("trust_remote_code", True):
        # model.trust_remote_code is passed on only when set, so a backend that does not take
        # the argument yet fails (loudly) only in runs that need it.
        del kwargs["trust_remote_code"]
    if strategy == "fsdp":
        from verlcli.engine.fsdp import FSDPEngine

        return FSDPEngine(model_path, **kwargs)
    if strategy == "deepspeed":
        from verlcli.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model_path, zero_stage=role.zero_stage, **kwargs)
    if strategy == "megatron":
        from verlcli.engine.megatron import MegatronEngine

        return MegatronEngine(model_path, tensor_parallel_size=role.tensor_parallel_size,
                              pipeline_parallel_size=role.pipeline_parallel_size, **kwargs)
    raise ValueError(f"unknown training strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
