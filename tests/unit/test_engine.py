"""FSDP2 engine on the built-in tiny-qwen2, CPU + gloo.

One 2-rank run (spawned processes, module fixture) trains a full model, a LoRA model and a
value model and writes what it saw to disk; the tests compare that against a plain,
unsharded transformers model in this process, and reload its checkpoints at world size 1.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from verlcli.config.schema import LoraConfig, OptimConfig
from verlcli.engine import FSDPEngine, load_full_state_dict, lr_multiplier, resolve_compute_dtype
from verlcli.engine.optim import build_optimizer, build_scheduler

import _ranks
from _ranks import run_ranks

WS = 2
B, P, R = 4, 5, 4  # sequences, prompt slots, response slots
# eps 1e-4: Adam's first update is ~lr·g/(|g|+eps), a sign for |g| << eps; a larger eps
# keeps float-order noise in near-zero gradients from flipping it between the sharded
# and the plain run.
OPT = OptimConfig(lr=5e-3, eps=1e-4, weight_decay=0.01, schedule="cosine", warmup_steps=1,
                  min_lr_ratio=0.1, grad_clip=1.0)
TOTAL_STEPS = 4
LORA = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _model_path():
    from verlcli.models.resolve import resolve_model

    return resolve_model("tiny-qwen2")


def _batch():
    """[prompt left-padded | response right-padded] with ragged lengths."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 3000, (B, P + R), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    for i, (pl, rl) in enumerate([(5, 4), (3, 2), (4, 3), (2, 4)]):
        mask[i, :P - pl] = 0
        mask[i, P + rl:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, mask[:, -R:]


def _rows(rank, ws, *tensors):
    n = B // ws
    return [t[rank * n:(rank + 1) * n] for t in tensors]


def _sft_step(engine, ids, mask, pos, rmask, global_tokens):
    """One optimizer step on -mean log p over the GLOBAL token count (this rank's share)."""
    lp, _ = engine.log_probs(ids, mask, pos, R)
    partial = -(lp * rmask).sum() / global_tokens
    engine.backward(partial)
    stats = engine.step()
    stats["loss"] = engine.all_reduce_sum(partial.item())
    return stats


def _full_lp(engine, ids, mask, pos):
    with torch.no_grad():
        return engine.log_probs(ids, mask, pos, R)[0]


def _worker(rank, out_dir, model_path):
    ids, mask, pos, rmask = _batch()
    local = _rows(rank, WS, ids, mask, pos, rmask)
    res = {}

    eng = FSDPEngine(model_path, kind="causal_lm", optim=OPT, total_optimizer_steps=TOTAL_STEPS,
                     device="cpu", compute_dtype="float32")
    res["lp0"] = _full_lp(eng, ids, mask, pos)
    gt = eng.all_reduce_sum(float(local[3].sum()))
    res["gt"] = gt
    res["stats"] = [_sft_step(eng, *local, gt)]
    res["sd1"] = eng.full_state_dict()
    res["stats"].append(_sft_step(eng, *local, gt))
    torch.rand(7)  # move the RNG off its seeded state, so restoring it is visible
    eng.save_checkpoint(f"{out_dir}/ckpt", extra={"step": 2, "data_pos": 8})
    res["lp_save"] = _full_lp(eng, ids, mask, pos)
    if rank == 0:
        res["sd_save"] = eng.full_state_dict()
    else:
        eng.full_state_dict()  # collective: every rank takes part
    res["stats"].append(_sft_step(eng, *local, gt))
    res["lp3"] = _full_lp(eng, ids, mask, pos)
    del eng

    lora = FSDPEngine(model_path, optim=OptimConfig(lr=1e-2), total_optimizer_steps=2,
                      device="cpu", compute_dtype="float32", lora=LORA)
    res["lora_trainable"] = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    res["lora_stats"] = _sft_step(lora, *local, gt)
    res["lora_sd"] = lora.full_state_dict()
    res["lora_lp"] = _full_lp(lora, ids, mask, pos)
    lora.save_checkpoint(f"{out_dir}/ckpt_lora", extra={})
    del lora

    val = FSDPEngine(model_path, kind="value", optim=OptimConfig(lr=1e-2), total_optimizer_steps=2,
                     device="cpu", compute_dtype="float32")
    v0 = val.values(*local[:3], R)
    res["v0"] = v0.detach()
    loss = ((v0 - 1.0) ** 2 * local[3]).sum() / gt
    val.backward(loss)
    res["v_stats"] = val.step()
    with torch.no_grad():
        res["v1"] = val.values(*local[:3], R)
    return res


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Results of the 2-rank run, per rank."""
    out = tmp_path_factory.mktemp("engine")
    path = str(_model_path())
    ranks = run_ranks(_worker, out, path, world=WS)
    return {"dir": out, "ranks": ranks, "model_path": path}


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A 1-rank gloo group in this process, for loading checkpoints at world size 1."""
    with _ranks.one_rank_group(tmp_path_factory.mktemp("pg")):
        yield


def _plain_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _plain_lp(model, ids, mask, pos):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return torch.log_softmax(logits[:, -R - 1:-1].float(), -1).gather(
        -1, ids[:, -R:].unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def reference(run):
    """The same three steps on a plain unsharded model over the whole batch."""
    torch.manual_seed(0)
    model = _plain_model(run["model_path"])
    model.train()
    opt = build_optimizer(model.parameters(), OPT)
    sched = build_scheduler(opt, OPT, TOTAL_STEPS)
    ids, mask, pos, rmask = _batch()
    with torch.no_grad():
        out = {"lp0": _plain_lp(model, ids, mask, pos)}
    out["stats"], out["sd"] = [], []
    for _ in range(3):
        loss = -(_plain_lp(model, ids, mask, pos) * rmask).sum() / rmask.sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
        out["stats"].append({"loss": loss.item(), "grad_norm": float(norm),
                             "lr": sched.get_last_lr()[0]})
        opt.step()
        opt.zero_grad()
        sched.step()
        out["sd"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        out["lp3"] = _plain_lp(model, ids, mask, pos)
    return out


def _assert_sd_close(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------- 2-rank training


def test_log_probs_equal_plain_model(run, reference):
    for res in run["ranks"]:
        assert res["lp0"].shape == (B, R) and res["lp0"].dtype == torch.float32
        torch.testing.assert_close(res["lp0"], reference["lp0"], atol=1e-5, rtol=0)


def test_training_reduces_loss_and_matches_unsharded_steps(run, reference):
    r0 = run["ranks"][0]
    losses = [s["loss"] for s in r0["stats"]]
    assert losses[2] < losses[1] < losses[0]
    assert r0["gt"] == float(_batch()[3].sum())
    for mine, ref in zip(r0["stats"], reference["stats"]):
        # world-size loss scaling gives the exact global-mean gradient
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert mine["lr"] == pytest.approx(ref["lr"], rel=1e-9)
        assert mine["skipped"] == 0.0
    torch.testing.assert_close(r0["lp3"], reference["lp3"], atol=1e-4, rtol=0)


def test_full_state_dict_on_every_rank_equals_unsharded(run, reference):
    for res in run["ranks"]:
        sd = res["sd1"]
        assert "lm_head.weight" in sd  # tied embeddings: the rollout engine needs it
        assert all(type(v) is torch.Tensor for v in sd.values())
        _assert_sd_close(sd, reference["sd"][0], atol=1e-5)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_layout(run):
    d = run["dir"] / "ckpt"
    assert not (run["dir"] / "ckpt.tmp").exists()
    for name in ("model/.metadata", "optim/.metadata", "scheduler.json", "extra.json", "meta.json",
                 "hf/config.json", "hf/tokenizer.json", "rng_rank0.pt", "rng_rank1.pt"):
        assert (d / name).exists(), name
    assert not list((d / "hf").glob("*.safetensors"))
    assert json.loads((d / "extra.json").read_text()) == {"step": 2, "data_pos": 8}
    meta = json.loads((d / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["kind"] == "causal_lm" and meta["lora"] is None
    rng = torch.load(d / "rng_rank1.pt", weights_only=True)
    assert {"torch", "python", "numpy"} <= set(rng)


def test_load_full_state_dict_equals_full_state_dict(run, tmp_path):
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    sd = load_full_state_dict(run["dir"] / "ckpt")
    _assert_sd_close(sd, run["ranks"][0]["sd_save"], atol=0)
    # hf/ + these weights is a complete HF model: what merge-checkpoint writes.
    out = tmp_path / "merged"
    shutil.copytree(run["dir"] / "ckpt" / "hf", out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    save_file(sd, out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids, mask, pos, _ = _batch()
    with torch.no_grad():
        lp = _plain_lp(model, ids, mask, pos)
    torch.testing.assert_close(lp, run["ranks"][0]["lp_save"], atol=1e-5, rtol=0)


def test_resume_at_world_size_1_continues_exactly(run, one_rank_group):
    ids, mask, pos, rmask = _batch()
    eng = FSDPEngine(run["model_path"], optim=OPT, total_optimizer_steps=TOTAL_STEPS,
                     device="cpu", compute_dtype="float32")
    assert eng.world_size == 1
    extra = eng.load_checkpoint(run["dir"] / "ckpt")
    assert extra == {"step": 2, "data_pos": 8}
    assert eng.optimizer_steps == 2
    import random

    import numpy as np

    saved = torch.load(run["dir"] / "ckpt" / "rng_rank0.pt", weights_only=True)
    torch.manual_seed(1)
    assert not torch.equal(torch.get_rng_state(), saved["torch"])
    eng.load_checkpoint(run["dir"] / "ckpt")
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    assert random.getstate()[1] == tuple(saved["python"].tolist())
    assert np.array_equal(np.random.get_state()[1], saved["numpy"].numpy())
    r0 = run["ranks"][0]
    torch.testing.assert_close(_full_lp(eng, ids, mask, pos), r0["lp_save"], atol=1e-5, rtol=0)
    stats = _sft_step(eng, ids, mask, pos, rmask, float(rmask.sum()))
    assert stats["lr"] == pytest.approx(r0["stats"][2]["lr"], rel=1e-9)
    assert stats["grad_norm"] == pytest.approx(r0["stats"][2]["grad_norm"], rel=1e-4)
    # Adam moments restored: the step lands where the uninterrupted run's did.
    torch.testing.assert_close(_full_lp(eng, ids, mask, pos), r0["lp3"], atol=1e-5, rtol=0)


def test_checkpoint_of_wrong_kind_is_a_user_error(run, one_rank_group):
    from verlcli.errors import UserError

    eng = FSDPEngine(run["model_path"], kind="value", optim=None, device="cpu",
                     compute_dtype="float32")
    with pytest.raises(UserError, match="causal_lm"):
        eng.load_checkpoint(run["dir"] / "ckpt")
    with pytest.raises(UserError, match="not a verl checkpoint"):
        load_full_state_dict(run["dir"])


# ---------------------------------------------------------------- LoRA and value model


def test_lora_trains_only_adapters_and_merges(run):
    res = run["ranks"][0]
    assert res["lora_trainable"] and all("lora_" in n for n in res["lora_trainable"])
    base = _plain_model(run["model_path"]).state_dict()
    merged = res["lora_sd"]
    assert set(merged) == set(base)  # HF names, lm_head.weight included
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    _assert_sd_close(run["ranks"][1]["lora_sd"], merged, atol=0)  # same weights on every rank
    # The merged weights ARE the trained policy: a plain model with them gives its log-probs.
    model = _plain_model(run["model_path"])
    model.load_state_dict(merged)
    ids, mask, pos, _ = _batch()
    with torch.no_grad():
        lp = _plain_lp(model, ids, mask, pos)
    torch.testing.assert_close(lp, res["lora_lp"], atol=1e-5, rtol=0)
    _assert_sd_close(load_full_state_dict(run["dir"] / "ckpt_lora"), merged, atol=0)
    raw = load_full_state_dict(run["dir"] / "ckpt_lora", merge_lora=False)
    assert any(".lora_A." in k for k in raw)


def test_value_model_shapes_and_training(run):
    for res in run["ranks"]:
        assert res["v0"].shape == (B // WS, R) and res["v0"].dtype == torch.float32
        assert torch.count_nonzero(res["v0"]) == 0  # new head starts at zero
        assert not torch.equal(res["v1"], res["v0"]) and math.isfinite(res["v_stats"]["grad_norm"])


# ---------------------------------------------------------------- small pure parts


def test_resolve_compute_dtype():
    assert resolve_compute_dtype("cuda", "auto") == torch.bfloat16
    assert resolve_compute_dtype("cpu", "float32") == torch.float32
    assert resolve_compute_dtype("cpu", "bfloat16") == torch.bfloat16
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    has_bf16 = "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo
    assert resolve_compute_dtype("cpu", "auto") == (torch.bfloat16 if has_bf16 else torch.float32)
    with pytest.raises(ValueError):
        resolve_compute_dtype("cpu", "fp8")


def test_lr_schedules():
    const = lr_multiplier("constant", 2, 10)
    assert [const(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = lr_multiplier("cosine", 0, 4, min_lr_ratio=0.1)
    assert cos(0) == 1.0 and cos(2) == pytest.approx(0.55) and cos(4) == pytest.approx(0.1)
    assert cos(100) == pytest.approx(0.1)


def test_gradient_checkpointing_gives_the_same_gradient(run, reference, one_rank_group):
    eng = FSDPEngine(run["model_path"], optim=OPT, total_optimizer_steps=TOTAL_STEPS,
                     device="cpu", compute_dtype="float32", gradient_checkpointing=True)
    assert eng.hf_model.is_gradient_checkpointing
    ids, mask, pos, rmask = _batch()
    stats = _sft_step(eng, ids, mask, pos, rmask, float(rmask.sum()))
    assert stats["grad_norm"] == pytest.approx(reference["stats"][0]["grad_norm"], rel=1e-4)
    assert stats["loss"] == pytest.approx(reference["stats"][0]["loss"], abs=1e-5)


def test_bf16_autocast_and_non_finite_step_is_skipped(run, one_rank_group):
    ids, mask, pos, rmask = _batch()
    eng = FSDPEngine(run["model_path"], optim=OPT, total_optimizer_steps=TOTAL_STEPS,
                     device="cpu", compute_dtype="bfloat16")
    lp, ent = eng.log_probs(ids, mask, pos, R, temperature=0.7, with_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32 and ent.shape == (B, R)
    before = eng.full_state_dict()
    eng.backward(lp.sum() * float("nan"))
    stats = eng.step()
    assert stats["skipped"] == 1.0 and not math.isfinite(stats["grad_norm"])
    _assert_sd_close(eng.full_state_dict(), before, atol=0)
    assert eng.all_reduce_sum(3) == 3.0
