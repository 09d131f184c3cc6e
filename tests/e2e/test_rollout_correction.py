"""verl-parity settings end to end (local launcher, HF engine, tiny model): rollout
correction's IS weights reach the actor's loss and their statistics are logged every step;
bypass mode; the optimal token baseline (Σπ² from the old-policy forward) with PF-PPO."""

import json

import pytest

from e2e_helpers import REPO, ok, verl

# The toy reward (response length up to the first space) varies within a group, so the
# advantages are non-zero.
TOY = REPO / "tests" / "e2e" / "toy_reward.py"
BASE = ["--preset", "tiny-cpu", f"reward.fn={TOY}:score", "rollout.stop=[' ']", "launcher=local", "resources.devices_per_node=1", "rollout.engine=hf",
        "trainer.total_steps=1", "trainer.val_every=0", "trainer.val_before_train=false",
        "trainer.save_every=0", "logging.progress_bar=false", "trainer.seed=3"]


def last_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def test_rollout_correction_changes_the_loss_and_logs_its_weights(workdir):
    plain, corrected = workdir / "runs" / "rc-off", workdir / "runs" / "rc-on"
    ok(verl("grpo", *BASE, f"trainer.run_dir={plain}", cwd=workdir))
    # fp32 HF rollout vs fp32 trainer: π_train/π_rollout ≈ 1, so a cap of 0.5 makes every
    # weight 0.5 — the loss halves if the rollouts are the same, and changes in any case.
    ok(verl("grpo", *BASE, f"trainer.run_dir={corrected}", "algorithm.rollout_correction.rollout_is=token",
            "algorithm.rollout_correction.rollout_is_threshold=0.5", cwd=workdir))
    off, on = last_metrics(plain), last_metrics(corrected)
    assert "rollout_corr/rollout_is_mean" not in off
    for key in ("rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_max", "rollout_corr/rollout_is_eff_sample_size",
                "rollout_corr/kl", "rollout_corr/chi2_token"):
        assert key in on, key
    assert on["rollout_corr/rollout_is_mean"] == pytest.approx(0.5, abs=1e-3)
    assert on["actor/pg_loss"] != off["actor/pg_loss"]
    if on["response/length_mean"] == off["response/length_mean"] and on["score/mean"] == off["score/mean"]:
        assert on["actor/pg_loss"] == pytest.approx(0.5 * off["actor/pg_loss"], rel=1e-2, abs=1e-5)


def test_bypass_mode_reinforce_runs_and_logs(workdir):
    run = workdir / "runs" / "rc-bypass"
    ok(verl("grpo", *BASE, f"trainer.run_dir={run}", "algorithm.rollout_correction.bypass_mode=true",
            "algorithm.rollout_correction.loss_type=reinforce", "algorithm.rollout_correction.rollout_is=sequence",
            "algorithm.rollout_correction.rollout_rs=token_k1", "algorithm.rollout_correction.rollout_rs_threshold=5",
            cwd=workdir))
    m = last_metrics(run)
    assert "timing/old_log_prob_s" not in m  # the rollout's log-probs served as the old policy
    # computed in the actor's loss from the current policy (verl's bypass), every step
    assert m["rollout_corr/rollout_rs_masked_fraction"] == 0.0  # bounds [1/5, 5] keep every token
    assert 0.5 < m["rollout_corr/rollout_is_mean"] < 2.0
    assert m["rollout_corr/kl"] == pytest.approx(m["actor/ppo_kl"])  # REINFORCE's kl is to the rollout


def test_optimal_token_baseline_with_pf_ppo(workdir):
    run = workdir / "runs" / "otb"
    ok(verl("grpo", *BASE, f"trainer.run_dir={run}", "algorithm.adv_estimator=optimal_token_baseline",
            "algorithm.use_pf_ppo=true", cwd=workdir))
    m = last_metrics(run)
    assert "timing/old_log_prob_s" in m  # Σπ² comes from that pass
    assert m["advantage/abs_max"] > 0 and 0 < m["pf_ppo/unique_fraction"] <= 1
