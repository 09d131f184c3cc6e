"""`--from-verl`: the overrides of five of verl's published example scripts, written out
here (shell variables substituted), translate to keys this suite loads."""

from verlcli.commands.train import resolve
from verlcli.config.verl_compat import read_overrides, translate

COMMON = """
    data.train_files=/data/gsm8k/train.parquet data.val_files=/data/gsm8k/test.parquet
    data.filter_overlong_prompts=True data.truncation='error'
    actor_rollout_ref.model.use_remove_padding=True actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.fsdp_config.param_offload=False actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
    actor_rollout_ref.rollout.name=vllm actor_rollout_ref.ref.fsdp_config.param_offload=True
    trainer.critic_warmup=0 trainer.logger='["console","wandb"]' trainer.nnodes=1
"""
# examples/grpo_trainer/run_qwen2-7b.sh
GRPO = COMMON + """
    algorithm.adv_estimator=grpo data.train_batch_size=1024 data.max_prompt_length=512 data.max_response_length=1024
    actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=256 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=40
    actor_rollout_ref.actor.use_kl_loss=True actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=low_var_kl actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40 actor_rollout_ref.rollout.tensor_model_parallel_size=2
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 actor_rollout_ref.rollout.n=5
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=40 algorithm.use_kl_in_reward=False
    trainer.project_name='verl_grpo_example_gsm8k' trainer.experiment_name='qwen2_7b_function_rm'
    trainer.n_gpus_per_node=8 trainer.save_freq=20 trainer.test_freq=5 trainer.total_epochs=15
"""
# examples/ppo_trainer/run_deepseek7b_llm.sh
PPO = COMMON + """
    algorithm.adv_estimator=gae data.train_batch_size=1024 data.max_prompt_length=512 data.max_response_length=512
    actor_rollout_ref.model.path=deepseek-ai/deepseek-llm-7b-chat actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=256 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16
    actor_rollout_ref.actor.use_kl_loss=False actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32
    actor_rollout_ref.rollout.tensor_model_parallel_size=4 actor_rollout_ref.rollout.gpu_memory_utilization=0.4
    critic.optim.lr=1e-5 critic.model.use_remove_padding=True critic.model.path=deepseek-ai/deepseek-llm-7b-chat
    critic.model.enable_gradient_checkpointing=True critic.ppo_micro_batch_size_per_gpu=32
    critic.model.fsdp_config.param_offload=False critic.model.fsdp_config.optimizer_offload=False
    algorithm.use_kl_in_reward=False trainer.n_gpus_per_node=8 trainer.save_freq=20 trainer.test_freq=1
    trainer.use_legacy_worker_impl=auto trainer.total_epochs=15
"""
# tests/special_e2e/run_dapo.sh (the recipe's minimal DAPO run), as a script with variables
DAPO = """
set -xeuo pipefail
clip_ratio_high=0.28
n_resp_per_prompt=4
python3 -m recipe.dapo.main_dapo \\
    data.train_files="/data/gsm8k/train.parquet" data.val_files="/data/gsm8k/test.parquet" \\
    reward_model.reward_manager=dapo algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False \\
    algorithm.kl_ctrl.kl_coef=0.0 actor_rollout_ref.actor.use_kl_loss=False actor_rollout_ref.actor.kl_loss_coef=0.0 \\
    actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=${clip_ratio_high} \\
    data.max_prompt_length=1024 data.max_response_length=2048 \\
    reward_model.overlong_buffer.enable=True reward_model.overlong_buffer.len=128 \\
    reward_model.overlong_buffer.penalty_factor=1.0 actor_rollout_ref.actor.loss_agg_mode=token-mean \\
    data.train_batch_size=64 data.gen_batch_size=256 algorithm.filter_groups.enable=True \\
    algorithm.filter_groups.metric=seq_reward algorithm.filter_groups.max_num_gen_batches=10 \\
    actor_rollout_ref.model.path="Qwen/Qwen2.5-0.5B-Instruct" actor_rollout_ref.actor.optim.lr=1e-6 \\
    actor_rollout_ref.model.use_fused_kernels=True actor_rollout_ref.rollout.n=${n_resp_per_prompt} \\
    actor_rollout_ref.actor.ppo_mini_batch_size=32 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \\
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 actor_rollout_ref.rollout.name=vllm \\
    trainer.logger=console trainer.n_gpus_per_node=8 trainer.save_freq=-1 trainer.resume_mode=disable \\
    trainer.val_before_train=False trainer.total_training_steps=1 $@
"""
# examples/rloo_trainer/run_qwen2-7b.sh
RLOO = COMMON + """
    algorithm.adv_estimator=rloo data.train_batch_size=1024 data.max_prompt_length=512 data.max_response_length=1024
    actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=256 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=80
    actor_rollout_ref.actor.use_kl_loss=False actor_rollout_ref.rollout.n=5 actor_rollout_ref.rollout.tensor_model_parallel_size=2
    algorithm.use_kl_in_reward=True algorithm.kl_penalty=kl algorithm.kl_ctrl.kl_coef=0.001
    trainer.n_gpus_per_node=8 trainer.save_freq=-1 trainer.test_freq=5 trainer.total_epochs=15
"""
# examples/reinforce_plus_plus_trainer/run_qwen2-7b_math_rf.sh
RFPP = COMMON.replace("data.train_files=/data/gsm8k/train.parquet data.val_files=/data/gsm8k/test.parquet", "") + """
    algorithm.adv_estimator=reinforce_plus_plus
    data.train_files="['/data/gsm8k/train.parquet', '/data/math/train.parquet']"
    data.val_files="['/data/gsm8k/test.parquet', '/data/math/test.parquet']"
    data.train_batch_size=1024 data.max_prompt_length=1024 data.max_response_length=1024
    actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct actor_rollout_ref.actor.optim.lr=3e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=1024 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16
    actor_rollout_ref.actor.use_kl_loss=False actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=mse actor_rollout_ref.rollout.n=8 algorithm.use_kl_in_reward=True
    trainer.n_gpus_per_node=16 trainer.save_freq=-1 trainer.test_freq=5 trainer.total_epochs=15
"""


def load(verb, script):
    t = translate(read_overrides(script))
    return t, resolve(verb, None, None, t.overrides)


def test_grpo_script():
    t, cfg = load("grpo", GRPO)
    assert cfg.data.train_prompts_per_step == 1024 and cfg.actor.mini_batch_prompts == 256
    assert cfg.actor.micro_batch_sequences_per_device == 40 and cfg.rollout.n == 5
    assert cfg.actor.use_kl_loss and cfg.actor.kl_loss_type == "low_var_kl" and cfg.rollout.tensor_parallel_size == 2
    assert cfg.data.train_files == ["/data/gsm8k/train.parquet"] and cfg.model.gradient_checkpointing
    assert cfg.trainer.save_every == 20 and cfg.trainer.val_every == 5 and cfg.resources.devices_per_node == 8
    assert cfg.logging.backends == ["console", "wandb"] and cfg.trainer.name == "qwen2_7b_function_rm"
    assert t.unmapped == ["trainer.total_epochs=15"]
    assert {k for k, _ in t.ignored} >= {"trainer.critic_warmup", "data.filter_overlong_prompts"}
    assert cfg.model.remove_padding is True  # use_remove_padding=True: packed forwards


def test_ppo_script_keeps_its_critic():
    t, cfg = load("ppo", PPO)
    assert cfg.use_critic and cfg.critic.optim.lr == 1e-5 and cfg.critic.micro_batch_sequences_per_device == 32
    assert cfg.critic.model_path == "deepseek-ai/deepseek-llm-7b-chat" and not cfg.critic.offload_params
    assert cfg.trainer.val_every == 1 and t.unmapped == ["trainer.total_epochs=15"]


def test_dapo_script_with_shell_variables():
    t, cfg = load("grpo", DAPO)
    assert cfg.actor.clip_ratio_high == 0.28 and cfg.rollout.n == 4
    assert cfg.algorithm.overlong_buffer_tokens == 128 and cfg.algorithm.overlong_penalty_factor == 1.0
    assert cfg.algorithm.dynamic_sampling and cfg.trainer.total_steps == 1 and cfg.trainer.resume == "never"
    assert cfg.trainer.save_every == 0 and cfg.logging.backends == ["console"]
    assert sorted(t.unmapped) == ["algorithm.filter_groups.max_num_gen_batches=10",
                                  "algorithm.filter_groups.metric=seq_reward", "data.gen_batch_size=256"]
    assert "reward_model.reward_manager" in {k for k, _ in t.ignored}


def test_rloo_script():
    t, cfg = load("grpo", RLOO)
    assert cfg.algorithm.adv_estimator == "rloo" and cfg.algorithm.use_kl_in_reward
    assert cfg.algorithm.kl_penalty == "kl" and cfg.algorithm.kl_ctrl.kl_coef == 0.001 and cfg.use_reference
    assert cfg.trainer.save_every == 0 and t.unmapped == ["trainer.total_epochs=15"]


def test_reinforce_plus_plus_script():
    t, cfg = load("grpo", RFPP)
    assert cfg.algorithm.adv_estimator == "reinforce_plus_plus" and cfg.actor.kl_loss_type == "mse"
    assert cfg.data.train_files == ["/data/gsm8k/train.parquet", "/data/math/train.parquet"]
    assert cfg.actor.optim.lr == 3e-6 and cfg.actor.mini_batch_prompts == 1024


def test_engines_and_loggers_we_lack_are_named():
    t = translate(["actor_rollout_ref.rollout.name=sglang", "trainer.logger=['console','swanlab']", "foo.bar=1"])
    assert t.overrides == ["logging.backends=[console]"]
    assert any("sglang" in u for u in t.unmapped) and any("swanlab" in u for u in t.unmapped)
    assert "foo.bar=1" in t.unmapped


def test_the_command_prints_the_translation(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from verlcli.cli import app

    monkeypatch.chdir(tmp_path)
    script = tmp_path / "run_rloo.sh"
    script.write_text(RLOO)
    r = CliRunner().invoke(app, ["grpo", "--from-verl", str(script), "--dry-run", "rollout.n=6"])
    assert "translated: verl grpo " in r.output and " algorithm.adv_estimator=rloo " in r.output
    assert "not mapped: trainer.total_epochs=15" in r.output
    # KEY=VALUE arguments win over the translation: n=6 no longer splits over verl's micro-batch
    assert "rollout.n=6" in str(r.exception) and "micro_batch_sequences_per_device" in str(r.exception)
