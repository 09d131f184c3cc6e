"""The one config schema.

Every key a user can set lives here, once: its type, default and meaning. The same classes
validate presets, YAML files and `KEY=VALUE` overrides, and `verl presets NAME` prints them.
Batch units are in the key names: `*_prompts` count prompts, `*_sequences` count
responses (prompts × rollout.n), `*_tokens` count tokens.
"""

from __future__ import annotations

from typing import Literal, Optional, Union, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """Base: unknown keys are errors (the loader turns them into 'did you mean')."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _one_value_as_list(cls, value, info):
        # verl users write data.train_files=path: one value where a list is expected is a
        # one-element list, for every list-valued key (on load and on assignment).
        if isinstance(value, (str, int, float)) and get_origin(cls.model_fields[info.field_name].annotation) is list:
            return [value]
        return value


class LoraConfig(Section):
    rank: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tuning.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, le=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get adapters (peft target_modules).",
    )


class ModelConfig(Section):
    path: str = Field(
        "smollm2-135m-instruct",
        description="Built-in name (smollm2-135m-instruct, tiny-qwen2), local HF directory, or hub id.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    remove_padding: Union[Literal["auto"], bool] = Field(
        "auto", description="Pack each micro-batch's sequences into one row (per-sequence position "
        "ids, attention kept inside each sequence) in every actor, reference and critic forward "
        "(verl: use_remove_padding). auto = on (faster than padded rows in every measured case, "
        "BENCHMARKS.md); false = padded rows trimmed to the longest. Megatron packs with a "
        "block-diagonal mask; SFT has its own sft.packing.",
    )
    trust_remote_code: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)


class DataConfig(Section):
    train_files: list[str] = Field(
        default_factory=lambda: ["data/arithmetic/train.parquet"],
        description="Parquet files in the dataset schema (see `verl prepare-data`).",
    )
    val_files: list[str] = Field(default_factory=list, description="Held-out parquet files.")
    prompt_key: str = "prompt"
    max_prompt_tokens: int = Field(256, ge=1, description="Longer prompts are an error (or truncated).")
    max_response_tokens: int = Field(128, ge=1, description="Generation limit per response.")
    truncation: Literal["error", "left", "filter"] = Field(
        "error", description="Prompts over data.max_prompt_tokens: error (names the row), left (cut from the left), "
        "or filter (drop them, counted; an error if none is left). SFT: filter drops samples over sft.max_length_tokens.",
    )
    train_prompts_per_step: int = Field(8, ge=1, description="Prompts per RL step (verl: train_batch_size).")
    val_prompts: int = Field(0, ge=0, description="Use at most this many validation prompts; 0 = all.")
    shuffle: bool = True
    # SFT columns
    messages_key: str = "messages"
    response_key: str = "response"


class SamplingConfig(Section):
    n: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1


class MultiTurnConfig(Section):
    """Agent rollouts (verlcli/rollout/agent_loop.py): the model calls tools over several turns.
    The whole trajectory (model turns + tool results) is one response of at most
    data.max_response_tokens tokens; only the model's own tokens are trained on."""

    enable: bool = Field(False, description="Multi-turn tool-calling rollouts with the tools in `tools`.")
    max_turns: int = Field(4, ge=1, description="Model turns per trajectory; a tool call in the last one "
                           "is not run (the trajectory ends without an answer).")
    max_tool_response_tokens: int = Field(256, ge=1, description="A tool result longer than this many "
                                          "tokens is cut (and says so) before it enters the conversation.")
    tool_timeout_s: float = Field(10.0, gt=0.0, description="Wall/CPU time limit of one tool call; a "
                                  "timeout becomes an error message to the model, never a crash.")
    tool_memory_mb: int = Field(1024, ge=1, description="Address-space limit of a sandboxed tool call "
                                "(the python tool's and user tools' subprocess), in MB.")


class RolloutConfig(Section):
    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm (production) or hf (transformers generate).")
    n: int = Field(4, ge=1, description="Responses sampled per prompt.")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, description="-1 = off.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS always stops).")
    ignore_eos: bool = Field(
        False, description="Training rollouts: EOS does not end a response, so every response is "
        "data.max_response_tokens long (rollout.stop strings still end one). For equal-work "
        "benchmarks; validation still stops at EOS.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on GPU; on CPU the training compute dtype."
    )
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks sharing one vLLM engine (world / T engines); must divide the "
        "world size and the model's attention and KV heads.",
    )
    sync_bucket_mb: int = Field(
        256, ge=1, description="Actor → rollout weight sync streams full weights in buckets of at "
        "most this many MB (rollout dtype); bounds the extra memory of a sync.",
    )
    offload_trainer: bool = Field(
        False, description="GPU: move actor/ref/critic parameters and optimizer state to host "
        "memory while the rollout generates (also on with actor.offload_*); a no-op on CPU.",
    )
    free_cache_engine: bool = Field(
        True, description="vLLM frees memory while the trainer runs: on GPU its weights and KV cache "
        "(sleep/wake); on CPU its KV cache pages, and its packed weights from the update to the weight sync.")
    cpu_kvcache_gb: float | None = Field(
        None, gt=0, description="vLLM KV cache on CPU, GiB. Unset: sized from the job (rows per "
        "engine × (max prompt + max response) tokens × layers × KV heads × head dim × 2 × dtype "
        "bytes, at least one max-length sequence); the chosen size is in the worker's log.",
    )
    val: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling for validation.")
    multi_turn: MultiTurnConfig = Field(default_factory=MultiTurnConfig, description="Tool-calling agent rollouts.")


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    grad_clip: float = Field(1.0, gt=0.0)


class EngineChoice(Section):
    """Which training engine a role runs on (`verlcli.engine.make_engine` reads these)."""

    strategy: Literal["fsdp", "deepspeed", "megatron"] = Field(
        "fsdp", description="Training engine: fsdp (PyTorch FSDP2), deepspeed (ZeRO) or megatron (megatron-core tensor parallel)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="strategy=megatron: ranks that split each layer (must divide the ranks and the attention/KV heads); the rest is data parallel."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="strategy=megatron: pipeline stages; only 1 is supported (megatron's pipeline schedules need CUDA)."
    )
    zero_stage: Literal[1, 2, 3] = Field(
        3, description="strategy=deepspeed: ZeRO stage (1 optimizer states, 2 + gradients, 3 + parameters sharded)."
    )


class PolicyConfig(EngineChoice):
    """Shared by actor and critic: how a mini-batch is cut and how memory is saved.
    The reference model runs on the actor's engine choice."""

    mini_batch_prompts: int = Field(
        8, ge=1, description="Prompts per optimizer step (verl: ppo_mini_batch_size); × rollout.n sequences."
    )
    micro_batch_sequences_per_device: int = Field(
        4, ge=1, description="Sequences per forward/backward on one device; gradient accumulation covers the rest."
    )
    micro_batch_tokens_per_device: Optional[int] = Field(
        None, ge=1, description="Fill each forward/backward up to this many tokens instead of a fixed sequence "
        "count (verl: ppo_max_token_len_per_gpu with use_dynamic_bsz); must hold the longest sequence "
        "(data.max_prompt_tokens + data.max_response_tokens). Unset: micro_batch_sequences_per_device."
    )
    forward_micro_batch_tokens_per_device: Optional[int] = Field(
        None, ge=1, description="Token budget of the no-grad forwards (actor: old and reference log-probs; "
        "critic: values; verl: log_prob_max_token_len_per_gpu / forward_max_token_len_per_gpu). Unset: "
        "2 × micro_batch_tokens_per_device when that is set, else 2 × micro_batch_sequences_per_device sequences."
    )
    epochs: int = Field(1, ge=1, description="Passes over each step's data (verl: ppo_epochs).")
    offload_params: bool = False
    offload_optimizer: bool = False


class ActorConfig(PolicyConfig):
    optim: OptimConfig = Field(default_factory=OptimConfig)
    policy_loss: str = Field(
        "vanilla", description="vanilla, gspo, sapo, geo_mean (GMPO), clip_cov, kl_cov, cispo, gpg, bypass_mode."
    )
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = Field(3.0, gt=1.0, description="Dual-clip bound for negative advantages.")
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = "token-mean"
    entropy_coeff: float = 0.0
    use_kl_loss: bool = Field(False, description="KL to the reference as a loss term (GRPO style).")
    kl_loss_coef: float = 0.001
    kl_loss_type: str = Field("low_var_kl", description="k1, abs, k2 (mse), k3 (low_var_kl).")
    clip_cov_ratio: float = Field(0.0002, ge=0.0, le=1.0, description="clip_cov: fraction of tokens whose gradient is cut.")
    clip_cov_lb: float = Field(1.0, description="clip_cov: covariance window, lower bound.")
    clip_cov_ub: float = Field(5.0, description="clip_cov: covariance window, upper bound.")
    kl_cov_ratio: float = Field(0.0002, ge=0.0, le=1.0, description="kl_cov: fraction of tokens given the KL penalty.")
    ppo_kl_coef: float = Field(0.1, ge=0.0, description="kl_cov: weight of |log ratio| on those tokens (verl 0.1).")
    tau_pos: float = Field(1.0, gt=0.0, description="sapo: gate temperature where the advantage is positive.")
    tau_neg: float = Field(1.05, gt=0.0, description="sapo: gate temperature elsewhere.")


class CriticConfig(PolicyConfig):
    model_path: Optional[str] = Field(None, description="Defaults to model.path (value head added).")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-5))
    cliprange_value: float = 0.5
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = "token-mean"
    placement: Literal["colocated", "separate"] = Field(
        "colocated", description="Share the actor's devices, or get its own resource pool."
    )


class KLControlConfig(Section):
    type: Literal["fixed", "adaptive"] = "fixed"
    kl_coef: float = 0.001
    target_kl: float = 0.1
    horizon: int = 10000


class RolloutCorrectionConfig(Section):
    """verl's algorithm.rollout_correction: the rollout engine's log-probs vs the trainer's."""

    rollout_is: Optional[Literal["token", "sequence"]] = Field(
        None, description="IS weights π_train/π_rollout per token or per sequence (product); None = off."
    )
    rollout_is_threshold: float = Field(2.0, gt=0.0, description="Cap of the IS weights (truncated IS).")
    rollout_is_batch_normalize: bool = Field(False, description="Divide the weights by their batch mean.")
    rollout_rs: Optional[str] = Field(
        None, description="Mask outliers: token_k1..k3, seq_sum_k1..k3, seq_mean_k1..k3, seq_max_k2/k3 (comma-separated)."
    )
    rollout_rs_threshold: Optional[Union[float, str]] = Field(
        None, description="Rejection bound(s): one or one per option; k1 takes 'lower_upper' ratio bounds."
    )
    bypass_mode: bool = Field(False, description="Use the rollout log-probs as the old policy (skips that pass).")
    loss_type: Literal["ppo_clip", "reinforce"] = Field("ppo_clip", description="Loss in bypass mode.")

    @property
    def enabled(self) -> bool:
        return self.bypass_mode or self.rollout_is is not None or self.rollout_rs is not None


class PFPPOConfig(Section):
    reweight_method: Literal["pow", "max_min", "max_random"] = Field(
        "pow", description="PF-PPO sampling weights from the reward: |r|^weight_pow, extremes only, or max 0.4 / rest 0.1."
    )
    weight_pow: float = Field(2.0, description="Exponent of the pow method.")


class AlgorithmConfig(Section):
    adv_estimator: str = Field(
        "grpo",
        description="gae (PPO, uses a critic), grpo, grpo_vectorized, rloo, rloo_vectorized, reinforce_plus_plus, "
        "reinforce_plus_plus_baseline, remax, opo, gpg, grpo_passk, optimal_token_baseline, "
        "tir_optimal_token_baseline.",
    )
    gamma: float = 1.0
    lam: float = 1.0
    norm_adv_by_std_in_grpo: bool = Field(True, description="False gives Dr.GRPO.")
    use_kl_in_reward: bool = Field(False, description="KL penalty subtracted from the reward (PPO style).")
    kl_penalty: str = "k1"
    kl_ctrl: KLControlConfig = Field(default_factory=KLControlConfig)
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal.")
    overlong_buffer_tokens: int = Field(0, ge=0, description="DAPO soft overlong penalty; 0 = off.")
    overlong_penalty_factor: float = 1.0
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig)
    use_pf_ppo: bool = Field(False, description="PF-PPO: resample the batch towards reliable (extreme) rewards.")
    pf_ppo: PFPPOConfig = Field(default_factory=PFPPOConfig)


class RewardModelConfig(Section):
    path: Optional[str] = Field(None, description="HF sequence-classification model; None = off.")
    weight: float = Field(1.0, description="Added to the rule reward times this weight.")
    micro_batch_sequences_per_device: int = Field(8, ge=1)
    placement: Literal["colocated", "separate"] = Field(
        "colocated", description="Share the actor's devices (a fraction of each), or get a resource pool of its own."
    )


class RewardConfig(Section):
    fn: Optional[str] = Field(None, description="User reward 'path.py:function' (data_source, response, ground_truth, extra_info) -> float|dict.")
    timeout_s: float = Field(10.0, gt=0.0, description="Per-response scoring timeout; a timeout scores 0.")
    workers: int = Field(2, ge=1, description="Reward process pool size.")
    sandbox: bool = Field(True, description="Run reward.fn in a sandbox: no network, writes only in a temp "
                          "working dir, no access to the run dir, CPU time per response <= timeout_s.")
    memory_gb: float = Field(4.0, ge=0.0, description="Address-space limit of a sandboxed reward worker; 0 = none.")
    model: RewardModelConfig = Field(default_factory=RewardModelConfig)


class SFTConfig(EngineChoice):
    max_length_tokens: int = Field(512, ge=8, description="Prompt + response, per sample.")
    batch_sequences: int = Field(8, ge=1, description="Samples per optimizer step (all devices).")
    micro_batch_sequences_per_device: int = Field(4, ge=1)
    packing: bool = Field(False, description="Pack samples into rows without cross-attention.")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="cosine"))


class TrainerConfig(Section):
    name: str = Field("run", description="Run name (also the default run_dir runs/NAME).")
    run_dir: Optional[str] = Field(None, description="Default: runs/<trainer.name>.")
    total_steps: int = Field(10, ge=1, description="RL steps (or SFT optimizer steps).")
    save_every: int = Field(0, ge=0, description="Checkpoint every k steps; 0 = only at the end.")
    val_every: int = Field(0, ge=0, description="Validate every k steps; 0 = off.")
    val_before_train: bool = True
    resume: str = Field("auto", description="auto (latest checkpoint in run_dir), never, or a checkpoint path.")
    seed: int = 1
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest k checkpoints.")
    max_nonfinite_steps: int = Field(3, ge=1, description="Stop after this many steps in a row whose update was "
                                     "skipped for a NaN/inf loss or gradient (each one is skipped and counted).")
    collective_timeout_s: float = Field(1800.0, gt=0.0, description="torch.distributed timeout: a collective a rank "
                                        "never joins fails after this long instead of hanging.")
    call_timeout_s: float = Field(3600.0, gt=0.0, description="Longest wait for a worker-group call (Ray); then the "
                                  "ranks that did not answer are named and the run stops.")
    deterministic: bool = Field(
        False, description="Fixed seeds per step for sampling and deterministic kernels: a resumed run's "
        "metrics equal an uninterrupted run's step for step (CPU; slower kernels on GPU).")


class ResourcesConfig(Section):
    nodes: int = Field(1, ge=1)
    devices_per_node: int = Field(1, ge=1, description="GPUs per node, or CPU worker processes per node.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when available.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="Ray CPUs reserved per worker.")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on GPU and on CPUs with bf16 instructions, else fp32."
    )
    device_memory_gb: Optional[float] = Field(
        None, gt=0.0,
        description="Memory of one device in GB (H100 80, H200 141, A100 80 or 40, L40S 48), used by "
        "`verl plan`; None: this host's memory on CPU, 80 on GPU.",
    )


class LoggingConfig(Section):
    backends: list[Literal["console", "jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["console", "jsonl"]
    )
    wandb_project: str = "verlcli"
    progress_bar: bool = True
    verbose: bool = Field(
        False, description="Show vLLM, Ray and worker output on the console (--verbose); else it goes to RUN_DIR/logs/.")


class Config(Section):
    """The whole run. Sections map one-to-one to dotted override prefixes."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tools: list[str] = Field(
        default_factory=list, description="Tools the model may call with rollout.multi_turn.enable: built-in "
        "names (python, calculator) or 'path.py:function' user tools; a dataset `tools` column narrows "
        "them per prompt.",
    )
    launcher: Literal["ray", "local"] = Field("ray", description="ray: worker groups of Ray actors; local: one process.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    preset: Optional[str] = Field(None, description="Set by --preset (informational).")

    @property
    def run_dir(self) -> str:
        return self.trainer.run_dir or f"runs/{self.trainer.name}"

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.devices_per_node

    @property
    def estimator_needs(self):
        """What the advantage estimator needs, as declared on its registry entry (the one
        place; the registry is a declaration, read here lazily)."""
        from verlcli.algorithms import ADV_ESTIMATORS

        return ADV_ESTIMATORS.needs(self.algorithm.adv_estimator)

    @property
    def use_critic(self) -> bool:
        return self.estimator_needs.critic

    @property
    def use_reference(self) -> bool:
        return self.actor.use_kl_loss or self.algorithm.use_kl_in_reward or self.estimator_needs.reference
