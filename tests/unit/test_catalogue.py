"""The catalogue of bad inputs (README: "When things go wrong"). Each case runs the real
`verl` entry point in this process (`verlcli.cli.main`, so imports are paid once) and checks
the exit code, the one error message (naming the thing, then `fix:`), no traceback, and that
nothing that existed before was changed or removed. Most cases are `--dry-run`; the run
directory cases are real runs, which must stop before they write anything."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _data import arith_parquet
from verlcli import cli
from verlcli.trainer import run_dir as rd

TINY = ["--preset", "tiny-cpu"]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def model_dir():
    from verlcli.models.resolve import resolve_model

    return resolve_model("tiny-qwen2")


@pytest.fixture()
def work(tmp_path, monkeypatch, model_dir):
    """A working directory laid out like after `verl prepare-data arithmetic` (small).

    Guard: a case meant to fail must never go on to start Ray and train, so building the
    workers (what comes right after preflight) fails the test instead."""
    def no_training(*args, **kwargs):
        raise AssertionError("preflight passed: this case would have started training")

    monkeypatch.setattr("verlcli.trainer.rl.build", no_training)
    monkeypatch.setattr("verlcli.trainer.sft._build", no_training)
    data = tmp_path / "data" / "arithmetic"
    data.mkdir(parents=True)
    arith_parquet(data / "train.parquet", 8)
    arith_parquet(data / "test.parquet", 4)
    rows = [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), data / "sft_train.parquet")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_verl(capsys, *args) -> tuple[int, str]:
    """`verl ARGS` through the real entry point; (exit code, stdout + stderr)."""
    saved = sys.argv
    sys.argv = ["verl", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    out = capsys.readouterr()
    return code, out.out + out.err


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def expect_error(capsys, work: Path, args, *needles: str) -> str:
    """Exit 2, one `error:` message + `fix:` that mention every needle, nothing touched."""
    before = snapshot(work)
    code, text = run_verl(capsys, *args)
    assert code == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    err = text[text.index("error: "):]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[1].strip().startswith("fix: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    after = snapshot(work)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing file changed or went away"
    assert not (work / "runs").exists() or set(after) == set(before), f"new files: {set(after) - set(before)}"
    return err


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def table(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def reward_file(work: Path, body: str) -> Path:
    path = work / "my_reward.py"
    path.write_text(body)
    return path


def model_copy(work: Path, model_dir: Path, name="model") -> Path:
    import shutil

    dst = work / name
    shutil.copytree(model_dir, dst)
    return dst


def fake_checkpoint(run: Path, model_dir: Path, step=1, *, kind=None, world_size=2, hidden=None, critic=False,
                    strategy=None):
    """What a checkpoint looks like to preflight: trainer.json, actor/meta.json, actor/hf/config.json."""
    def write(d: Path) -> None:
        (d / "actor" / "hf").mkdir(parents=True)
        config = json.loads((model_dir / "config.json").read_text())
        if hidden:
            config["hidden_size"] = hidden
        (d / "actor" / "hf" / "config.json").write_text(json.dumps(config))
        meta = {"world_size": world_size, "base_model_path": "elsewhere", **({"strategy": strategy} if strategy else {})}
        (d / "actor" / "meta.json").write_text(json.dumps(meta))
        if critic:
            (d / "critic").mkdir()
        (d / "trainer.json").write_text(json.dumps({"step": step, **({"kind": kind} if kind else {})}))

    if hasattr(rd, "save_step"):  # checkpoints with a manifest (written last, then renamed)
        rd.save_step(run, step, write, keep=5)
    else:
        d = run / "checkpoints" / f"step_{step}"
        d.mkdir(parents=True)
        write(d)


# ---------------------------------------------------------------- data files

DATA = "data.train_files=[{}]"


def test_missing_data_file(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format("data/nope.parquet")],
                 "data/nope.parquet", "does not exist", "verl prepare-data")


def test_corrupt_data_file(capsys, work):
    bad = write_bytes(work / "bad.parquet", b"PAR1 this is not parquet")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format(bad)], str(bad), "not a readable parquet")


def test_empty_data_file_zero_bytes(capsys, work):
    bad = write_bytes(work / "empty.parquet", b"")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format(bad)], str(bad), "not a readable parquet")


def test_data_file_with_no_rows(capsys, work):
    src = pq.read_table(work / "data/arithmetic/train.parquet")
    empty = work / "norows.parquet"
    pq.write_table(src.slice(0, 0), empty)
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format(empty)], "no rows", str(empty))


def test_missing_prompt_column(capsys, work):
    bad = table(work / "noprompt.parquet", [{"data_source": "arithmetic", "question": "1+1?"}])
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format(bad)], "no column 'prompt'", "data.prompt_key")


def test_missing_data_source_column(capsys, work):
    bad = table(work / "nods.parquet", [{"prompt": [{"role": "user", "content": "1+1?"}]}])
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format(bad)], "no column 'data_source'")


def test_prompt_column_of_wrong_type(capsys, work):
    bad = table(work / "intprompt.parquet", [{"data_source": "arithmetic", "prompt": 7}])
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format(bad)], "row 0", "column 'prompt' holds int")


def test_data_source_of_wrong_type(capsys, work):
    bad = table(work / "intds.parquet", [{"data_source": 3, "prompt": "1+1?"}])
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format(bad)], "row 0", "data_source is 3")


def test_unknown_data_source_has_no_reward(capsys, work):
    bad = table(work / "ds.parquet", [{"data_source": "my_task", "prompt": "1+1?"}])
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", DATA.format(bad)], "'my_task'", "reward.fn=")


def test_over_long_prompt_is_an_error_naming_the_row(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "data.max_prompt_tokens=8"],
                 "row 0", "data.max_prompt_tokens=8", "data.truncation=filter")


def test_over_long_prompts_filtered_with_a_count(capsys, work):
    long = [{"data_source": "arithmetic", "prompt": [{"role": "user", "content": "What is 1 + 2? " * 40}],
             "reward_model": {"style": "rule", "ground_truth": "3"}}]
    short = pq.read_table(work / "data/arithmetic/train.parquet").to_pylist()
    mixed = table(work / "mixed.parquet", short + long * 3)
    code, text = run_verl(capsys, "grpo", *TINY, "--dry-run", DATA.format(mixed), "data.truncation=filter")
    assert code == 0, text[-2000:]
    assert "dropped 3 of 11 prompts over data.max_prompt_tokens=128" in text


def test_every_prompt_too_long(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "data.max_prompt_tokens=4", "data.truncation=filter"],
                 "every one of the 8 prompts", "data.max_prompt_tokens")


def test_sft_data_without_messages_or_prompt_response(capsys, work):
    bad = table(work / "sft.parquet", [{"text": "hello"}])
    expect_error(capsys, work, ["sft", *TINY, "--dry-run", DATA.format(bad)], "neither 'messages'", "`prompt` + `response`")


def test_sft_response_of_wrong_type(capsys, work):
    bad = table(work / "sft.parquet", [{"prompt": "1+1?", "response": 2}])
    expect_error(capsys, work, ["sft", *TINY, "--dry-run", DATA.format(bad)], "'response' is int", "string")


# ---------------------------------------------------------------- model


def test_missing_model_path(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "model.path=./no/such/model"], "./no/such/model", "does not exist")


def test_model_dir_without_config(capsys, work, model_dir):
    m = model_copy(work, model_dir)
    (m / "config.json").unlink()
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"model.path={m}"], "has no config.json")


def test_corrupt_model_config(capsys, work, model_dir):
    m = model_copy(work, model_dir)
    (m / "config.json").write_text('{"model_type": "qwen2", "hidden_')
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"model.path={m}"], "cannot load the model config", "config.json")


def test_model_path_is_a_file(capsys, work):
    f = write_bytes(work / "weights.safetensors", b"x")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"model.path={f}"], "is a file")


def test_unknown_model_name(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "model.path=tiny-qwen3"], "'tiny-qwen3'", "built-in")


def test_tokenizer_without_chat_template(capsys, work, model_dir):
    m = model_copy(work, model_dir)
    cfg_file = m / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text())
    tc.pop("chat_template", None)
    cfg_file.write_text(json.dumps(tc))
    for extra in m.glob("chat_template.*"):
        extra.unlink()
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"model.path={m}"], "no chat template", "chat_template")


# ---------------------------------------------------------------- config


def test_unknown_preset(capsys, work):
    expect_error(capsys, work, ["grpo", "--preset", "tiny-cpuu", "--dry-run"], "unknown preset 'tiny-cpuu'", "did you mean 'tiny-cpu'")


def test_unknown_key(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "rollout.temprature=0.5"], "rollout.temprature", "did you mean 'rollout.temperature'")


def test_value_of_wrong_type(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "rollout.n=many"], "rollout.n", "valid value")


def test_override_without_equals(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "rollout.n"], "rollout.n", "KEY=VALUE")


def test_missing_config_file(capsys, work):
    expect_error(capsys, work, ["grpo", "--config", "nope.yaml", "--dry-run"], "nope.yaml", "check the path")


def test_config_file_not_yaml(capsys, work):
    bad = work / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    expect_error(capsys, work, ["grpo", "--config", str(bad), "--dry-run"], "not valid YAML", "YAML syntax")


@pytest.mark.parametrize("key", ["algorithm.adv_estimator", "actor.policy_loss", "actor.kl_loss_type"])
def test_unknown_registry_name(capsys, work, key):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"{key}=nope"], key, "'nope'")


def test_batch_not_divisible_by_mini_batch(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "data.train_prompts_per_step=3"],
                 "data.train_prompts_per_step=3", "actor.mini_batch_prompts")


def test_micro_batch_not_dividing(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "actor.micro_batch_sequences_per_device=3"],
                 "actor.micro_batch_sequences_per_device=3", "divisor")


def test_grpo_with_one_sample_per_prompt(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "rollout.n=1"], "rollout.n=1", "rollout.n=2")


def test_local_launcher_with_two_workers(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "launcher=local"], "launcher=local", "devices_per_node=1")


# ---------------------------------------------------------------- reward function


def test_reward_file_missing(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "reward.fn=no_reward.py:score"], "no_reward.py", "does not exist")


def test_reward_function_missing(capsys, work):
    f = reward_file(work, "def other(a, b, c, d):\n    return 1.0\n")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"reward.fn={f}:score"], "no function 'score'", "other")


def test_reward_file_that_does_not_import(capsys, work):
    f = reward_file(work, "def score(a, b, c, d)\n    return 1.0\n")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"reward.fn={f}:score"], "SyntaxError", f"python {f}")


def test_reward_function_with_wrong_signature(capsys, work):
    f = reward_file(work, "def score(response):\n    return 1.0\n")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"reward.fn={f}:score"], "(response)",
                 "fn(data_source, response, ground_truth, extra_info)")


def test_reward_returning_non_numbers(capsys, work):
    f = reward_file(work, "def score(ds, response, gt, extra):\n    return 'correct'\n")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"reward.fn={f}:score"], "returned str", "return a float")


def test_reward_returning_nan(capsys, work):
    f = reward_file(work, "def score(ds, response, gt, extra):\n    return float('nan')\n")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"reward.fn={f}:score"], "non-finite", "return a float")


# ---------------------------------------------------------------- run directory and resume


def test_run_dir_is_a_file(capsys, work):
    f = write_bytes(work / "runfile", b"keep me")
    expect_error(capsys, work, ["grpo", *TINY, f"trainer.run_dir={f}"], str(f), "is a file")


def test_unwritable_run_dir(capsys, work):
    if os.geteuid() == 0:  # root writes through permission bits; a read-only tree stops it
        target = "/sys/verl-run"
    else:
        locked = work / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = str(locked / "run")
    expect_error(capsys, work, ["grpo", *TINY, f"trainer.run_dir={target}"], target, "not writable")


def _old_run(work: Path, model: str = "some-other-model") -> Path:
    run = work / "runs" / "tiny-cpu"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  path: {model}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "score/mean": 0.5}\n')
    return run


def test_run_dir_holding_another_runs_config(capsys, work):
    _old_run(work)
    expect_error(capsys, work, ["grpo", *TINY], "runs/tiny-cpu holds another run", "some-other-model",
                 "new trainer.name")


def test_run_dir_of_another_run_for_sft(capsys, work):
    _old_run(work)
    expect_error(capsys, work, ["sft", *TINY, "data.train_files=[data/arithmetic/sft_train.parquet]"],
                 "holds another run", "trainer.resume=")


def test_resume_never_would_overwrite_checkpoints(capsys, work, model_dir):
    run = work / "runs" / "tiny-cpu"
    fake_checkpoint(run, model_dir)
    expect_error(capsys, work, ["grpo", *TINY, "trainer.resume=never"], "trainer.resume=never", "checkpoints",
                 "new trainer.name")


def test_checkpoint_from_another_model(capsys, work, model_dir):
    fake_checkpoint(work / "runs" / "tiny-cpu", model_dir, hidden=64)
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run"], "another model", "hidden_size 64 vs 128", "model.path")


def test_checkpoint_from_another_world_size(capsys, work, model_dir):
    fake_checkpoint(work / "runs" / "tiny-cpu", model_dir, world_size=1)
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run"], "saved by 1 workers", "this run has 2", "trainer.resume=")


def test_checkpoint_of_another_training_engine(capsys, work, model_dir):
    fake_checkpoint(work / "runs" / "tiny-cpu", model_dir, strategy="deepspeed")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run"], "actor.strategy=deepspeed", "this run has fsdp",
                 "set actor.strategy=deepspeed")


def test_zero_checkpoint_from_another_world_size(capsys, work, model_dir):
    fake_checkpoint(work / "runs" / "tiny-cpu", model_dir, strategy="deepspeed", world_size=1)
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "actor.strategy=deepspeed"], "ZeRO checkpoint of 1 workers",
                 "run with 1 workers")


def test_sft_checkpoint_resumed_by_grpo(capsys, work, model_dir):
    fake_checkpoint(work / "runs" / "tiny-cpu", model_dir, kind="sft")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run"], "`verl sft`", "verl merge-checkpoint")


def test_grpo_checkpoint_resumed_by_ppo_has_no_critic(capsys, work, model_dir):
    fake_checkpoint(work / "runs" / "tiny-cpu", model_dir)
    expect_error(capsys, work, ["ppo", *TINY, "--dry-run"], "has no critic", "new trainer.name")


def test_resume_from_a_path_that_is_not_a_checkpoint(capsys, work):
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", "trainer.resume=runs/nowhere"], "trainer.resume=runs/nowhere",
                 "checkpoints/step_N")


def test_good_dry_run_reports_checks_and_writes_nothing(capsys, work):
    before = snapshot(work)
    code, text = run_verl(capsys, "grpo", *TINY, "--dry-run")
    assert code == 0, text[-2000:]
    for needle in ("ok: run directory", "ok: model.path=tiny-qwen2", "ok: data (train): 8 prompts", "ok: rewards"):
        assert needle in text, needle
    assert snapshot(work) == before and not (work / "runs").exists()


def test_model_needing_remote_code_is_refused_and_its_code_never_runs(capsys, work, model_dir):
    m = model_copy(work, model_dir)
    config = json.loads((m / "config.json").read_text())
    config.update(model_type="verl_custom_test", auto_map={"AutoConfig": "custom_config.CustomConfig"})
    (m / "config.json").write_text(json.dumps(config))
    (m / "custom_config.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').write_text('x')\n"
        "from transformers import PretrainedConfig\n\nclass CustomConfig(PretrainedConfig):\n"
        "    model_type = 'verl_custom_test'\n")
    expect_error(capsys, work, ["grpo", *TINY, "--dry-run", f"model.path={m}"], "needs its own Python code",
                 "model.trust_remote_code=true")
    assert not (m / "CODE_RAN").exists()
