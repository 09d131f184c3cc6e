"""The real `verl` entry point in a subprocess: --help everywhere, dry-run, exit codes."""

import subprocess
import sys

import pytest

COMMANDS = ["prepare-data", "sft", "ppo", "grpo", "eval", "merge-checkpoint", "presets", "doctor", "report"]


def verl(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "verlcli.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_commands():
    r = verl("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_help_has_an_example(cmd):
    r = verl(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "verl " in r.stdout  # a worked example


def test_grpo_dry_run_7b_preset_shows_arithmetic():
    # The plan prints first; then preflight stops on the data this checkout lacks.
    r = verl("grpo", "--preset", "qwen2.5-7b-8xH100", "--dry-run")
    assert r.returncode == 2 and "data/gsm8k/train.parquet does not exist" in r.stderr, r.stderr
    assert "Qwen/Qwen2.5-7B-Instruct" in r.stdout
    assert "responses per step" in r.stdout and "5120" in r.stdout


def test_bad_override_exits_2_with_one_clear_message():
    r = verl("grpo", "--preset", "tiny-cpu", "--dry-run", "actor.optim.lrr=1")
    assert r.returncode == 2
    assert "did you mean 'actor.optim.lr'" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_preset_exits_2():
    r = verl("ppo", "--preset", "nope", "--dry-run")
    assert r.returncode == 2 and "unknown preset" in r.stderr


def test_presets_lists_models_and_hardware():
    r = verl("presets")
    assert r.returncode == 0 and "tiny-cpu" in r.stdout and "cuda" in r.stdout
