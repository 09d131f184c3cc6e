"""DeepSpeed ZeRO engine vs the FSDP engine on the built-in tiny-qwen2, CPU + gloo, 2 ranks.

One 2-rank run (spawned processes, module fixture, under the heavy-job lock by the caller)
trains the same model with the same seed and data three optimizer steps each with FSDP,
ZeRO-1, ZeRO-2 and ZeRO-3 (fp32), saves / reloads ZeRO checkpoints, streams weights in small buckets,
and trains LoRA under ZeRO-3; the tests compare what it wrote to disk.

Tolerance (fp32): losses within 1e-5, gradient norms within 1e-4 relative, parameters within
1e-5 absolute after 3 AdamW steps — the engines differ only in the order of float sums
(bucketed reduce-scatter vs FSDP's), which is ~1e-7 per step.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from verlcli.config.schema import LoraConfig, OptimConfig
from verlcli.engine import FSDPEngine, load_full_state_dict

from _ranks import run_ranks

pytest.importorskip("deepspeed")

WS = 2
B, P, R = 4, 5, 4
# eps 1e-4 keeps Adam's first step from amplifying float-order noise in near-zero gradients
# (see test_engine.py).
OPT = OptimConfig(lr=5e-3, eps=1e-4, weight_decay=0.01, schedule="cosine", warmup_steps=1,
                  min_lr_ratio=0.1, grad_clip=1.0)
TOTAL_STEPS = 4
LORA = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
BUCKET = 100_000  # bytes: tiny-qwen2 streams in many buckets


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 3000, (B, P + R), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    for i, (pl, rl) in enumerate([(5, 4), (3, 2), (4, 3), (2, 4)]):
        mask[i, :P - pl] = 0
        mask[i, P + rl:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, mask[:, -R:]


def _step(engine, ids, mask, pos, rmask, global_tokens):
    lp, _ = engine.log_probs(ids, mask, pos, R)
    partial = -(lp * rmask).sum() / global_tokens
    engine.backward(partial)
    stats = engine.step()
    stats["loss"] = engine.all_reduce_sum(partial.item())
    return stats


def _lp(engine, ids, mask, pos):
    with torch.no_grad():
        return engine.log_probs(ids, mask, pos, R)[0]


def _packed_gap(engine, ids, mask, pos):
    """Largest |packed − padded| over log-probs and entropy at real response tokens, every mode."""
    from verlcli.engine import packing

    packing.use_attention(engine.hf_model, "varlen", "cpu")  # falls back to SDPA when padded
    real, gaps = mask[:, -R:].bool(), []
    with torch.no_grad():
        engine.pack_mode = None
        ref = engine.log_probs(ids, mask, pos, R, with_entropy=True)
        for mode in packing.MODES:
            engine.pack_mode = mode
            got = engine.log_probs(ids, mask, pos, R, with_entropy=True)
            gaps += [float((a - b)[real].abs().max()) for a, b in zip(ref, got)]
    engine.pack_mode = None
    return max(gaps)


def _train3(engine, local, gt, ids, mask, pos, res, save_at=None, ckpt=None):
    res["stats"] = []
    for s in range(3):
        if s == save_at:
            engine.save_checkpoint(ckpt, extra={"step": s})
            res["lp_save"] = _lp(engine, ids, mask, pos)
        res["stats"].append(_step(engine, *local, gt))
    res["sd"] = engine.full_state_dict()
    res["lp3"] = _lp(engine, ids, mask, pos)


def _worker(rank, out_dir, model_path):
    from verlcli.engine.deepspeed import DeepSpeedEngine

    ids, mask, pos, rmask = _batch()
    n = B // WS
    local = [t[rank * n:(rank + 1) * n] for t in (ids, mask, pos, rmask)]
    gt = float(rmask.sum())
    common = dict(optim=OPT, total_optimizer_steps=TOTAL_STEPS, device="cpu", compute_dtype="float32")
    out = {}

    fsdp = FSDPEngine(model_path, **common)
    _train3(fsdp, local, gt, ids, mask, pos, out.setdefault("fsdp", {}))
    del fsdp

    for stage in (1, 2, 3):
        res = out.setdefault(f"zero{stage}", {})
        eng = DeepSpeedEngine(model_path, zero_stage=stage, **common)
        res["params"] = eng.num_parameters()
        _train3(eng, local, gt, ids, mask, pos, res, save_at=2, ckpt=f"{out_dir}/zero{stage}")
        buckets = list(eng.weight_buckets(BUCKET))
        res["n_buckets"] = len(buckets)
        res["bucket_max"] = max(sum(v.numel() * v.element_size() for _, v in b) for b in buckets)
        res["buckets_bf16"] = {k: v for b in eng.weight_buckets(BUCKET, torch.bfloat16) for k, v in b}
        # Resume: the checkpoint taken before step 3, then step 3 again, lands on the same weights.
        extra = eng.load_checkpoint(f"{out_dir}/zero{stage}")
        res["extra"], res["steps_after_load"] = extra, eng.optimizer_steps
        res["lp_loaded"] = _lp(eng, ids, mask, pos)
        res["resumed_step"] = _step(eng, *local, gt)
        res["lp_resumed"] = _lp(eng, ids, mask, pos)
        if stage == 3:  # packed rows (engine/packing.py) under ZeRO-3 = padded rows
            res["packed_gap"] = _packed_gap(eng, *local[:3])
        if stage == 2:  # a non-finite gradient skips the update
            before = eng.full_state_dict()
            lp, _ = eng.log_probs(*local[:3], R)
            eng.backward(lp.sum() * float("nan"))
            res["nan_step"] = eng.step()
            res["nan_unchanged"] = all(torch.equal(v, before[k]) for k, v in eng.full_state_dict().items())
        del eng

    lora_opt = dict(common, optim=OptimConfig(lr=1e-2), total_optimizer_steps=2)
    fl = FSDPEngine(model_path, lora=LORA, **lora_opt)
    _step(fl, *local, gt)
    out["fsdp_lora_sd"] = fl.full_state_dict()
    del fl
    dl = DeepSpeedEngine(model_path, zero_stage=3, lora=LORA, **lora_opt)
    out["zero3_lora_trainable"] = dl.num_parameters()[0]
    _step(dl, *local, gt)
    out["zero3_lora_sd"] = {k: v for b in dl.weight_buckets(BUCKET) for k, v in b}
    dl.save_checkpoint(f"{out_dir}/zero3_lora", extra={})
    del dl

    val = DeepSpeedEngine(model_path, zero_stage=3, kind="value", **dict(common, optim=OptimConfig(lr=1e-2)))
    v0 = val.values(*local[:3], R)
    out["v0"] = v0.detach()
    val.backward(((v0 - 1.0) ** 2 * local[3]).sum() / gt)
    out["v_stats"] = val.step()
    out["v1"] = val.values(*local[:3], R).detach()
    del val
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from verlcli.models.resolve import resolve_model

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = tmp_path_factory.mktemp("ds_engine")
    path = str(resolve_model("tiny-qwen2"))
    ranks = run_ranks(_worker, out, path, world=WS)
    return {"dir": out, "ranks": ranks, "model_path": path}


def _close(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_fsdp_over_three_steps(run, stage):
    for res in run["ranks"]:
        ref, mine = res["fsdp"], res[f"zero{stage}"]
        losses = [s["loss"] for s in mine["stats"]]
        assert losses[2] < losses[0]
        for a, b in zip(mine["stats"], ref["stats"]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-9) and a["skipped"] == 0.0
        assert "lm_head.weight" in mine["sd"]  # tied embeddings: the rollout engine needs it
        _close(mine["sd"], ref["sd"], atol=1e-5)
        torch.testing.assert_close(mine["lp3"], ref["lp3"], atol=1e-5, rtol=0)
        assert mine["params"] == (sum(v.numel() for k, v in ref["sd"].items() if k != "lm_head.weight"),) * 2


@pytest.mark.parametrize("stage", [2, 3])
def test_weight_buckets_stream_small_buckets(run, stage):
    res = run["ranks"][0][f"zero{stage}"]
    assert res["n_buckets"] > 5
    biggest = max(v.numel() * 4 for v in res["sd"].values())  # one tensor above the bucket size
    assert res["bucket_max"] <= max(BUCKET, biggest) + biggest  # + its tied alias
    _close(res["buckets_bf16"], {k: v.to(torch.bfloat16) for k, v in res["sd"].items()}, atol=0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_checkpoint_resume_continues_exactly(run, stage):
    for res in run["ranks"]:
        mine = res[f"zero{stage}"]
        assert mine["extra"] == {"step": 2} and mine["steps_after_load"] == 2
        torch.testing.assert_close(mine["lp_loaded"], mine["lp_save"], atol=0, rtol=0)
        assert mine["resumed_step"]["lr"] == pytest.approx(mine["stats"][2]["lr"], rel=1e-9)
        assert mine["resumed_step"]["loss"] == pytest.approx(mine["stats"][2]["loss"], abs=1e-6)
        # Adam moments restored: the repeated step lands where the uninterrupted one did.
        torch.testing.assert_close(mine["lp_resumed"], mine["lp3"], atol=1e-6, rtol=0)
    d = run["dir"] / f"zero{stage}"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["strategy"] == "deepspeed" and meta["zero_stage"] == stage and meta["world_size"] == 2
    for name in ("scheduler.json", "extra.json", "hf/config.json", "rng_rank0.pt", "rng_rank1.pt"):
        assert (d / name).exists(), name


def test_non_finite_gradient_skips_the_update(run):
    res = run["ranks"][0]["zero2"]
    assert res["nan_step"]["skipped"] == 1.0 and not math.isfinite(res["nan_step"]["grad_norm"])
    assert res["nan_unchanged"]


@pytest.mark.parametrize("stage", [2, 3])
def test_merge_reads_zero_checkpoint_without_process_group(run, stage, tmp_path):
    """The checkpoint saved before step 3 → plain fp32 tensors = the weights the run had then."""
    from transformers import AutoModelForCausalLM

    from verlcli.merge import merge_checkpoint

    ckpt = run["dir"] / f"zero{stage}"
    sd = load_full_state_dict(ckpt)
    assert "lm_head.weight" in sd
    info = merge_checkpoint(ckpt, out=tmp_path / "hf", verify=True)
    assert info["verify"]["ok"] and info["world_size"] == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    _close(model.state_dict(), sd, atol=0)
    ids, mask, pos, _ = _batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    lp = torch.log_softmax(logits[:, -R - 1:-1], -1).gather(-1, ids[:, -R:, None]).squeeze(-1)
    torch.testing.assert_close(lp, run["ranks"][0][f"zero{stage}"]["lp_save"], atol=1e-5, rtol=0)


def test_lora_under_zero3_matches_fsdp_and_merges(run):
    for res in run["ranks"]:
        assert res["zero3_lora_trainable"] > 0
        _close(res["zero3_lora_sd"], res["fsdp_lora_sd"], atol=1e-5)
    merged = load_full_state_dict(run["dir"] / "zero3_lora")
    _close(merged, run["ranks"][0]["zero3_lora_sd"], atol=1e-6)
    raw = load_full_state_dict(run["dir"] / "zero3_lora", merge_lora=False)
    assert any(".lora_A." in k for k in raw)


def test_packed_rows_equal_padded_under_zero3(run):
    assert all(res["zero3"]["packed_gap"] < 1e-5 for res in run["ranks"])


def test_value_model_under_zero3(run):
    for res in run["ranks"]:
        assert res["v0"].shape == (B // WS, R) and torch.count_nonzero(res["v0"]) == 0
        assert not torch.equal(res["v1"], res["v0"]) and math.isfinite(res["v_stats"]["grad_norm"])


class Fsdpish:
    """Looks like an FSDP engine to the compatibility check; an arbitrary object to pickle."""

    strategy, kind, lora = "fsdp", "causal_lm", None


def test_checkpoint_of_other_engine_or_with_code_is_refused(run, tmp_path):
    import shutil

    from verlcli.engine.checkpoint import _check_compatible
    from verlcli.engine.ds_checkpoint import vet
    from verlcli.errors import UserError

    meta = json.loads((run["dir"] / "zero2" / "meta.json").read_text())
    with pytest.raises(UserError, match="deepspeed engine"):
        _check_compatible(Fsdpish(), meta, run["dir"] / "zero2")
    # A DeepSpeed file holding an arbitrary object is rejected before any unpickling runs it.
    bad = tmp_path / "zero"
    shutil.copytree(run["dir"] / "zero2" / "model" / "zero", bad)
    torch.save({"x": Fsdpish()}, bad / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="not a plain DeepSpeed checkpoint"):
        vet(bad)


def test_ds_config_maps_our_keys():
    from verlcli.engine.deepspeed import ds_config

    c = ds_config(3, OPT, bf16=True, on_gpu=True, offload_params=True, offload_optimizer=True)
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    assert c["bf16"]["enabled"] and c["gradient_clipping"] == OPT.grad_clip
    # our micro-batch loop owns accumulation: no 1/gas scaling, reduction finalized in step()
    assert c["gradient_accumulation_steps"] == 1 and c["managed_gradient_accumulation"] is False
    c = ds_config(2, OPT, bf16=False, on_gpu=False, offload_params=True, offload_optimizer=False)
    assert "offload_param" not in c["zero_optimization"] and not c["bf16"]["enabled"]
