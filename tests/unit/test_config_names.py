"""Config load: verbs mean what they say over any preset, every registry name is checked
with "did you mean", what an estimator needs comes from its registry entry, one value is a
one-element list, and `verl sft` reads the SFT files prepare-data wrote."""

import pytest

from verlcli.commands.train import resolve, verb_notice
from verlcli.config.arithmetic import rl_plan
from verlcli.config.loader import load_config, preset_names, sft_data_files
from verlcli.config.schema import ActorConfig
from verlcli.errors import UserError


@pytest.mark.parametrize("preset", [None, *preset_names()])
def test_ppo_means_ppo_and_grpo_means_grpo_with_every_preset(preset):
    ppo = resolve("ppo", preset, None, [])
    assert ppo.algorithm.adv_estimator == "gae" and ppo.use_critic and verb_notice("ppo", ppo) is None
    grpo = resolve("grpo", preset, None, [])
    assert grpo.algorithm.adv_estimator == "grpo" and not grpo.use_critic and verb_notice("grpo", grpo) is None


def test_the_user_still_picks_the_estimator_and_is_told():
    cfg = resolve("ppo", "tiny-cpu", None, ["algorithm.adv_estimator=rloo"])
    assert cfg.algorithm.adv_estimator == "rloo" and not cfg.use_critic
    assert "without a critic" in verb_notice("ppo", cfg)
    assert "critic" in verb_notice("grpo", resolve("grpo", "tiny-cpu", None, ["algorithm.adv_estimator=gae"]))


def test_ppo_prints_the_critic_free_notice_on_the_console(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from verlcli.cli import app

    monkeypatch.chdir(tmp_path)  # the dry run may stop later at missing data; the note comes first
    r = CliRunner().invoke(app, ["ppo", "--preset", "tiny-cpu", "algorithm.adv_estimator=grpo", "--dry-run"])
    assert "verl ppo with algorithm.adv_estimator=grpo runs without a critic" in r.output


@pytest.mark.parametrize("override,fragment", [
    ("algorithm.adv_estimator=grpo_vectorised", "did you mean 'grpo_vectorized'"),
    ("actor.policy_loss=geomean", "did you mean 'geo_mean'"),
    ("algorithm.kl_penalty=low_var_k1", "did you mean 'low_var_kl'"),
    ("actor.kl_loss_type=k33", "did you mean 'k3'"),
    ("actor.loss_agg_mode=seq-mean-tokenmean", "did you mean 'seq-mean-token-mean'"),
    ("rollout.engine=vlm", "did you mean 'vllm'"),
    ("algorithm.rollout_correction.rollout_rs=tokn_k1", "did you mean 'token_k1'"),
    ("algorithm.rollout_correction.rollout_is=tokens", "did you mean 'token'"),
    ("algorithm.pf_ppo.reweight_method=maxmin", "did you mean 'max_min'"),
    ("reward.fn=no_such_file.py:score", "does not exist"),
])
def test_names_are_checked_at_load(override, fragment):
    with pytest.raises(UserError) as err:
        load_config(preset="tiny-cpu", overrides=[override, "algorithm.rollout_correction.rollout_rs_threshold=2"])
    assert fragment in f"{err.value} {err.value.fix}"


def test_strategy_is_checked_when_the_schema_has_it():
    if "strategy" not in ActorConfig.model_fields:
        pytest.skip("actor.strategy not in the schema yet")
    with pytest.raises(UserError) as err:
        load_config(overrides=["actor.strategy=fsdq"])
    assert "did you mean 'fsdp'" in err.value.fix


def test_estimator_needs_come_from_the_registry():
    cfg = load_config(overrides=["algorithm.adv_estimator=optimal_token_baseline"])
    assert cfg.estimator_needs.sum_pi_squared and cfg.estimator_needs.group and not cfg.use_critic
    with pytest.raises(UserError, match="rollout.n=1"):
        rl_plan(load_config(overrides=["algorithm.adv_estimator=rloo_vectorized", "rollout.n=1"]))
    with pytest.raises(UserError, match="bypass_mode"):
        load_config(overrides=["algorithm.adv_estimator=optimal_token_baseline",
                               "algorithm.rollout_correction.bypass_mode=true"])


def test_one_value_where_a_list_is_expected():
    cfg = load_config(overrides=["data.train_files=/d/gsm8k/train.parquet", "data.val_files=/d/test.parquet",
                                 "rollout.stop=STOP", "logging.backends=jsonl", "model.lora.target_modules=q_proj"])
    assert cfg.data.train_files == ["/d/gsm8k/train.parquet"] and cfg.data.val_files == ["/d/test.parquet"]
    assert cfg.rollout.stop == ["STOP"] and cfg.logging.backends == ["jsonl"]
    assert cfg.model.lora.target_modules == ["q_proj"]


def test_sft_reads_the_sft_twins_unless_the_user_sets_files():
    assert sft_data_files(["data/x/train.parquet", "test.parquet", "mine.parquet"]) == [
        "data/x/sft_train.parquet", "sft_test.parquet", "mine.parquet"]
    cfg = resolve("sft", "tiny-cpu", None, [])
    assert cfg.data.train_files == ["data/arithmetic/sft_train.parquet"]
    assert cfg.data.val_files == ["data/arithmetic/sft_test.parquet"]
    assert resolve("sft", None, None, []).data.train_files == ["data/arithmetic/sft_train.parquet"]
    mine = resolve("sft", "tiny-cpu", None, ["data.train_files=data/arithmetic/train.parquet"])
    assert mine.data.train_files == ["data/arithmetic/train.parquet"]  # the user's choice stands


def test_sft_after_prepare_data_reads_the_sft_files(tmp_path, monkeypatch):
    from _tok import tiny_tokenizer
    from data_prep import prepare
    from verlcli.data.sft_dataset import load_sft_dataset

    monkeypatch.chdir(tmp_path)
    prepare("arithmetic")
    cfg = resolve("sft", "tiny-cpu", None, [])
    rows = load_sft_dataset(cfg.data.train_files, tiny_tokenizer(), cfg.sft.max_length_tokens,
                            cfg.data.messages_key, cfg.data.prompt_key, cfg.data.response_key)
    assert len(rows) > 100 and any(rows[0]["loss_mask"])


def test_verl_knobs_are_keys_with_verls_defaults():
    cfg = load_config(overrides=["actor.policy_loss=cispo", "actor.clip_ratio_low=10"])  # CISPO: no lower bound
    from verlcli.workers.losses import policy_loss_config

    pl = policy_loss_config(cfg)
    assert pl.clip_ratio_low == 10 and pl.ppo_kl_coef == 0.1 and pl.kl_cov_ratio == 0.0002
    assert (pl.clip_cov_ratio, pl.clip_cov_lb, pl.clip_cov_ub) == (0.0002, 1.0, 5.0)
    assert (pl.tau_pos, pl.tau_neg) == (1.0, 1.05) and pl.loss_scale_factor == cfg.data.max_response_tokens


def test_name_checks_import_no_torch():
    """The catalog is torch-free: `--dry-run` name checks and `verl plan` stay fast."""
    import subprocess
    import sys

    code = ("import sys; from verlcli.config.loader import load_config; "
            "c = load_config(overrides=['algorithm.adv_estimator=optimal_token_baseline']); "
            "assert c.estimator_needs.sum_pi_squared; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
