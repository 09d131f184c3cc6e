"""The SFT driver: the same run directory, metrics, progress bar, loggers, checkpoints and
resume as RL runs (verlcli.trainer.rl), around one `SFTWorker` group.

One step = one optimizer step over `sft.batch_sequences` samples (all ranks together); the run
is `trainer.total_steps` steps, crossing epochs as needed (the data order is reproducible
per epoch, and a checkpoint stores the exact data position, so a resumed run sees exactly
the samples an uninterrupted run would have seen).
"""

from __future__ import annotations

import json
from pathlib import Path

from verlcli.config.arithmetic import check_resources, sft_plan
from verlcli.config.loader import to_yaml
from verlcli.data.batch import Batch
from verlcli.io import write_json_atomic
from verlcli.trainer import run_dir as rd
from verlcli.trainer.loggers import Tracker
from verlcli.trainer.metrics import Timer, average
from verlcli.trainer.preflight import preflight
from verlcli.trainer.progress import Progress
from verlcli.trainer.setup import ensure_ray, worker_env


def run_sft(cfg) -> dict:
    """Train; returns the last step's metrics (empty if the run was already complete)."""
    plan = sft_plan(cfg)
    device = check_resources(cfg)
    checked = preflight(cfg, "sft").warn()  # before the run directory is touched and before Ray
    run = rd.prepare(cfg, to_yaml)
    tracker = Tracker(str(run), cfg.logging.backends, cfg.logging.wandb_project, cfg.trainer.name,
                      cfg.model_dump(mode="json"))
    state = None
    last: dict = {}
    try:
        state = _build(cfg, device, checked)
        total = cfg.trainer.total_steps
        tracker.console.print(
            f"sft: {len(state.train)} samples, {total} steps × {plan['sequences_per_step']} samples "
            f"= {total * plan['sequences_per_step'] / len(state.train):.2g} epochs; "
            f"{state.params['trainable_params']:,.0f} of {state.params['total_params']:,.0f} parameters trained",
            highlight=False)
        start = 0
        ckpt = rd.resume_from(cfg, run)
        if ckpt is not None:
            start = state.restore(ckpt)
            rd.truncate_metrics(run, start)  # steps after the checkpoint are trained again
            tracker.console.print(f"resumed from {ckpt} at step {start}")
        if start >= total:
            tracker.console.print(f"nothing to do: the run is at step {start} of trainer.total_steps={total}")
            return last
        if cfg.trainer.val_before_train and state.val is not None and start == 0:
            tracker.log(0, state.validate())
        progress = Progress(total, start, enabled=cfg.logging.progress_bar, label="sft", console=tracker.console)
        for step in range(start + 1, total + 1):
            last = _step(cfg, state, run, step, plan["data_parallel_size"])
            tracker.log(step, last)
            progress.advance(last)
        progress.close()
    finally:
        tracker.close()
        if state is not None:
            state.close()
    return last


def _step(cfg, state: "SFTRun", run: Path, step: int, world: int) -> dict:
    timer = Timer()
    t = cfg.trainer
    with timer("data"):
        items = state.loader.next_batch()
        batch = to_sample_batch(items)
    with timer("train"):
        metrics = average(state.group.train_step(batch))
    if t.val_every and step % t.val_every == 0 and state.val is not None:
        with timer("validate"):
            metrics.update(state.validate())
    if step == t.total_steps or (t.save_every and step % t.save_every == 0):
        with timer("checkpoint"):
            rd.save_step(run, step, lambda d: state.save(d, step), t.keep_checkpoints)
    timing = timer.metrics()
    tokens = float(sum(len(it["input_ids"]) for it in items))
    train_s = timing.get("timing/train_s", 0.0) or 1e-9
    metrics.update(timing)
    metrics.update({
        # Over the forward/backward/step time: validation and checkpoints would make it jump.
        "perf/tokens_per_s": tokens / train_s,
        "perf/tokens_per_s_per_device": tokens / train_s / world,
        "perf/total_tokens": tokens,
        "train/epoch": state.loader.epoch_progress,
    })
    metrics.update(state.group.memory())
    return metrics


def to_sample_batch(items: list[dict]) -> Batch:
    """Samples of different lengths travel as non-tensor columns (one token list per row)."""
    return Batch(non_tensors={"input_ids": [list(it["input_ids"]) for it in items],
                              "loss_mask": [list(it["loss_mask"]) for it in items]})


class SFTRun:
    """What a run holds: data, loader (its position is checkpointed), the worker group."""

    def __init__(self, cfg, train, val, loader, group, params: dict, started_ray: bool):
        self.cfg, self.train, self.val, self.loader = cfg, train, val, loader
        self.group, self.params, self.started_ray = group, params, started_ray

    def validate(self) -> dict:
        """Token-mean loss over the whole validation set (every rank gets an equal share)."""
        items = list(self.val)
        world = self.cfg.world_size
        # Pad to a multiple of the world size with loss-free copies: they cost a forward but
        # count for nothing (dispatch's own padding would repeat real samples and count them twice).
        fillers = [items[i % len(items)]["input_ids"] for i in range((-len(items)) % world)]
        pad = [{"input_ids": ids, "loss_mask": [0] * len(ids)} for ids in fillers]
        parts = self.group.eval_loss(to_sample_batch(items + pad))
        total, count = sum(p["sum"] for p in parts), sum(p["count"] for p in parts)
        return {"val/loss": total / max(count, 1), "val/loss_tokens": float(count)}

    def save(self, step_dir: Path, step: int) -> None:
        extra = {"step": step, "loader": self.loader.state_dict(), "kind": "sft"}
        self.group.save_checkpoint(str(step_dir), extra)
        write_json_atomic(step_dir / "trainer.json", extra)  # the manifest (run_dir.save_step) marks it complete

    def restore(self, step_dir: Path) -> int:
        extra = json.loads((step_dir / "trainer.json").read_text())
        self.group.load_checkpoint(str(step_dir))
        self.loader.load_state_dict(extra["loader"])
        return int(extra["step"])

    def close(self) -> None:
        try:
            self.group.shutdown()
        finally:
            if self.started_ray:
                import ray

                ray.shutdown()


def _build(cfg, device: str, checked) -> SFTRun:
    """`checked`: what preflight loaded (the model is resolved, the data tokenized)."""
    import torch

    from verlcli.data.dataset import PromptLoader
    from verlcli.distributed import make_worker_group
    from verlcli.workers.sft import SFTWorker

    torch.manual_seed(cfg.trainer.seed)
    d, s = cfg.data, cfg.sft
    train, val = checked.train, checked.val
    # The loader cycles epochs with a seeded order; its (epoch, position) goes into checkpoints.
    loader = PromptLoader(train, s.batch_sequences, seed=cfg.trainer.seed, shuffle=d.shuffle)
    env = worker_env(cfg, device)
    started_ray = ensure_ray(cfg.launcher, env, cfg.logging.verbose)
    resources = {**cfg.resources.model_dump(), "device": device}
    group = None
    try:
        group = make_worker_group(cfg.launcher, SFTWorker, name="sft", world_size=cfg.world_size,
                                  resources=resources, env=env, timeout_s=cfg.trainer.call_timeout_s)
        params = group.setup(cfg=cfg.model_dump(mode="json"), total_steps=cfg.trainer.total_steps)[0]
        group.use_worker_dp_layout()  # tensor-parallel ranks share one data-parallel slice
    except BaseException:
        if group is not None:
            group.shutdown()
        if started_ray:
            import ray

            ray.shutdown()
        raise
    return SFTRun(cfg, train, val, loader, group, params, started_ray)
