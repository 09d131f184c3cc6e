"""Every shipped preset validates; overrides, typos and batch arithmetic fail with the fix."""

import pytest

from verlcli.config.arithmetic import check_resources, rl_plan, sft_plan
from verlcli.config.loader import load_config, parse_override, preset_names
from verlcli.errors import UserError

EXPECTED_PRESETS = {"qwen2.5-0.5b-1xH100", "qwen2.5-7b-8xH100", "qwen2.5-32b-4x8xH100",
                    "llama3.1-8b-8xH100", "smollm2-135m-cpu", "smollm2-135m-tools", "tiny-cpu"}


def test_expected_presets_ship():
    assert EXPECTED_PRESETS <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_every_preset_validates(name, estimator):
    cfg = load_config(preset=name, overrides=[f"algorithm.adv_estimator={estimator}"])
    plan = rl_plan(cfg)
    assert plan.responses_per_step == plan.prompts_per_step * cfg.rollout.n
    assert plan.grad_accum_steps >= 1
    sft_plan(cfg)


def test_7b_preset_arithmetic():
    plan = rl_plan(load_config(preset="qwen2.5-7b-8xH100"))
    # 1024 prompts × n=5; mini-batch 256 prompts → 1280 sequences / 8 GPUs = 160 per GPU,
    # 160 / 16 per micro-batch = 10 accumulation steps; 1024/256 = 4 optimizer steps.
    assert (plan.responses_per_step, plan.optimizer_steps_per_step, plan.sequences_per_device_per_mini_batch,
            plan.grad_accum_steps) == (5120, 4, 160, 10)


def test_override_types_and_lists():
    cfg = load_config(preset="tiny-cpu", overrides=["actor.optim.lr=3e-5", "data.train_files=[a.parquet,b.parquet]",
                                                     "rollout.stop=['###']", "reward.fn=none"])
    assert cfg.actor.optim.lr == 3e-5 and cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.rollout.stop == ["###"] and cfg.reward.fn is None


def test_unknown_key_suggests_nearest():
    with pytest.raises(UserError) as e:
        load_config(overrides=["rollout.temprature=0.7"])
    assert "rollout.temprature" in str(e.value) and "rollout.temperature" in str(e.value)


def test_unknown_section_and_value_as_section():
    with pytest.raises(UserError, match="unknown config key 'actr.lr'"):
        load_config(overrides=["actr.lr=1"])
    with pytest.raises(UserError, match="is a value, not a section"):
        load_config(overrides=["rollout.n.x=1"])


def test_bad_value_names_key():
    with pytest.raises(UserError, match="'rollout.n'"):
        load_config(overrides=["rollout.n=lots"])
    with pytest.raises(UserError, match="'rollout.engine'"):
        load_config(overrides=["rollout.engine=sglang"])


def test_override_without_equals():
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("rollout.n")


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="did you mean 'tiny-cpu'"):
        load_config(preset="tiny-cpux")
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor:\n  optim: {lr: 1e-5\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(config_file=str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("actor:\n  mini_batch_prompt: 4\n")
    with pytest.raises(UserError, match="actor.mini_batch_prompts"):
        load_config(config_file=str(typo))


def test_batch_sizes_that_do_not_divide_name_the_fix():
    with pytest.raises(UserError) as e:
        rl_plan(load_config(preset="tiny-cpu", overrides=["data.train_prompts_per_step=6", "actor.mini_batch_prompts=4"]))
    assert "actor.mini_batch_prompts" in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(UserError, match="micro_batch_sequences_per_device"):
        rl_plan(load_config(preset="tiny-cpu", overrides=["actor.micro_batch_sequences_per_device=3"]))
    with pytest.raises(UserError, match="rollout.n=2 or more"):
        rl_plan(load_config(preset="tiny-cpu", overrides=["rollout.n=1"]))


def test_resources_that_cannot_exist():
    cfg = load_config(preset="tiny-cpu", overrides=["resources.devices_per_node=8"])
    with pytest.raises(UserError, match="cores"):
        check_resources(cfg, cuda_available=False, cpu_count=2)
    with pytest.raises(UserError, match="no CUDA device"):
        check_resources(load_config(preset="qwen2.5-7b-8xH100"), cuda_available=False)
    with pytest.raises(UserError, match="launcher=local"):
        check_resources(load_config(preset="tiny-cpu", overrides=["launcher=local"]), cuda_available=False)
    ok = load_config(preset="tiny-cpu", overrides=["launcher=local", "resources.devices_per_node=1"])
    assert check_resources(ok, cuda_available=False, cpu_count=2) == "cpu"
