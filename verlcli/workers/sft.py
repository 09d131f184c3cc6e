"""The SFT worker: one training engine (`sft.strategy`) per rank, trained on assistant tokens.

The driver sends each step's samples as a `Batch` whose non-tensor columns `input_ids` and
`loss_mask` hold one token list per sample; `dp` dispatch gives every rank the same number
of samples. A rank cuts its share into micro-batches of `sft.micro_batch_sequences_per_device`
samples (packed into rows with a block-diagonal mask, or right-padded: verlcli.data.packing),
so every rank runs the same number of forward/backward passes — sharded engines' collectives
need that.

Loss: the mean over every loss token of the step on ALL ranks. Each micro-batch contributes
sum(CE) / global_tokens (this rank's share; the engine scales for its gradient reduction), so
the gradient is that of the exact global token mean however the batch is split or packed.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from verlcli.data.batch import Batch
from verlcli.data.packing import block_causal_mask, build_micro_batch
from verlcli.distributed import Worker, register


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over the masked positions, number of them), in fp32.

    Only the masked positions go through the fp32 log-softmax: no [rows, width, vocab]
    fp32 copy of the logits (large vocabularies make that the biggest tensor of a step).
    """
    keep = target_mask.to(logits.device) > 0
    n = int(keep.sum())
    if n == 0:
        return logits.sum() * 0.0, 0  # still part of the graph: backward stays a collective on every rank
    picked = logits[keep].float()
    return F.cross_entropy(picked, targets.to(logits.device)[keep], reduction="sum"), n


def samples_of(batch: Batch) -> list[dict]:
    return [{"input_ids": ids, "loss_mask": mask} for ids, mask in zip(batch["input_ids"], batch["loss_mask"])]


class SFTWorker(Worker):
    @register(dispatch="all")
    def setup(self, cfg: dict | None = None, total_steps: int = 0) -> dict | None:
        """Build the engine. Without `cfg` (a bare group start) nothing happens yet."""
        if cfg is None:
            return None
        from transformers import AutoTokenizer

        from verlcli.config.schema import Config
        from verlcli.engine import make_engine
        from verlcli.models.resolve import resolve_model

        self.cfg = cfg = Config.model_validate(cfg)
        path = str(resolve_model(cfg.model.path))
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.engine = make_engine(
            cfg.sft, path, kind="causal_lm", optim=cfg.sft.optim, total_optimizer_steps=total_steps,
            device=self.device_type, compute_dtype=cfg.resources.compute_dtype,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            lora=cfg.model.lora if cfg.model.lora.rank else None, seed=cfg.trainer.seed,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        trainable, total = self.engine.num_parameters()
        return {"trainable_params": trainable, "total_params": total}

    def dp_coords(self) -> tuple[int, int]:
        """(dp_rank, dp_size): tensor-parallel ranks of one engine share a batch slice."""
        engine = getattr(self, "engine", None)
        return (engine.dp_rank, engine.dp_size) if engine is not None else (self.rank, self.world_size)

    def _micro_batches(self, samples: list[dict], size: int) -> list[dict]:
        s = self.cfg.sft
        return [build_micro_batch(samples[i:i + size], self.pad_id, s.packing, s.max_length_tokens)
                for i in range(0, len(samples), size)]

    def _logits(self, mb: dict) -> torch.Tensor:
        mask = mb["attention_mask"]
        if mask is None:  # packed rows: block-diagonal causal, additive, in the compute dtype
            mask = block_causal_mask(mb["position_ids"], self.engine.compute_dtype)
        return self.engine.forward_logits(mb["input_ids"], mask, mb["position_ids"])

    @register(dispatch="dp")
    def train_step(self, batch: Batch) -> dict:
        """One optimizer step over this rank's samples; metrics are global (same on every rank)."""
        engine = self.engine
        micro = self._micro_batches(samples_of(batch), self.cfg.sft.micro_batch_sequences_per_device)
        local_tokens = sum(int(mb["target_mask"].sum()) for mb in micro)
        global_tokens = max(engine.all_reduce_sum(local_tokens), 1.0)
        loss_sum = 0.0
        for mb in micro:
            ce_sum, _ = token_loss_sum(self._logits(mb), mb["targets"], mb["target_mask"])
            engine.backward(ce_sum / global_tokens)  # this rank's share of the global mean
            loss_sum += float(ce_sum.detach())
        stats = engine.step()
        tokens = sum(mb["tokens"] for mb in micro)
        slots = sum(mb["slots"] for mb in micro)
        return {
            "train/loss": engine.all_reduce_sum(loss_sum) / global_tokens,
            "train/lr": stats["lr"],
            "train/grad_norm": stats["grad_norm"],
            "train/skipped_steps": stats.get("skipped", 0.0),
            "train/loss_tokens": global_tokens,
            # Real tokens per token slot computed: what packing buys (1.0 = no padding).
            "perf/padding_efficiency": tokens / max(slots, 1),
        }

    @register(dispatch="dp")
    def eval_loss(self, batch: Batch) -> dict:
        """This rank's {sum, count} of the token cross-entropy; the driver adds the ranks up."""
        total, count = 0.0, 0
        with self.engine.eval_mode(), torch.no_grad():  # no dropout in validation
            # No gradients or optimizer state to hold: twice the training micro-batch fits.
            for mb in self._micro_batches(samples_of(batch), 2 * self.cfg.sft.micro_batch_sequences_per_device):
                s, n = token_loss_sum(self._logits(mb), mb["targets"], mb["target_mask"])
                total, count = total + float(s), count + n
        return {"sum": total, "count": count}

    # ------------------------------------------------------------------ checkpoints
    # Under checkpoints/step_N/actor/, as RL runs write them: `verl merge-checkpoint` reads both.

    @register(dispatch="all")
    def save_checkpoint(self, step_dir: str, extra: dict) -> bool:
        self.engine.save_checkpoint(os.path.join(step_dir, "actor"), extra)
        return True

    @register(dispatch="rank0")
    def load_checkpoint(self, step_dir: str) -> dict:
        return self.engine.load_checkpoint(os.path.join(step_dir, "actor"))

