"""The single controller: one loop for PPO and GRPO (critic on or off by the estimator).

Reads top to bottom like single-process code; each `group.method(batch)` call is split
across the data-parallel workers and gathered back (verlcli.distributed).
"""

from __future__ import annotations

from verlcli.config.arithmetic import check_resources, check_rollout_tp, model_config_json, rl_plan
from verlcli.config.loader import to_yaml
from verlcli.distributed.dispatch import balance_metrics, with_blocks
from verlcli.trainer import run_dir as rd
from verlcli.trainer.guards import NonFiniteGuard
from verlcli.trainer.loggers import Tracker
from verlcli.trainer.metrics import Timer, average, count_params, data_metrics, throughput
from verlcli.trainer.preflight import preflight
from verlcli.trainer.progress import Progress
from verlcli.trainer.setup import build, teardown
from verlcli.trainer.steps import compute_advantages, score, to_prompt_batch, validate


def check_model_tp(cfg) -> None:
    if cfg.rollout.tensor_parallel_size > 1:
        from verlcli.models.resolve import resolve_model

        check_rollout_tp(cfg, model_config_json(str(resolve_model(cfg.model.path))))


def mini_batches(cfg, batch, pc):
    """The batch marked as its optimizer steps' contiguous mini-batches: the `dp` split balances
    each one's tokens over the ranks on its own (verlcli/distributed/balance.py)."""
    return with_blocks(batch, cfg.data.train_prompts_per_step // pc.mini_batch_prompts)


def run_rl(cfg) -> dict:
    plan = rl_plan(cfg)
    device = check_resources(cfg)
    check_model_tp(cfg)  # the heads, now that the model is on disk (rl_plan may not have seen it)
    checked = preflight(cfg, "rl").warn()  # before the run directory is touched and before Ray
    run = rd.prepare(cfg, to_yaml)
    w = build(cfg, device, run, checked)  # data (from preflight), worker groups, reward scorer, KL controller
    tracker = Tracker(str(run), cfg.logging.backends, cfg.logging.wandb_project, cfg.trainer.name, cfg.model_dump(mode="json"))
    start, last = 0, {}
    # One optimizer step per RL step and nothing else needs them: skip the old-log-prob pass.
    # (Bypass mode skips it too: the rollout's log-probs are the old policy.)
    rc = cfg.algorithm.rollout_correction
    on_policy = (plan.optimizer_steps_per_step == 1 and not cfg.algorithm.use_kl_in_reward
                 and not cfg.estimator_needs.old_log_probs and not rc.enabled)
    n_params = count_params(w.model_path) if device == "cuda" else 0
    try:
        ckpt = rd.resume_from(cfg, run)
        if ckpt is not None:
            start = w.restore(ckpt)
            rd.truncate_metrics(run, start)  # steps after the checkpoint are trained again
            tracker.console.print(f"resumed from {ckpt} at step {start}")
        tracker.log(start, w.actor.sync_weights()[0])  # rollout starts from the actor's weights
        if cfg.trainer.val_before_train and w.val_data is not None and start == 0:
            tracker.log(0, validate(cfg, w))
        progress = Progress(cfg.trainer.total_steps, start, enabled=cfg.logging.progress_bar, console=tracker.console)
        guard = NonFiniteGuard(cfg)
        for step in range(start + 1, cfg.trainer.total_steps + 1):
            timer = Timer()
            batch = to_prompt_batch(cfg, w.loader.next_batch(), w.tokenizer, repeat=cfg.rollout.n, validation=False, step=step)
            with timer("gen"):
                batch = w.actor.generate(batch)
            with timer("reward"):
                batch, reward_metrics = score(cfg, w, batch)
            batch, filter_metrics = w.filter_groups(batch)  # DAPO dynamic sampling (off by default)
            if batch is None:  # every group had equal rewards: nothing to learn from this step
                tracker.log(step, {**reward_metrics, **filter_metrics})
                progress.advance()
                continue
            if rc.bypass_mode:
                batch["old_log_probs"] = batch["rollout_log_probs"]
            elif not on_policy:  # else the update's own forward pass gives the old log-probs
                with timer("old_log_prob"):
                    batch = batch.union(w.actor.compute_log_probs(batch))
            if cfg.use_reference:
                with timer("ref_log_prob"):
                    batch = batch.union(w.actor.compute_ref_log_probs(batch))
            if cfg.use_critic:
                with timer("values"):
                    batch = batch.union(w.critic.compute_values(batch))
            with timer("adv"):
                batch, adv_metrics = compute_advantages(cfg, w, batch)
            metrics = {}
            if cfg.use_critic:
                with timer("update_critic"):
                    metrics.update(average(w.critic.update_critic(mini_batches(cfg, batch, cfg.critic))))
            update = mini_batches(cfg, batch, cfg.actor)  # each optimizer step balanced over the ranks
            metrics.update(balance_metrics(update, w.actor.world_size // w.actor.dp_group_size))
            with timer("update_actor"):
                metrics.update(average(w.actor.update_actor(update)))
            with timer("sync_weights"):
                metrics.update(w.actor.sync_weights()[0])
            if cfg.trainer.val_every and step % cfg.trainer.val_every == 0 and w.val_data is not None:
                with timer("validate"):
                    metrics.update(validate(cfg, w))
            if step == cfg.trainer.total_steps or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                with timer("checkpoint"):  # into step_N.tmp, manifest last, then renamed
                    rd.save_step(run, step, lambda d: w.save(d, step), cfg.trainer.keep_checkpoints)
            timing = timer.metrics()
            metrics.update(data_metrics(batch, cfg.data.max_response_tokens))
            metrics.update({**reward_metrics, **filter_metrics, **adv_metrics, **timing})
            metrics.update(throughput(batch, timing, plan.data_parallel_size, n_params, device))
            metrics.update(w.actor.memory())
            metrics.update(guard.update(step, metrics))  # NaN/inf: the engines skipped the update
            tracker.log(step, metrics)
            progress.advance(metrics)
            last = metrics
            guard.stop_if_diverged(step)
        progress.close()
    finally:
        tracker.close()
        teardown(w)
    return last
