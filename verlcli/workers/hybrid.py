"""The hybrid-engine worker: actor + rollout + reference (+ critic) in one process per device.

One instance runs on every data-parallel rank. The driver calls the `@register`-ed methods
on the worker group; `dp` methods get this rank's slice of the batch and return rows for it.
Roles decide what the process holds: the default colocated group has all of them; a
`critic.placement=separate` run starts a second group with only `critic`.
"""

from __future__ import annotations

import os

import torch

from verlcli.config.arithmetic import forward_token_budget
from verlcli.data.batch import Batch
from verlcli.distributed import Worker, register
from verlcli.workers import malloc, seq
from verlcli.workers.losses import actor_micro_loss, critic_micro_loss, log_probs_and_sum_pi_squared, mean_metrics
from verlcli.workers.micro import token_micro_batches


def _packs(engine) -> bool:
    """Whether the engine's log-prob/value forwards run packed rows (padding removal): then a
    micro-batch costs its real tokens, else rows × its longest row (workers/micro.py)."""
    return getattr(engine, "pack_mode", None) is not None


class HybridWorker(Worker):
    def setup(self, cfg: dict, roles: list[str], total_steps: int):
        from verlcli.config.schema import Config
        from verlcli.engine import make_engine
        from verlcli.models.resolve import resolve_model
        from transformers import AutoTokenizer

        self.cfg = cfg = Config.model_validate(cfg)
        if cfg.trainer.deterministic:  # deterministic kernels where torch has them (warn elsewhere)
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.roles = set(roles)
        path = str(resolve_model(cfg.model.path))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        common = dict(device=self.device_type, compute_dtype=cfg.resources.compute_dtype,
                      gradient_checkpointing=cfg.model.gradient_checkpointing, seed=cfg.trainer.seed,
                      trust_remote_code=cfg.model.trust_remote_code, remove_padding=cfg.model.remove_padding)
        def optimizer_steps(pc):  # over the whole run, for the lr schedule
            return total_steps * (cfg.data.train_prompts_per_step // pc.mini_batch_prompts) * pc.epochs

        self.actor = self.ref = self.critic = self.rollout = None
        # vLLM frees memory while the trainer runs (sleep/wake): on GPU its weights and KV
        # cache; on CPU the KV cache's pages and, before an update, its packed weights.
        self.sleeps = cfg.rollout.free_cache_engine
        # ... and the trainer frees it while vLLM generates (only when asked: it costs copies).
        self.offload_trainer = self.device_type == "cuda" and (
            cfg.rollout.offload_trainer or cfg.actor.offload_params or cfg.actor.offload_optimizer)
        self.mode = "trainer"
        if "actor" in roles:
            self.actor = make_engine(cfg.actor, path, kind="causal_lm", optim=cfg.actor.optim, total_optimizer_steps=optimizer_steps(cfg.actor),
                                    lora=cfg.model.lora if cfg.model.lora.rank else None,
                                    offload_params=cfg.actor.offload_params,
                                    offload_optimizer=cfg.actor.offload_optimizer, **common)
        if "ref" in roles:
            self.ref = make_engine(cfg.actor, path, kind="causal_lm", optim=None, total_optimizer_steps=0,
                                  offload_params=cfg.actor.offload_params, **common)
        if "critic" in roles:
            cpath = str(resolve_model(cfg.critic.model_path or cfg.model.path))
            self.critic = make_engine(cfg.critic, cpath, kind="value", optim=cfg.critic.optim, total_optimizer_steps=optimizer_steps(cfg.critic),
                                     offload_params=cfg.critic.offload_params,
                                     offload_optimizer=cfg.critic.offload_optimizer, **common)
        if "rollout" in roles:
            self._make_rollout(path)
        self.dp_coords()  # engines that disagree on the batch split fail here, at set-up
        return True

    def dp_coords(self) -> tuple[int, int]:
        """(dp_rank, dp_size) of this process's training engines: every `dp` call's chunk."""
        from verlcli.errors import UserError

        coords = {(e.dp_rank, e.dp_size) for e in (self.actor, self.ref, self.critic) if e is not None}
        if len(coords) > 1:
            raise UserError("the actor and the colocated critic split the batch differently "
                            f"(data-parallel rank/size {sorted(coords)})",
                            fix="give both the same strategy and tensor_parallel_size, or set "
                                "critic.placement=separate")
        return coords.pop() if coords else (self.rank, self.world_size)

    # ------------------------------------------------------------------ rollout
    def _make_rollout(self, path: str):
        from verlcli.engine.fsdp import resolve_compute_dtype
        from verlcli.rollout import make_rollout

        r, d = self.cfg.rollout, self.cfg.data
        dtype = r.dtype
        if dtype == "auto":
            dtype = "bfloat16" if resolve_compute_dtype(self.device_type, self.cfg.resources.compute_dtype) == torch.bfloat16 else "float32"
        self.rollout_dtype = getattr(torch, dtype)
        tp = r.tensor_parallel_size
        kv = self._cpu_kv_cache(path)
        self.rollout = make_rollout(
            r.engine, path, device=self.device_type, dtype=dtype,
            max_model_len=d.max_prompt_tokens + d.max_response_tokens + 8,
            # The TP ranks of one engine sample in lockstep: same seed, same prompts.
            seed=self.cfg.trainer.seed + self.rank // tp, gpu_memory_utilization=r.gpu_memory_utilization,
            cpu_kvcache_gb=kv.gib, enable_sleep=self.sleeps, tensor_parallel_size=tp,
            trust_remote_code=self.cfg.model.trust_remote_code,
        )
        if self.sleeps:
            self.rollout.sleep()

    def _cpu_kv_cache(self, path: str):
        """The CPU vLLM KV cache: resident for the whole run, so sized from the job unless
        rollout.cpu_kvcache_gb says (verlcli.config.kv_cache)."""
        from verlcli.config.kv_cache import cpu_kv_cache
        from verlcli.models.shape import load_shape

        kv = cpu_kv_cache(self.cfg, load_shape(path), self.rollout_dtype.itemsize)
        if self.cfg.rollout.engine == "vllm" and self.device_type == "cpu" and self.rank == 0:
            print(f"vLLM KV cache: {kv.describe()}", flush=True)
        return kv

    # ------------------------------------------------------------------ memory modes
    # GPU order (verl's hybrid engine, slime): update → sync buckets → offload trainer → wake
    # rollout → generate → sleep rollout → load trainer. Every trainer-side method enters
    # trainer mode first, generate enters rollout mode; on CPU both are no-ops.
    def _trainer_engines(self):
        return [e for e in (self.actor, self.ref, self.critic) if e is not None]

    def _rollout_mode(self) -> None:
        if self.rollout.weights_dropped:  # an update without a sync after it (not in run_rl)
            self._stream_weights()
        if self.mode == "rollout":
            return
        if self.offload_trainer:
            for engine in self._trainer_engines():
                engine.offload_to_cpu()
        if self.sleeps:
            self.rollout.wake()
        self.mode = "rollout"

    def _trainer_mode(self) -> None:
        if self.mode == "trainer":
            return
        if self.sleeps:
            self.rollout.sleep()
        if self.offload_trainer:
            for engine in self._trainer_engines():
                engine.load_to_device()
        self.mode = "trainer"

    @register(dispatch="all")
    def sync_weights(self) -> dict:
        """Actor weights → rollout engine in memory, streamed: each bucket of at most
        rollout.sync_bucket_mb is gathered from the shards, cast to the rollout dtype and
        loaded before the next one is gathered (no rank holds the whole model)."""
        self._trainer_mode()  # the shards must be on the device to be gathered
        stats = self._stream_weights()
        self._rollout_mode()
        return {f"sync/{k.removeprefix('sync_')}": v for k, v in stats.items()}

    def _stream_weights(self) -> dict:
        if self.sleeps:
            self.rollout.wake(tags=["weights"])  # the KV cache stays freed while we stream
        buckets = self.actor.weight_buckets(self.cfg.rollout.sync_bucket_mb << 20, self.rollout_dtype)
        stats = self.rollout.sync_weight_buckets(buckets)
        malloc.trim("sync")  # the reload's per-layer copies: freed, but kept by glibc (workers/malloc.py)
        return stats

    @register(dispatch="replica")
    def generate(self, batch: Batch) -> Batch:
        """One response per row (the driver repeats prompts n times). Sampling from batch.meta."""
        from verlcli.rollout.base import SamplingSpec

        m = batch.meta
        spec = SamplingSpec(n=1, temperature=m["temperature"], top_p=m["top_p"], top_k=m["top_k"],
                            max_tokens=self.cfg.data.max_response_tokens, stop=list(self.cfg.rollout.stop),
                            ignore_eos=bool(m.get("ignore_eos", False)))
        prompts = [list(p) for p in batch["prompt_ids"]]
        if "rng_seed" in m:  # trainer.deterministic: this step's stream, whatever ran before
            # TP ranks of one engine sample in lockstep: one seed per engine, as at creation.
            tp = self.cfg.rollout.tensor_parallel_size
            self.rollout.reseed(int(m["rng_seed"]) + 1_000_003 * (self.rank // tp))
        self._rollout_mode()
        if self.cfg.rollout.multi_turn.enable:  # tool-calling trajectories (workers/agent.py)
            from verlcli.workers.agent import agent_generate, make_agent_loop

            if getattr(self, "agent_loop", None) is None:
                self.agent_loop = make_agent_loop(self.cfg, self.rollout, self.tokenizer)
            out = agent_generate(self.agent_loop, batch, prompts, spec, self.pad_id, self.cfg)
            self._trainer_mode()
            return batch.union(out)
        outs = self.rollout.generate(prompts, spec)
        malloc.trim("generate")
        self._trainer_mode()
        rows = seq.build_rows(prompts, [o.response_ids for o in outs], [o.logprobs for o in outs], self.pad_id,
                              self.cfg.data.max_prompt_tokens, self.cfg.data.max_response_tokens)
        out = Batch(rows, {"finish_reason": [o.finish_reason for o in outs]})
        return batch.union(out)

    # ------------------------------------------------------------------ forward passes
    def _forward_rows(self, batch: Batch, fn, pc, packed: bool) -> list[torch.Tensor]:
        """Run fn(inputs, r_keep) -> tuple of [b, r_keep] tensors over micro-batches; return
        each output as a fixed-width [B, R] tensor, rows in the batch's order. Micro-batches:
        the role's no-grad token budget (`pc`, workers/micro.py; `packed`: how the forward
        pays), else twice its sequence count (no grads: bigger micro-batches)."""
        R = batch["responses"].shape[1]
        self._trainer_mode()
        budget = forward_token_budget(pc)
        if budget:
            groups = token_micro_batches(batch["attention_mask"], R, budget, packed)
        else:
            size = pc.micro_batch_sequences_per_device * 2
            groups = [list(range(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]
        outs = []
        with torch.no_grad():
            for rows in groups:
                inputs, r_keep = seq.trim(batch.index(rows))
                outs.append([seq.pad_right(o.float().cpu(), R) for o in fn(inputs, r_keep)])
        back = torch.argsort(torch.tensor([i for rows in groups for i in rows]))  # to the batch's order
        malloc.trim("forward")
        return [torch.cat(col)[back] for col in zip(*outs)]

    @register(dispatch="dp")
    def compute_log_probs(self, batch: Batch) -> Batch:
        """Old log-probs, and the policy entropy (measured here, without grad, so the update
        only pays for entropy when it is a loss term)."""
        t = batch.meta.get("temperature", 1.0)
        if self.cfg.estimator_needs.sum_pi_squared:  # optimal token baseline: Σπ² too
            # Full logits of padded rows (never packed): budgeted as padded.
            lp, entropy, s2 = self._forward_rows(
                batch, lambda x, r: log_probs_and_sum_pi_squared(self.actor, x, r, t), self.cfg.actor, packed=False)
            return Batch({"old_log_probs": lp, "entropy": entropy, "sum_pi_squared": s2})
        lp, entropy = self._forward_rows(batch, lambda x, r: self.actor.log_probs(
            **x, response_len=r, temperature=t, with_entropy=True), self.cfg.actor, _packs(self.actor))
        return Batch({"old_log_probs": lp, "entropy": entropy})

    @register(dispatch="dp")
    def compute_ref_log_probs(self, batch: Batch) -> Batch:
        t = batch.meta.get("temperature", 1.0)
        [lp] = self._forward_rows(batch, lambda x, r: self.ref.log_probs(**x, response_len=r, temperature=t)[:1],
                                  self.cfg.actor, _packs(self.ref))
        return Batch({"ref_log_probs": lp})

    @register(dispatch="dp")
    def compute_values(self, batch: Batch) -> Batch:
        [values] = self._forward_rows(batch, lambda x, r: (self.critic.values(**x, response_len=r),),
                                      self.cfg.critic, _packs(self.critic))
        return Batch({"values": values})

    # ------------------------------------------------------------------ updates
    def _mini_batches(self, batch: Batch, mini_batch_prompts: int):
        per_rank = len(batch) * mini_batch_prompts // self.cfg.data.train_prompts_per_step
        return batch.chunks_of(max(per_rank, 1))

    def _update(self, engine, batch: Batch, pc, micro_loss) -> dict:
        """Epochs × mini-batches × micro-batches; one optimizer step per mini-batch."""
        self._trainer_mode()
        metrics = []
        for _ in range(pc.epochs):
            for mini in self._mini_batches(batch, pc.mini_batch_prompts):
                # Similar lengths in a micro-batch = little padding. Reordering rows inside a
                # mini-batch does not change its gradient: the loss is normalized by global counts.
                mini = mini.index(torch.argsort(mini["attention_mask"].sum(-1), stable=True))
                mask = mini["response_mask"]
                g_tokens = int(engine.all_reduce_sum(float(mask.sum())))
                g_seqs = int(engine.all_reduce_sum(float((mask.sum(-1) > 0).sum())))
                if pc.micro_batch_tokens_per_device:  # filled up to a token budget (workers/micro.py)
                    micros = [mini.index(rows) for rows in token_micro_batches(
                        mini["attention_mask"], mask.shape[1], pc.micro_batch_tokens_per_device, _packs(engine))]
                else:
                    micros = mini.chunks_of(pc.micro_batch_sequences_per_device)
                for micro in micros:
                    loss, m = micro_loss(engine, micro, self.cfg, g_tokens, g_seqs)
                    engine.backward(loss)  # this rank's share of the global mean
                    # 'sum:' metrics are this rank's share of the global mean; × dp size so the
                    # driver's average over ranks gives the global value.
                    metrics.append({k: v * engine.dp_size if k.startswith("sum:") else v for k, v in m.items()})
                metrics.append(engine.step())
        malloc.trim("update")  # activations, logits and grads of every size: back to the OS
        return mean_metrics(metrics)

    @register(dispatch="dp")
    def update_actor(self, batch: Batch) -> dict:
        if self.rollout is not None and self.sleeps:
            # The rollout's weights are stale once the actor steps: free them before the
            # update's peak, not after it (CPU; the sync brings new ones).
            self.rollout.drop_weights()
        out = self._update(self.actor, batch, self.cfg.actor, actor_micro_loss)
        return {k if "/" in k else f"actor/{k}": v for k, v in out.items()}

    @register(dispatch="dp")
    def update_critic(self, batch: Batch) -> dict:
        return {f"critic/{k}": v for k, v in self._update(self.critic, batch, self.cfg.critic, critic_micro_loss).items()}

    # ------------------------------------------------------------------ checkpoints
    @register(dispatch="all")
    def save_checkpoint(self, step_dir: str, extra: dict) -> bool:
        self._trainer_mode()
        for role, engine in (("actor", self.actor), ("critic", self.critic)):
            if engine is not None:
                engine.save_checkpoint(os.path.join(step_dir, role), extra)
        return True

    @register(dispatch="rank0")
    def load_checkpoint(self, step_dir: str) -> dict:
        self._trainer_mode()
        extra = {}
        for role, engine in (("actor", self.actor), ("critic", self.critic)):
            if engine is not None:
                extra = engine.load_checkpoint(os.path.join(step_dir, role))
        return extra

    def memory(self) -> dict:
        """Worker.memory + this process's RSS at the end of each phase and what trimming the
        allocator released there (workers/malloc.py)."""
        return {**super().memory(), **malloc.last}

    def shutdown(self):
        # vLLM's shutdown tears down the default process group: it goes last.
        if self.rollout is not None:
            self.rollout.shutdown()
