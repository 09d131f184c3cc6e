"""`--from-verl`: verl's hydra overrides (`python -m verl.trainer.main_ppo KEY=VALUE ...`)
translated to this suite's keys.

Batch sizes mean the same in both (verl's `data.train_batch_size` and `ppo_mini_batch_size`
count prompts; `ppo_micro_batch_size_per_gpu` counts sequences per device), so most keys
map one to one. Keys that have no effect here (always on, or derived) are listed as
ignored, with the reason; keys with no counterpart are named as not mapped. A whole run
script works too: line continuations, comments, `python3 -m ...` and `$@` are skipped,
and simple shell assignments (`n=5`, then `rollout.n=${n}`) are substituted.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

A, R, C = "actor_rollout_ref.actor.", "actor_rollout_ref.rollout.", "critic."

# verl key -> our key (values pass through unchanged)
KEYS = {
    "data.train_files": "data.train_files", "data.val_files": "data.val_files",
    "data.train_batch_size": "data.train_prompts_per_step", "data.max_prompt_length": "data.max_prompt_tokens",
    "data.max_response_length": "data.max_response_tokens", "data.truncation": "data.truncation",
    "data.prompt_key": "data.prompt_key", "data.shuffle": "data.shuffle",
    "actor_rollout_ref.model.path": "model.path",
    "actor_rollout_ref.model.enable_gradient_checkpointing": "model.gradient_checkpointing",
    "actor_rollout_ref.model.trust_remote_code": "model.trust_remote_code",
    "actor_rollout_ref.model.use_remove_padding": "model.remove_padding",
    "actor_rollout_ref.model.lora_rank": "model.lora.rank", "actor_rollout_ref.model.lora_alpha": "model.lora.alpha",
    "actor_rollout_ref.model.target_modules": "model.lora.target_modules",
    A + "strategy": "actor.strategy", A + "optim.lr": "actor.optim.lr",
    A + "optim.weight_decay": "actor.optim.weight_decay", A + "optim.lr_warmup_steps": "actor.optim.warmup_steps",
    A + "optim.min_lr_ratio": "actor.optim.min_lr_ratio", A + "optim.warmup_style": "actor.optim.schedule",
    A + "optim.lr_scheduler_type": "actor.optim.schedule", A + "grad_clip": "actor.optim.grad_clip",
    A + "optim.clip_grad": "actor.optim.grad_clip",
    A + "ppo_mini_batch_size": "actor.mini_batch_prompts",
    A + "ppo_micro_batch_size_per_gpu": "actor.micro_batch_sequences_per_device", A + "ppo_epochs": "actor.epochs",
    A + "use_kl_loss": "actor.use_kl_loss", A + "kl_loss_coef": "actor.kl_loss_coef",
    A + "kl_loss_type": "actor.kl_loss_type", A + "entropy_coeff": "actor.entropy_coeff",
    A + "clip_ratio_low": "actor.clip_ratio_low", A + "clip_ratio_high": "actor.clip_ratio_high",
    A + "clip_ratio_c": "actor.clip_ratio_c", A + "loss_agg_mode": "actor.loss_agg_mode",
    A + "policy_loss.loss_mode": "actor.policy_loss", A + "tau_pos": "actor.tau_pos", A + "tau_neg": "actor.tau_neg",
    A + "fsdp_config.param_offload": "actor.offload_params",
    A + "fsdp_config.optimizer_offload": "actor.offload_optimizer",
    R + "name": "rollout.engine", R + "n": "rollout.n", R + "temperature": "rollout.temperature",
    R + "top_p": "rollout.top_p", R + "top_k": "rollout.top_k", R + "ignore_eos": "rollout.ignore_eos",
    R + "gpu_memory_utilization": "rollout.gpu_memory_utilization",
    R + "tensor_model_parallel_size": "rollout.tensor_parallel_size", R + "free_cache_engine": "rollout.free_cache_engine",
    R + "val_kwargs.n": "rollout.val.n", R + "val_kwargs.temperature": "rollout.val.temperature",
    R + "val_kwargs.top_p": "rollout.val.top_p", R + "val_kwargs.top_k": "rollout.val.top_k",
    C + "strategy": "critic.strategy", C + "optim.lr": "critic.optim.lr", C + "model.path": "critic.model_path",
    C + "ppo_mini_batch_size": "critic.mini_batch_prompts",
    C + "ppo_micro_batch_size_per_gpu": "critic.micro_batch_sequences_per_device", C + "ppo_epochs": "critic.epochs",
    C + "cliprange_value": "critic.cliprange_value", C + "loss_agg_mode": "critic.loss_agg_mode",
    C + "model.fsdp_config.param_offload": "critic.offload_params",
    C + "model.fsdp_config.optimizer_offload": "critic.offload_optimizer",
    "algorithm.adv_estimator": "algorithm.adv_estimator", "algorithm.gamma": "algorithm.gamma",
    "algorithm.lam": "algorithm.lam", "algorithm.norm_adv_by_std_in_grpo": "algorithm.norm_adv_by_std_in_grpo",
    "algorithm.use_kl_in_reward": "algorithm.use_kl_in_reward", "algorithm.kl_penalty": "algorithm.kl_penalty",
    "algorithm.use_pf_ppo": "algorithm.use_pf_ppo", "algorithm.filter_groups.enable": "algorithm.dynamic_sampling",
    "reward_model.overlong_buffer.penalty_factor": "algorithm.overlong_penalty_factor",
    "reward_model.model.path": "reward.model.path",
    "trainer.total_training_steps": "trainer.total_steps", "trainer.val_before_train": "trainer.val_before_train",
    "trainer.nnodes": "resources.nodes", "trainer.n_gpus_per_node": "resources.devices_per_node",
    "trainer.experiment_name": "trainer.name", "trainer.project_name": "logging.wandb_project",
    "trainer.default_local_dir": "trainer.run_dir", "trainer.logger": "logging.backends",
}
# whole sub-trees with the same names on both sides
PREFIXES = {
    "algorithm.kl_ctrl.": "algorithm.kl_ctrl.", "algorithm.rollout_correction.": "algorithm.rollout_correction.",
    "algorithm.pf_ppo.": "algorithm.pf_ppo.", A + "policy_loss.": "actor.",
}
# keys that mean nothing here, and why
IGNORED = {
    "log_prob_micro_batch_size_per_gpu": "derived from the actor's",
    "log_prob_micro_batch_size": "derived from the actor's", "ref.fsdp_config.param_offload": "the reference follows the actor",
    "calculate_log_probs": "rollout log-probs are always kept", "calculate_sum_pi_squared": "automatic for the optimal token baseline",
    "use_fused_kernels": "not used", "filter_overlong_prompts": "data.truncation decides (error names the row)",
    "critic.model.enable_gradient_checkpointing": "model.gradient_checkpointing covers both",
    "critic.model.use_remove_padding": "model.remove_padding covers actor, reference and critic", "use_legacy_worker_impl": "one worker implementation",
    "enforce_eager": "set by the engine", "enable_chunked_prefill": "set by the engine",
    "reward_model.reward_manager": "rewards are chosen by data_source", "reward_model.enable": "on when reward.model.path is set",
    "ray_init.": "Ray starts from resources.* (or RAY_ADDRESS)", "trainer.critic_warmup=0": "no warm-up is the only mode",
    "data.return_raw_chat": "not needed", "actor_rollout_ref.hybrid_engine": "always hybrid",
}
# Token-budget micro-batches: verl reads these only while the role's use_dynamic_bsz flag is on
# (the log-prob passes and the critic follow the actor's flag unless they set their own).
REF = "actor_rollout_ref.ref."
DYNAMIC_FLAGS = {A: A + "use_dynamic_bsz", R: R + "log_prob_use_dynamic_bsz",
                 REF: REF + "log_prob_use_dynamic_bsz", C: C + "use_dynamic_bsz"}
TOKEN_BUDGETS = {
    A + "ppo_max_token_len_per_gpu": (A, "actor.micro_batch_tokens_per_device"),
    R + "log_prob_max_token_len_per_gpu": (R, "actor.forward_micro_batch_tokens_per_device"),
    REF + "log_prob_max_token_len_per_gpu": (REF, "actor.forward_micro_batch_tokens_per_device"),
    C + "ppo_max_token_len_per_gpu": (C, "critic.micro_batch_tokens_per_device"),
    C + "forward_max_token_len_per_gpu": (C, "critic.forward_micro_batch_tokens_per_device"),
}
VERL_DEFAULT_BUDGET = {A: 16384, C: 32768}  # verl's ppo_max_token_len_per_gpu defaults
ENGINES = {"vllm": "vllm", "hf": "hf"}
LOGGERS = {"console": "console", "wandb": "wandb", "tensorboard": "tensorboard"}


@dataclass
class Translation:
    overrides: list[str] = field(default_factory=list)  # ours, KEY=VALUE
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (verl key, why)
    unmapped: list[str] = field(default_factory=list)  # verl KEY=VALUE with no counterpart

    def command(self, verb: str) -> str:
        return " ".join(["verl", verb, *(shlex.quote(o) for o in self.overrides)])


def read_overrides(text_or_path: str) -> list[str]:
    """KEY=VALUE tokens from an override string or a run-script file (module docstring)."""
    path = Path(text_or_path)
    text = path.read_text() if "=" not in text_or_path and path.is_file() else text_or_path
    text = text.replace("\\\n", " ")
    tokens = shlex.split(text, comments=True)
    env = dict(os.environ)
    out = []
    for tok in tokens:
        key, eq, value = tok.partition("=")
        if not eq:
            continue  # python3, -m, module names, $@
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):  # a shell assignment in a script
            env[key] = _expand(value, env)
            continue
        out.append(f"{key.lstrip('+')}={_expand(value, env)}")
    return out


def _expand(value: str, env: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value)


def translate(overrides: list[str]) -> Translation:
    t = Translation()
    values = dict(o.split("=", 1) for o in overrides)
    for key, value in values.items():
        ours = _map(key, value, values, t)
        if ours is not None:
            t.overrides.append(f"{ours[0]}={ours[1]}")
    return t


def _map(key: str, value: str, values: dict, t: Translation):
    v = value.strip()
    if key in DYNAMIC_FLAGS.values() or key in TOKEN_BUDGETS:
        return _token_budget(key, v, values, t)
    if key == "actor_rollout_ref.actor.clip_ratio":  # one value for both sides
        t.overrides.append(f"actor.clip_ratio_low={v}")
        return "actor.clip_ratio_high", v
    if key == "reward_model.overlong_buffer.enable":
        return None  # read with .len below
    if key == "reward_model.overlong_buffer.len":
        on = values.get("reward_model.overlong_buffer.enable", "False").lower() == "true"
        return "algorithm.overlong_buffer_tokens", v if on else "0"
    if key == "custom_reward_function.path":
        return "reward.fn", f"{v}:{values.get('custom_reward_function.name', 'compute_score')}"
    if key == "custom_reward_function.name":
        return None
    if key in ("trainer.save_freq", "trainer.test_freq"):  # verl: -1 = never; ours: 0
        return ("trainer.save_every" if key == "trainer.save_freq" else "trainer.val_every"), "0" if v.startswith("-") else v
    if key == "trainer.resume_mode":
        return "trainer.resume", {"auto": "auto", "disable": "never"}.get(v, values.get("trainer.resume_from_path", v))
    if key == R + "name" and v not in ENGINES:
        t.unmapped.append(f"{key}={value} (engines here: {', '.join(ENGINES)})")
        return None
    if key == "trainer.logger":
        names = re.findall(r"[A-Za-z_]+", v)
        missing = [n for n in names if n not in LOGGERS]
        if missing:
            t.unmapped.append(f"{key}={value} ({', '.join(missing)}: loggers here are {', '.join(LOGGERS)})")
        return "logging.backends", "[" + ",".join(n for n in names if n in LOGGERS) + "]"
    if key in KEYS:
        return KEYS[key], v
    for prefix, ours in PREFIXES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):], v
    for pattern, why in IGNORED.items():
        if (pattern.endswith("=0") and f"{key}={v}" .endswith(pattern)) or (not pattern.endswith("=0") and pattern in key):
            t.ignored.append((key, why))
            return None
    t.unmapped.append(f"{key}={value}")
    return None


def _dynamic(prefix: str, values: dict) -> bool:
    flag = values.get(DYNAMIC_FLAGS[prefix], values.get(DYNAMIC_FLAGS[A], "False"))
    return flag.strip().lower() == "true"


def _token_budget(key: str, v: str, values: dict, t: Translation):
    """use_dynamic_bsz + *_max_token_len_per_gpu → our *micro_batch_tokens_per_device keys."""
    if key in TOKEN_BUDGETS:
        prefix, ours = TOKEN_BUDGETS[key]
        if not _dynamic(prefix, values):
            t.ignored.append((key, "use_dynamic_bsz is off, so verl ignores it too"))
            return None
        return ours, v
    if key == DYNAMIC_FLAGS[A] and _dynamic(A, values):
        budget = values.get(A + "ppo_max_token_len_per_gpu", str(VERL_DEFAULT_BUDGET[A])).strip()
        if not any(TOKEN_BUDGETS.get(k, ("",))[0] in (R, REF) for k in values):
            # verl's log-prob passes default to the actor's budget (ours: twice it)
            t.overrides.append(f"actor.forward_micro_batch_tokens_per_device={budget}")
        if A + "ppo_max_token_len_per_gpu" not in values:  # on, with verl's default budget
            return "actor.micro_batch_tokens_per_device", budget
    if key == DYNAMIC_FLAGS[C] and _dynamic(C, values) and C + "ppo_max_token_len_per_gpu" not in values:
        return "critic.micro_batch_tokens_per_device", str(VERL_DEFAULT_BUDGET[C])
    return None  # a flag: read with the budgets
