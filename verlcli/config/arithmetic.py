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
    # Which micro-batch rule is in force (a token budget, or the sequence count): --dry-run.
    actor_micro_batch: str = ""
    actor_forward_micro_batch: str = ""
    critic_micro_batch: str = ""

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
    if cfg.estimator_needs.group and n < 2:  # declared on the estimator's registry entry
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
    T = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    for role, pc in (("actor", a), ("critic", cfg.critic)) if cfg.use_critic else (("actor", a),):
        _check_token_budgets(role, pc, T)
        # A token budget replaces the sequence count, and its divisibility rule with it.
        micro = None if pc.micro_batch_tokens_per_device else pc.micro_batch_sequences_per_device
        _check_policy_batches(role, pc.mini_batch_prompts, micro, P, n, dp)
    check_rollout_tp(cfg, model_config_json(cfg.model.path) if cfg.rollout.tensor_parallel_size > 1 else None)
    M = a.mini_batch_prompts
    mini_seqs = M * n
    per_dev = mini_seqs // dp
    # With a token budget the count depends on the lengths: the worst case (every sequence T long).
    per_micro = micro_sequences(a, T)
    return BatchPlan(
        prompts_per_step=P,
        responses_per_step=P * n,
        data_parallel_size=dp,
        mini_batch_prompts=M,
        mini_batch_sequences=mini_seqs,
        optimizer_steps_per_step=(P // M) * a.epochs,
        micro_batch_sequences_per_device=a.micro_batch_sequences_per_device,
        grad_accum_steps=-(-per_dev // per_micro),
        sequences_per_device_per_mini_batch=per_dev,
        max_sequence_tokens=T,
        actor_micro_batch=micro_batch_rule("actor", a),
        actor_forward_micro_batch=micro_batch_rule("actor", a, forward=True),
        critic_micro_batch=micro_batch_rule("critic", cfg.critic) if cfg.use_critic else "off (no critic)",
    )


def forward_token_budget(pc) -> int | None:
    """Token budget of a role's no-grad forwards, or None (sequence count in force)."""
    if pc.forward_micro_batch_tokens_per_device:
        return pc.forward_micro_batch_tokens_per_device
    return 2 * pc.micro_batch_tokens_per_device if pc.micro_batch_tokens_per_device else None


def micro_sequences(pc, seq_tokens: int, forward: bool = False) -> int:
    """Sequences per micro-batch when every sequence is `seq_tokens` long (the worst case)."""
    budget = forward_token_budget(pc) if forward else pc.micro_batch_tokens_per_device
    if budget:
        return max(budget // seq_tokens, 1)
    return pc.micro_batch_sequences_per_device * (2 if forward else 1)


def micro_batch_rule(role: str, pc, forward: bool = False) -> str:
    """One line for --dry-run: what cuts this role's micro-batches."""
    if forward:
        if pc.forward_micro_batch_tokens_per_device:
            return f"≤ {pc.forward_micro_batch_tokens_per_device} tokens ({role}.forward_micro_batch_tokens_per_device)"
        if pc.micro_batch_tokens_per_device:
            return f"≤ {2 * pc.micro_batch_tokens_per_device} tokens (2 × {role}.micro_batch_tokens_per_device)"
        return f"{2 * pc.micro_batch_sequences_per_device} sequences (2 × {role}.micro_batch_sequences_per_device)"
    if pc.micro_batch_tokens_per_device:
        return f"≤ {pc.micro_batch_tokens_per_device} tokens ({role}.micro_batch_tokens_per_device)"
    return f"{pc.micro_batch_sequences_per_device} sequences ({role}.micro_batch_sequences_per_device)"


def _check_token_budgets(role: str, pc, T: int) -> None:
    """A budget must hold the longest possible sequence: rows are never split across forwards."""
    for key, budget in (("micro_batch_tokens_per_device", pc.micro_batch_tokens_per_device),
                        ("forward_micro_batch_tokens_per_device", pc.forward_micro_batch_tokens_per_device)):
        if budget is not None and budget < T:
            works = T * pc.micro_batch_sequences_per_device
            raise UserError(
                f"{role}.{key}={budget} is smaller than the longest possible sequence: {T} tokens "
                "(data.max_prompt_tokens + data.max_response_tokens)",
                fix=f"set {role}.{key} to at least {T} (e.g. {works}: "
                f"{pc.micro_batch_sequences_per_device} full-length sequences), or leave it unset",
            )


def model_config_json(path: str) -> dict | None:
    """The model's config.json without loading or downloading anything: a local directory,
    a built-in already built, or a hub id already in the HF cache; None otherwise."""
    import json
    from pathlib import Path

    from verlcli.models.builtin import BUILTINS, models_dir

    candidates = [Path(path).expanduser() / "config.json"]
    if path in BUILTINS:
        candidates.append(models_dir() / path / "config.json")
    elif path.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # noqa: BLE001 - a cache lookup must never fail the check
            pass
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    return None


def tp_fits(tp: int, heads: int, kv_heads: int) -> bool:
    """vLLM's rule: TP divides the attention heads, and divides the KV heads or is a multiple
    of them (KV heads are then replicated)."""
    return heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)


def check_rollout_tp(cfg: Config, model_config: dict | None) -> None:
    """rollout.tensor_parallel_size against the world size and (when known) the model's heads."""
    tp, world = cfg.rollout.tensor_parallel_size, cfg.world_size
    if tp == 1:
        return
    if cfg.rollout.engine != "vllm":
        raise UserError(f"rollout.tensor_parallel_size={tp} needs rollout.engine=vllm "
                        f"(rollout.engine={cfg.rollout.engine})",
                        fix="set rollout.engine=vllm, or rollout.tensor_parallel_size=1")
    if world % tp:
        raise UserError(
            f"rollout.tensor_parallel_size={tp} does not divide the {world} workers "
            "(resources.nodes × resources.devices_per_node)",
            fix=f"set rollout.tensor_parallel_size to a divisor of {world} (e.g. {_divisors_hint(world)})")
    if model_config is None:
        return  # not on disk yet: checked again once the model is resolved
    text = model_config.get("text_config") or model_config
    heads = text.get("num_attention_heads")
    if not heads:
        return
    kv = text.get("num_key_value_heads") or heads
    if not tp_fits(tp, heads, kv):
        works = [t for t in range(1, world + 1) if world % t == 0 and tp_fits(t, heads, kv)]
        raise UserError(
            f"rollout.tensor_parallel_size={tp} does not fit model {cfg.model.path}: it has "
            f"{heads} attention heads and {kv} KV heads (TP must divide the heads, and divide "
            "or be a multiple of the KV heads)",
            fix=f"set rollout.tensor_parallel_size to one of: {', '.join(map(str, works))}")


def _check_policy_batches(role: str, M: int, micro: int | None, P: int, n: int, dp: int) -> None:
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
    if micro and per_dev % micro:
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
    cuda_devices = None
    if device == "cuda" and cuda_available:
        import torch

        cuda_devices = torch.cuda.device_count() or None  # None: not knowable here
    check_placement(placement_plan(cfg), device, cuda_devices, cpu_count or os.cpu_count() or 1)
    return device


# ---------------------------------------------------------------------------- placement


@dataclass
class PlacementPlan:
    """Which worker groups share the run's devices and which get a pool of their own.

    The run's pool is resources.nodes × devices_per_node devices. Every colocated group puts
    rank r on device r and takes 1/len(colocated) of it (GPU and CPU). A `*.placement=separate`
    group reserves another world_size devices of its own.
    """

    colocated: list[str]
    separate: list[str]
    world_size: int
    nodes: int
    devices_per_node: int
    device: str
    cpus_per_worker: float

    @property
    def share(self) -> float:
        return 1.0 / len(self.colocated)

    @property
    def pools(self) -> int:
        return 1 + len(self.separate)

    @property
    def devices_needed(self) -> int:
        return self.world_size * self.pools

    @property
    def cpus_needed(self) -> float:
        return self.world_size * self.cpus_per_worker * self.pools

    def as_dict(self) -> dict:
        unit = {"cuda": "GPUs", "cpu": "CPU workers"}.get(self.device, "devices")
        share = f"1/{len(self.colocated)} of a device" if len(self.colocated) > 1 else "a whole device"
        rows = {
            "colocated on the run's devices": f"{' + '.join(self.colocated)} ({share} each)",
            "own resource pool": ", ".join(self.separate) or "none",
            "resource pools": f"{self.pools} × ({self.nodes} node(s) × {self.devices_per_node} {unit})",
            "devices needed": self.devices_needed,
            "nodes needed": self.nodes * self.pools if self.separate else self.nodes,
            "CPUs reserved": f"{self.cpus_needed:g}",
        }
        return rows


def placement_plan(cfg: Config) -> PlacementPlan:
    """The groups an RL run starts and where they go (the trainer builds exactly this)."""
    hybrid = "actor+rollout" + ("+ref" if cfg.use_reference else "")
    separate = []
    if cfg.use_critic:
        if cfg.critic.placement == "separate":
            separate.append("critic")
        else:
            hybrid += "+critic"  # the critic lives in the actor's worker process
    colocated = [hybrid]
    if cfg.reward.model.path:
        (separate if cfg.reward.model.placement == "separate" else colocated).append("reward_model")
    r = cfg.resources
    return PlacementPlan(colocated, separate, cfg.world_size, r.nodes, r.devices_per_node, r.device,
                         r.cpus_per_worker)


def check_placement(plan: PlacementPlan, device: str, cuda_devices: int | None, cpu_count: int | None) -> None:
    """Devices needed vs present, where this machine can tell (one node). A run on a Ray
    cluster is checked again against the cluster's resources before anything is reserved."""
    if plan.nodes != 1:
        return
    keys = [f"{'critic' if g == 'critic' else 'reward.model'}.placement=separate" for g in plan.separate]
    why = f" ({plan.world_size} for the actor + {plan.world_size} for each of {', '.join(keys)})" if keys else ""
    fix_sep = f"set {' and '.join(k.replace('separate', 'colocated') for k in keys)} (share the actor's devices), or " if keys else ""
    if device == "cuda" and cuda_devices is not None and plan.devices_needed > cuda_devices:
        fit = max(cuda_devices // plan.pools, 1)
        raise UserError(
            f"the run needs {plan.devices_needed} GPUs{why}, this machine has {cuda_devices}",
            fix=f"{fix_sep}set resources.devices_per_node={fit}",
        )
    if device == "cpu" and cpu_count is not None and plan.cpus_needed > cpu_count:
        fit = max(int(cpu_count // (plan.pools * plan.cpus_per_worker)), 1)
        raise UserError(
            f"{plan.devices_needed} CPU workers{why} × resources.cpus_per_worker={plan.cpus_per_worker:g} "
            f"need {plan.cpus_needed:g} cores, this machine has {cpu_count}",
            fix=f"{fix_sep}lower resources.devices_per_node (≤ {fit}) or resources.cpus_per_worker",
        )
