"""The driver-side pieces of an RL step: prompts → Batch, scoring, advantages, validation."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from verlcli.algorithms import (
    ADV_ESTIMATORS,
    apply_kl_penalty,
    needs_baseline,
    overlong_reward_penalty,
    pf_ppo_resample,
    rollout_correction,
)
from verlcli.data.batch import Batch
from verlcli.trainer.metrics import agent_metrics


def to_prompt_batch(cfg, items: list[dict], tokenizer, repeat: int, validation: bool, step: int = 0) -> Batch:
    """Rows of prompts, each repeated `repeat` times (a a b b), with sampling settings in meta."""
    s = cfg.rollout.val if validation else cfg.rollout
    batch = Batch(
        non_tensors={
            "prompt_ids": [it["input_ids"] for it in items],
            "data_source": [it["data_source"] for it in items],
            "ground_truth": [it["ground_truth"] for it in items],
            "extra_info": [it.get("extra_info") or {} for it in items],
            "uid": [f"{'val' if validation else step}-{i}" for i in range(len(items))],
        },
        # No per-request seed: identical prompts with one seed would get identical samples,
        # and a GRPO group would have nothing to compare. Engines seed their own stream.
        meta={"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
              "ignore_eos": cfg.rollout.ignore_eos and not validation},
    )
    if cfg.trainer.deterministic:  # engines restart their stream from this (+ rank) each call
        batch.meta["rng_seed"] = cfg.trainer.seed * 1_000_003 + (-1 if validation else step)
    if cfg.rollout.multi_turn.enable:  # the agent loop renders the conversation from the messages
        batch["prompt_messages"] = [it.get("messages") for it in items]
    if any(it.get("tools") is not None for it in items):  # the dataset's per-prompt tools column
        batch["tools"] = [it.get("tools") for it in items]
    return batch.repeat(repeat, interleave=True)


def decode_responses(tokenizer, batch: Batch) -> list[str]:
    """The text the reward scores: the model's LAST turn (its final answer). A single-turn
    response is one turn. Multi-turn: earlier turns and the tool results are context, and a
    number the calculator printed must not count as the model's answer."""
    out = []
    for ids, mask in zip(batch["responses"], batch["response_mask"]):
        start, end = last_model_turn(mask)
        out.append(tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True))
    return out


def last_model_turn(mask: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the last run of 1s in a row's loss mask (the model's last turn)."""
    on = mask.nonzero()
    if len(on) == 0:
        return 0, 0
    end = int(on[-1]) + 1
    off = (mask[:end] == 0).nonzero()
    return (int(off[-1]) + 1 if len(off) else 0), end


def _rule_scores(cfg, w, batch: Batch, texts: list[str]) -> tuple[torch.Tensor, dict]:
    items = [{"data_source": ds, "response": t, "ground_truth": gt, "extra_info": ei}
             for ds, t, gt, ei in zip(batch["data_source"], texts, batch["ground_truth"], batch["extra_info"])]
    results = w.scorer.score(items)
    scores = torch.tensor([float(r["score"]) for r in results], dtype=torch.float32)
    errors = [r for r in results if r.get("error")]
    metrics = {"reward/errors": float(len(errors))}
    if errors:
        w.warn_once(f"reward: {len(errors)} of {len(results)} responses failed to score (scored 0): {errors[0]['error']}")
    if "acc" in results[0]:
        metrics["reward/acc"] = float(np.mean([float(r.get("acc", 0.0)) for r in results]))
    return scores, metrics


def score(cfg, w, batch: Batch) -> tuple[Batch, dict]:
    """Rule reward (+ reward model) per response, placed on its last valid token."""
    texts = decode_responses(w.tokenizer, batch)
    scores, metrics = _rule_scores(cfg, w, batch, texts)
    if w.reward_model is not None:
        rm = w.reward_model.compute_rm_scores(batch.union(Batch(non_tensors={"response_text": texts})))["rm_scores"]
        metrics["reward/model_mean"] = float(rm.mean())
        scores = scores + cfg.reward.model.weight * rm
    # The whole trajectory counts against the budget; the reward goes on the model's last
    # token (in a multi-turn response, inserted tool output may follow nothing the model wrote).
    P = batch["prompts"].shape[1]
    lengths = batch["attention_mask"][:, P:].sum(-1)
    if cfg.algorithm.overlong_buffer_tokens:
        pen = overlong_reward_penalty(lengths, cfg.data.max_response_tokens, cfg.algorithm.overlong_buffer_tokens,
                                      cfg.algorithm.overlong_penalty_factor)
        metrics["reward/overlong_penalty_mean"] = float(pen.mean())
        scores = scores + pen
    tls = torch.zeros_like(batch["response_mask"], dtype=torch.float32)
    last = torch.tensor([last_model_turn(m)[1] - 1 for m in batch["response_mask"]]).clamp(min=0)
    tls[torch.arange(len(batch)), last] = scores
    batch["scores"] = scores
    batch["token_level_scores"] = tls
    batch["response_text"] = texts
    if needs_baseline(cfg.algorithm.adv_estimator):
        batch["reward_baselines"] = _greedy_baselines(cfg, w, batch)
    return batch, metrics


def _greedy_baselines(cfg, w, batch: Batch) -> torch.Tensor:
    """ReMax: the reward of a greedy response to the same prompt is the baseline."""
    first = {}
    for i, uid in enumerate(batch["uid"]):
        first.setdefault(uid, i)
    keep = [k for k in ("prompt_ids", "data_source", "ground_truth", "extra_info", "uid", "prompt_messages", "tools")
            if k in batch]
    prompts = batch.index(list(first.values())).select(keep)
    prompts.meta = {**batch.meta, "temperature": 0.0, "top_p": 1.0, "top_k": -1}
    greedy = w.actor.generate(prompts)
    g_scores, _ = _rule_scores(cfg, w, greedy, decode_responses(w.tokenizer, greedy))
    by_uid = dict(zip(greedy["uid"], g_scores.tolist()))
    return torch.tensor([by_uid[u] for u in batch["uid"]], dtype=torch.float32)


def compute_advantages(cfg, w, batch: Batch) -> tuple[Batch, dict]:
    a = cfg.algorithm
    metrics = {}
    rewards = batch["token_level_scores"]
    if a.use_kl_in_reward:
        rewards, kl_m = apply_kl_penalty(rewards, batch["old_log_probs"], batch["ref_log_probs"],
                                         batch["response_mask"], w.kl_ctrl, a.kl_penalty)
        metrics.update({f"actor/{k}": v for k, v in kl_m.items()})
    rc = a.rollout_correction
    if rc.enabled and not rc.bypass_mode:  # bypass: the actor's loss corrects, from π_θ
        weights, mask, rc_metrics = rollout_correction(
            batch["old_log_probs"], batch["rollout_log_probs"], batch["response_mask"], rc.rollout_is,
            rc.rollout_is_threshold, rc.rollout_is_batch_normalize, rc.rollout_rs, rc.rollout_rs_threshold)
        batch["response_mask"] = mask  # rejected tokens leave the loss
        if weights is not None:
            batch["rollout_is_weights"] = weights
        metrics.update(rc_metrics)
    fn = ADV_ESTIMATORS.get(a.adv_estimator, "algorithm.adv_estimator")
    optional = {k: batch[k] for k in ("values", "reward_baselines", "old_log_probs", "sum_pi_squared",
                                      "rollout_is_weights") if k in batch}
    adv, ret = fn(rewards, batch["response_mask"], index=list(batch["uid"]), gamma=a.gamma, lam=a.lam,
                  norm_adv_by_std=a.norm_adv_by_std_in_grpo, **optional)
    batch["token_level_rewards"] = rewards
    batch["advantages"] = adv
    batch["returns"] = ret
    if a.use_pf_ppo:
        idx = pf_ppo_resample(batch["token_level_scores"].sum(-1), a.pf_ppo.reweight_method, a.pf_ppo.weight_pow)
        batch = batch.index(idx)
        metrics["pf_ppo/unique_fraction"] = float(idx.unique().numel() / max(len(idx), 1))
    return batch, metrics


def validate(cfg, w) -> dict:
    """Held-out prompts, `rollout.val` sampling; mean@n per data source."""
    n = cfg.rollout.val.n
    batch = to_prompt_batch(cfg, w.val_data, w.tokenizer, repeat=n, validation=True)
    batch = w.actor.generate(batch)
    scores, m = _rule_scores(cfg, w, batch, decode_responses(w.tokenizer, batch))
    out = {"val/score/mean": float(scores.mean()), "val/reward_errors": m["reward/errors"],
           "val/response_length_mean": float(batch["response_mask"].float().sum(-1).mean())}
    out.update(agent_metrics(batch, prefix="val/agent/"))  # multi-turn only
    by_ds = defaultdict(list)
    for ds, s in zip(batch["data_source"], scores.tolist()):
        by_ds[ds].append(s)
    for ds, vals in by_ds.items():
        out[f"val/score/{ds}/mean@{n}"] = float(np.mean(vals))
    return out
