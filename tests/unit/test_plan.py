"""`verl plan`: model sizes from config.json, each memory term against hand-computed bytes, every
shipped preset fits its named hardware, and the estimate against measured peak RSS here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verlcli.config.loader import load_config, preset_names
from verlcli.config.plan import (
    GiB,
    PHASES_RL,
    activation_bytes,
    kv_bytes_per_token,
    layer_activation_bytes,
    logits_bytes,
    memory_plan,
    phase_bytes,
    state_bytes,
)
from verlcli.config.kv_cache import auto_kv_cache_bytes, cpu_kv_cache, engine_rows
from verlcli.config.plan_fixes import fixes, with_overrides
from verlcli.errors import UserError
from verlcli.models.shape import load_shape, shape_from_config, shipped_config

REPO = Path(__file__).resolve().parents[2]
TINY = shape_from_config("tiny", shipped_config("verlcli--tiny-qwen2"))


def _cfg(preset: str, *overrides: str):
    return load_config(preset=preset, overrides=list(overrides))


def _term(plan, role: str, name_start: str):
    [t] = [t for t in plan.terms if t.role == role and t.name.startswith(name_start)]
    return t


# ---------------------------------------------------------------- model sizes


@pytest.mark.parametrize("name,params", [
    ("tiny-qwen2", 985_216),                                   # counted by hand below
    ("smollm2-135m-instruct", 134_515_008),                    # = the built model's numel
    ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),               # published: 0.49B
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),               # published: 7.61B
    ("Qwen/Qwen2.5-32B-Instruct", 32_763_876_352),             # published: 32.8B (HF counter)
    ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),       # published: 8.03B
])
def test_parameter_counts_from_shipped_configs(name, params):
    assert load_shape(name).params == params


def test_tiny_parameter_count_by_hand():
    # embedding 3072·128 (tied); per layer: q,o 128·128 each, k,v 128·64 each, qkv bias
    # 128+64+64, SwiGLU 3·128·256, two norms 2·128; 4 layers; final norm 128.
    layer = 2 * 128 * 128 + 2 * 128 * 64 + 256 + 3 * 128 * 256 + 2 * 128
    assert TINY.layer_params() == layer == 147_968
    assert TINY.params == 3072 * 128 + 4 * layer + 128


def test_local_directory_config_and_moe(tmp_path):
    c = dict(shipped_config("verlcli--tiny-qwen2"), num_local_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=64)
    (tmp_path / "config.json").write_text(json.dumps(c))
    s = load_shape(str(tmp_path))
    # 8 experts of 3·128·64 + a router 128·8 replace the dense MLP; 2 experts are active.
    assert s.layer_params() == TINY.layer_params() - 3 * 128 * 256 + 8 * 3 * 128 * 64 + 128 * 8
    assert s.active_params < s.params


def test_unknown_hub_id_offline_names_the_fix(monkeypatch, tmp_path):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read at import time: without this, an earlier import makes the hub retry ~23 s offline
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_shape("someone/not-a-shipped-model")
    assert "hf download someone/not-a-shipped-model" in e.value.fix


# ---------------------------------------------------------------- terms by hand


def test_state_terms_by_hand():
    n = TINY.params
    assert state_bytes("fsdp", 3, n, n, 2, gpu=True) == [
        ("params (fp32 shard)", 4 * n / 2), ("grads (fp32 shard)", 4 * n / 2),
        ("AdamW state (fp32 shard)", 8 * n / 2)]
    # DeepSpeed bf16 on GPU, ZeRO-1: full bf16 weights and grads, sharded master + moments.
    assert [b for _, b in state_bytes("deepspeed", 1, n, n, 4, gpu=True)] == [2 * n, 2 * n, 12 * n / 4]
    assert [b for _, b in state_bytes("deepspeed", 3, n, n, 4, gpu=True)] == [2 * n / 4, 2 * n / 4, 12 * n / 4]
    # megatron: fp32 state split by tensor parallelism only
    assert [b for _, b in state_bytes("megatron", 3, n, n, 4, gpu=False, tp=2)] == [4 * n / 2, 4 * n / 2, 8 * n / 2]


def test_activation_and_logit_terms_by_hand():
    # fp32 compute (e=4): 24·H + 4·(5·q + 4·I) = 3072 + 4·(640 + 1024) per token·layer
    assert layer_activation_bytes(TINY, 4) == 9_728
    assert layer_activation_bytes(TINY, 2, autocast=True) == 28 * 128 + 2 * (640 + 1024)
    tokens = 2 * 152
    assert activation_bytes(TINY, tokens, 4, False, residual=4) == 4 * tokens * 9_728
    # checkpointing: each layer's fp32 input + one layer in full
    assert activation_bytes(TINY, tokens, 4, True, residual=4) == 4 * tokens * 128 * 4 + tokens * 9_728
    # logits of 2×25 rows (+ their gradient) in fp32, + one fp32 chunk ×3 of the log-softmax
    assert logits_bytes(TINY, 50, 4, grad=True) == 50 * 3072 * 4 * 2 + 50 * 3072 * 4 * 3
    # KV: k and v × 4 layers × 2 KV heads × 32 dims × 4 bytes; TP=2 splits the KV heads
    assert kv_bytes_per_token(TINY, 1, 4) == 2048
    assert kv_bytes_per_token(TINY, 2, 4) == 1024


def test_tiny_cpu_plan_terms_by_hand():
    cfg = _cfg("tiny-cpu")  # 2 workers, fp32, micro 2, 128+24 tokens, vLLM KV sized from the job
    plan = memory_plan(cfg, "grpo", load_shape("tiny-qwen2"), "cpu")
    n = TINY.params
    assert _term(plan, "actor", "params").bytes == 4 * n / 2
    assert _term(plan, "actor", "grads").bytes == 4 * n / 2
    assert _term(plan, "actor", "AdamW").bytes == 8 * n / 2
    assert _term(plan, "actor", "activations").bytes == 4 * 2 * 152 * 9_728
    # 4 prompts × n=4 over 2 engines = 8 rows × 2 blocks of 128 tokens, + vLLM's null block
    kv = _term(plan, "rollout", "vLLM KV")
    assert kv.bytes == 17 * 128 * 2048
    # free_cache_engine (default): the KV cache's pages only while generating, the packed layers
    # dropped for the update, the embedding table always
    assert kv.phases == ("rollout",)
    layers, emb = _term(plan, "rollout", "vLLM packed layers"), _term(plan, "rollout", "vLLM embedding")
    assert layers.bytes + emb.bytes == 4 * n and emb.bytes == 4 * TINY.embedding_params
    assert "update" not in layers.phases and "update" in emb.phases
    assert plan.kv_tokens == 17 * 128
    kept = memory_plan(_cfg("tiny-cpu", "rollout.free_cache_engine=false"), "grpo", load_shape("tiny-qwen2"), "cpu")
    assert _term(kept, "rollout", "vLLM weights").bytes == 4 * n
    assert _term(kept, "rollout", "vLLM KV").phases == PHASES_RL
    # CPU: the node is the device; every worker process + driver, Ray, reward pool
    assert plan.peaks["update"] == 2 * plan.per_device["update"] + sum(plan.node_terms.values())
    assert plan.fits


def test_cpu_kv_cache_is_sized_from_the_job():
    smol = load_shape("smollm2-135m-instruct")  # 30 layers, 3 KV heads × 64
    assert kv_bytes_per_token(smol, 1, 4) == 2 * 30 * 3 * 64 * 4 == 46_080
    cfg = _cfg("smollm2-135m-cpu", "data.train_prompts_per_step=8", "data.max_response_tokens=64")
    kv = cpu_kv_cache(cfg, smol, 4)  # 8 prompts × n=4 on one engine, 192 + 64 tokens
    assert kv.auto and (kv.rows, kv.tokens_per_row) == (32, 256)
    assert kv.bytes == (32 * 2 + 1) * 128 * 46_080  # 65 blocks: 0.36 GiB instead of 1 GiB
    # An explicit size is honoured as given, fractions of a GiB included.
    assert cpu_kv_cache(_cfg("smollm2-135m-cpu", "rollout.cpu_kvcache_gb=1"), smol, 4).bytes == GiB
    assert cpu_kv_cache(_cfg("smollm2-135m-cpu", "rollout.cpu_kvcache_gb=0.5"), smol, 4).bytes == GiB // 2
    # TP=2 engines: half the KV heads per rank, the rows of 2 ranks on each engine.
    tp = cpu_kv_cache(_cfg("tiny-cpu", "rollout.tensor_parallel_size=2"), TINY, 4)
    assert (tp.rows, tp.bytes) == (16, (16 * 2 + 1) * 128 * 1024)
    # The floor vLLM accepts: one max_model_len sequence (+ the null block), however few rows.
    assert engine_rows(1, 1, 4, 1) == 1
    assert auto_kv_cache_bytes(1, 40, 300, 100) == (3 + 1) * 128 * 100


def test_phases_on_gpu_follow_the_memory_modes():
    cfg = _cfg("qwen2.5-7b-8xH100", "actor.offload_optimizer=true")
    plan = memory_plan(cfg, "grpo", load_shape(cfg.model.path), "cuda")
    opt = _term(plan, "actor", "AdamW")
    assert opt.phases == ("optimizer step",) and opt.host == opt.bytes  # back only for the step
    assert "rollout" not in _term(plan, "actor", "params").phases      # offloaded for generation
    kv = _term(plan, "rollout", "vLLM KV")
    assert kv.phases == ("rollout",)                                    # freed while training
    assert _term(plan, "rollout", "vLLM weights").phases == ("rollout", "weight sync")
    # vLLM's budget is gpu_memory_utilization of the device, weights included
    w = _term(plan, "rollout", "vLLM weights").bytes
    assert w == 2 * load_shape(cfg.model.path).params / 2               # bf16, TP=2
    assert w + kv.bytes == pytest.approx(0.6 * 80e9)


def test_working_sets_do_not_add_across_roles():
    cfg = _cfg("qwen2.5-7b-8xH100")
    plan = memory_plan(cfg, "grpo", load_shape(cfg.model.path), "cuda")
    resident = sum(t.bytes for t in plan.terms if "log-probs" in t.phases and not t.transient)
    actor = sum(t.bytes for t in plan.terms if "log-probs" in t.phases and t.transient and t.role == "actor")
    assert phase_bytes(plan.terms, "log-probs") == pytest.approx(resident + actor)


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_fits_its_named_hardware(preset):
    cfg = _cfg(preset)
    gpu = cfg.resources.device == "cuda"
    if gpu:  # the hardware the name states
        assert cfg.resources.device_memory_gb == (141 if "H200" in preset else 80)
    plan = memory_plan(cfg, "ppo" if cfg.use_critic else "grpo", load_shape(cfg.model.path),
                       "cuda" if gpu else "cpu")
    assert plan.fits, (plan.problems, {p: round(b / GiB, 1) for p, b in plan.peaks.items()})


def test_a_run_that_does_not_fit_names_knobs_that_do():
    cfg = _cfg("qwen2.5-7b-8xH100", "model.gradient_checkpointing=false",
               "actor.micro_batch_sequences_per_device=32")
    shape = load_shape(cfg.model.path)
    plan = memory_plan(cfg, "grpo", shape, "cuda")
    assert not plan.fits and plan.worst_phase == "update"
    assert plan.largest_term("update").name.startswith("activations")
    found = fixes(cfg, "grpo", shape, "cuda")
    assert {"model.gradient_checkpointing": True} in found
    for f in found:  # every suggestion really fits
        assert memory_plan(with_overrides(cfg, f), "grpo", shape, "cuda").fits


def test_kv_cache_smaller_than_one_sequence_is_a_problem():
    cfg = _cfg("qwen2.5-32b-4x8xH100", "rollout.tensor_parallel_size=1", "rollout.gpu_memory_utilization=0.3")
    plan = memory_plan(cfg, "grpo", load_shape(cfg.model.path), "cuda")
    assert not plan.fits and any("KV cache" in p for p in plan.problems)


def test_cli_prints_table_and_verdict_without_torch_in_plan_modules():
    """The plan's own modules import no torch and read no weights (the 2 s budget); the
    command prints the table, the verdict and the step time; exit 1 when it does not fit."""
    code = ("import sys; import verlcli.commands.plan, verlcli.config.plan, verlcli.models.shape; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "verlcli.cli", "plan", "--preset", "qwen2.5-32b-4x8xH100"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr
    for text in ("memory per device", "peak per device", "verdict: fits", "host memory per node",
                 "time per step", "vLLM KV cache"):
        assert text in run.stdout
    bad = subprocess.run([sys.executable, "-m", "verlcli.cli", "plan", "--preset", "qwen2.5-7b-8xH100",
                          "actor.micro_batch_sequences_per_device=32", "model.gradient_checkpointing=false"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 1 and "does not fit" in bad.stdout and "fits with:" in bad.stdout


# ---------------------------------------------------------------- estimate vs measured

# FSDPEngine updates (forward with entropy, backward, AdamW step) in a fresh process at world
# size 1 — what a `launcher=local` actor does per micro-batch — and its peak RSS.
MEASURE = r"""
import json, sys
import torch, torch.distributed as dist
from verlcli.distributed.worker import free_port
from verlcli.config.schema import OptimConfig
from verlcli.engine import FSDPEngine
a = json.loads(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
eng = FSDPEngine(a["path"], kind="causal_lm", optim=OptimConfig(lr=1e-5), device="cpu",
                 compute_dtype="auto", gradient_checkpointing=a["ckpt"])
B, P, R = a["micro"], a["prompt"], a["response"]
ids = torch.randint(0, eng.hf_config.vocab_size, (B, P + R), generator=torch.Generator().manual_seed(0))
for _ in range(2):  # the second update runs with AdamW state resident: the steady state
    lp, _ = eng.log_probs(ids, torch.ones_like(ids), torch.arange(P + R).expand(B, -1), response_len=R,
                          with_entropy=True)
    eng.backward(-lp.mean())
    eng.step()
# VmHWM, not ru_maxrss: getrusage keeps the peak across exec, i.e. the forked pytest process's.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024}))
"""


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """Random-init models of the tiny-qwen2 and SmolLM2-135M shapes (memory depends on the
    shape only), written from the shipped config.json files in fp32 like the built-ins."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for name, key in (("tiny", "verlcli--tiny-qwen2"), ("smol", "HuggingFaceTB--SmolLM2-135M-Instruct")):
        c = {k: v for k, v in shipped_config(key).items() if k not in ("architectures", "torch_dtype")}
        config = AutoConfig.for_model(**c)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.config.dtype = torch.float32
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
        del model
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset,model,micro,prompt,response,ckpt", [
    ("tiny-cpu", "tiny", 2, 128, 24, False),
    ("smollm2-135m-cpu", "smol", 4, 48, 16, False),
    ("smollm2-135m-cpu", "smol", 16, 48, 16, False),
    ("smollm2-135m-cpu", "smol", 16, 48, 16, True),
])
def test_estimate_within_25_percent_of_measured_peak_rss(random_models, preset, model, micro, prompt,
                                                         response, ckpt):
    path = str(random_models[model])
    cfg = _cfg(preset, f"model.path={path}", f"data.max_prompt_tokens={prompt}",
               f"data.max_response_tokens={response}", "rollout.n=4", "rollout.temperature=1.0",
               "data.train_prompts_per_step=8", "actor.mini_batch_prompts=8",
               f"actor.micro_batch_sequences_per_device={micro}", "resources.devices_per_node=1",
               "launcher=local", f"model.gradient_checkpointing={str(ckpt).lower()}")
    plan = memory_plan(cfg, "grpo", load_shape(path), "cpu", roles=["actor"])
    estimate = max(plan.per_device["update"], plan.per_device["optimizer step"])
    args = json.dumps(dict(path=path, micro=micro, prompt=prompt, response=response, ckpt=ckpt))
    # The threads a worker of this preset runs with (group.py: OMP_NUM_THREADS = cpus_per_worker):
    # 2 for smollm2-135m-cpu (measured peaks moved by <2%), and the measurement uses both cores.
    threads = str(max(1, int(cfg.resources.cpus_per_worker)))
    run = subprocess.run([sys.executable, "-c", MEASURE, args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": threads}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss"]
    print(f"{preset} micro={micro} ckpt={ckpt}: estimate {estimate / GiB:.2f} GiB, "
          f"measured {measured / GiB:.2f} GiB ({estimate / measured - 1:+.0%})")
    assert abs(estimate / measured - 1) <= 0.25
