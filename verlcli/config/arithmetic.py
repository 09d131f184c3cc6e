"""Batch arithmetic: what one step means in prompts, sequences and optimizer steps.

The most common confusion in RL trainers is which batch sizes count prompts and which count
responses (prompts × n), and which are global vs per device. Everything is derived here,
once, printed by `--dry-run`, and checked before any worker starts; each failed check names
the keys involved and a value that would work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from verlcli.config.schema import Config
from verlcli.errors import UserError


@dataclass
class BatchPlan:
    prompts_per_step: int
    responses_per_step: int
    data_parallel_size: int
    mini_batch_prompts: int
    mini_batch_sequences: int
    optimizer_steps_per_step: int
    micro_batch_sequences_per_device: int
    grad_accum_steps: int
    sequences_per_device_per_mini_batch: int
    max_sequence_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def _divisors_hint(total: int, upto: int | None = None) -> str:
    divs = [d for d in range(1, total + 1) if total % d == 0 and (upto is None or d <= upto)]
    return ", ".join(map(str, divs[-6:]))


def rl_plan(cfg: Config) -> BatchPlan:
    """Derive and check the RL batch arithmetic (actor; the critic is checked the same way)."""
    P = cfg.data.train_prompts_per_step
    n = cfg.rollout.n
    dp = cfg.world_size
    a = cfg.actor
    if cfg.algorithm.adv_estimator in ("grpo", "rloo", "opo", "grpo_passk", "reinforce_plus_plus_baseline") and n < 2:
        raise UserError(
            f"algorithm.adv_estimator={cfg.algorithm.adv_estimator} compares responses within a group, "
            f"but rollout.n={n}",
            fix="set rollout.n=2 or more (e.g. rollout.n=4)",
        )
    if P < dp:
        raise UserError(
            f"data.train_prompts_per_step={P} is smaller than the {dp} data-parallel workers",
            fix=f"set data.train_prompts_per_step to at least {dp}",
        )
    for role, pc in (("actor", a), ("critic", cfg.critic)) if cfg.use_critic else (("actor", a),):
        _check_policy_batches(role, pc.mini_batch_prompts, pc.micro_batch_sequences_per_device, P, n, dp)
    M = a.mini_batch_prompts
    mini_seqs = M * n
    per_dev = mini_seqs // dp
    return BatchPlan(
        prompts_per_step=P,
        responses_per_step=P * n,
        data_parallel_size=dp,
        mini_batch_prompts=M,
        mini_batch_sequences=mini_seqs,
        optimizer_steps_per_step=(P // M) * a.epochs,
        micro_batch_sequences_per_device=a.micro_batch_sequences_per_device,
        grad_accum_steps=per_dev // a.micro_batch_sequences_per_device,
        sequences_per_device_per_mini_batch=per_dev,
        max_sequence_tokens=cfg.data.max_prompt_tokens + cfg.data.max_response_tokens,
    )


def _check_policy_batches(role: str, M: int, micro: int, P: int, n: int, dp: int) -> None:
    if P % M:
        raise UserError(
            f"data.train_prompts_per_step={P} is not divisible by {role}.mini_batch_prompts={M}",
            fix=f"set {role}.mini_batch_prompts to a divisor of {P} (e.g. {_divisors_hint(P)})",
        )
    seqs = M * n
    if seqs % dp:
        raise UserError(
            f"{role}.mini_batch_prompts={M} × rollout.n={n} = {seqs} sequences cannot be split "
            f"evenly over {dp} data-parallel workers (resources.nodes × resources.devices_per_node)",
            fix=f"make {role}.mini_batch_prompts × rollout.n a multiple of {dp}",
        )
    per_dev = seqs // dp
    if per_dev % micro:
        raise UserError(
            f"each device gets {per_dev} sequences per mini-batch ({role}.mini_batch_prompts={M} × "
            f"rollout.n={n} / {dp} devices), not divisible by {role}.micro_batch_sequences_per_device={micro}",
            fix=f"set {role}.micro_batch_sequences_per_device to a divisor of {per_dev} "
            f"(e.g. {_divisors_hint(per_dev)})",
        )


def sft_plan(cfg: Config) -> dict:
    s = cfg.sft
    dp = cfg.world_size
    if s.batch_sequences % dp:
        raise UserError(
            f"sft.batch_sequences={s.batch_sequences} cannot be split over {dp} workers",
            fix=f"make sft.batch_sequences a multiple of {dp}",
        )
    per_dev = s.batch_sequences // dp
    if per_dev % s.micro_batch_sequences_per_device:
        raise UserError(
            f"each device gets {per_dev} sequences per step, not divisible by "
            f"sft.micro_batch_sequences_per_device={s.micro_batch_sequences_per_device}",
            fix=f"set sft.micro_batch_sequences_per_device to a divisor of {per_dev} (e.g. {_divisors_hint(per_dev)})",
        )
    return {
        "sequences_per_step": s.batch_sequences,
        "data_parallel_size": dp,
        "sequences_per_device": per_dev,
        "micro_batch_sequences_per_device": s.micro_batch_sequences_per_device,
        "grad_accum_steps": per_dev // s.micro_batch_sequences_per_device,
        "max_length_tokens": s.max_length_tokens,
    }


def check_resources(cfg: Config, cuda_available: bool | None = None, cpu_count: int | None = None) -> str:
    """Resolve resources.device and check the requested workers can exist. Returns 'cuda'|'cpu'."""
    import os

    r = cfg.resources
    if cuda_available is None:
        try:
            import torch

            cuda_available = torch.cuda.is_available()
        except ImportError:  # pragma: no cover
            cuda_available = False
    device = r.device if r.device != "auto" else ("cuda" if cuda_available else "cpu")
    if device == "cuda" and not cuda_available:
        raise UserError("resources.device=cuda but no CUDA device is visible", fix="use resources.device=cpu (or auto)")
    if cfg.launcher == "local" and cfg.world_size != 1:
        raise UserError(
            f"launcher=local runs one process, but resources asks for {cfg.world_size} workers",
            fix="set resources.nodes=1 resources.devices_per_node=1, or use launcher=ray",
        )
    if device == "cpu" and r.nodes == 1:
        cpus = cpu_count or os.cpu_count() or 1
        need = r.devices_per_node * r.cpus_per_worker
        if need > cpus:
            raise UserError(
                f"{r.devices_per_node} CPU workers × resources.cpus_per_worker={r.cpus_per_worker} "
                f"need {need:g} cores, this machine has {cpus}",
                fix=f"lower resources.devices_per_node or resources.cpus_per_worker (≤ {cpus} cores in total)",
            )
    return device
