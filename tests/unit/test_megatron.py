"""megatron-core engine on CPU + gloo: conversion, logits, training, checkpoints.

Conversion round trips are pure functions (no processes). Everything else comes from ONE
2-rank run (spawned processes, module fixture) over a tiny Qwen2 (built-in tiny-qwen2: tied
embeddings, q/k/v biases) and a tiny Llama (untied, an odd vocabulary so TP=2 pads it):
logits at TP=2 and TP=1 (DP=2) against transformers, 3 optimizer steps at TP=2 against the
FSDP engine, a TP=2 checkpoint resumed at TP=1, streamed weights, a value model.

Tolerances (fp32): logits within 1e-4 of transformers (measured ~5e-7; the gap is float
summation order), losses of the 3 steps within 1e-4 relative of FSDP's.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

from verlcli.config.schema import OptimConfig  # noqa: E402
from verlcli.engine import megatron_convert as conv  # noqa: E402

from _ranks import run_ranks  # noqa: E402

WS = 2
B, P, R = 4, 5, 4
OPT = OptimConfig(lr=5e-3, eps=1e-4, weight_decay=0.01, schedule="cosine", warmup_steps=1,
                  min_lr_ratio=0.1, grad_clip=1.0)
STEPS = 3
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=3001, max_position_embeddings=256,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def _qwen2_path() -> str:
    from verlcli.models.resolve import resolve_model

    return str(resolve_model("tiny-qwen2"))


def _llama_path(root) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(root, "tiny-llama")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        model.save_pretrained(path, safe_serialization=True)
    return path


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (B, P + R), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    for i, (pl, rl) in enumerate([(5, 4), (3, 2), (4, 3), (2, 4)]):
        mask[i, :P - pl] = 0
        mask[i, P + rl:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, mask[:, -R:]


# ---------------------------------------------------------------- conversion (no processes)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["causal_lm", "value"])
def test_hf_megatron_hf_round_trip_is_bit_exact(family, tp, kind, tmp_path):
    from transformers import AutoConfig

    path = _qwen2_path() if family == "qwen2" else _llama_path(tmp_path)
    cfg = AutoConfig.from_pretrained(path)
    layout = conv.layout_from_hf(cfg, tp, kind)
    g = torch.Generator().manual_seed(1)
    hf = {}
    for k, m, hnames in conv.entries(layout):  # random values in the true HF shapes
        for h in hnames:
            hf[h] = torch.randn(_hf_shape(h, cfg), generator=g)
    shards = [conv.hf_to_mcore(hf, layout, r) for r in range(tp)]
    if family == "llama" and tp == 2 and kind == "causal_lm":  # 3001 rows pad to 3002
        assert shards[1]["output_layer.weight"].shape[0] == 1501
        assert shards[1]["output_layer.weight"][-1].abs().sum() == 0
    back = conv.mcore_shards_to_hf(shards, layout)
    tied_extra = {"lm_head.weight"} if kind == "causal_lm" and layout.tied else set()
    assert set(back) == set(hf) | tied_extra
    for name, t in hf.items():
        assert torch.equal(back[name], t), name


def _hf_shape(name: str, cfg) -> tuple:
    h, i = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    table = {"q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
             "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
             "o_proj.weight": (h, q), "gate_proj.weight": (i, h), "up_proj.weight": (i, h),
             "down_proj.weight": (h, i), "embed_tokens.weight": (cfg.vocab_size, h),
             "lm_head.weight": (cfg.vocab_size, h), "score.weight": (1, h), "score.bias": (1,)}
    for suffix, shape in table.items():
        if name.endswith(suffix):
            return shape
    return (h,)  # norms


def test_layout_rejects_what_the_mapping_cannot_hold():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="must divide"):
        conv.layout_from_hf(LlamaConfig(**{**LLAMA, "num_key_value_heads": 1}), 2)
    with pytest.raises(ValueError, match="attention_bias"):
        conv.layout_from_hf(LlamaConfig(**LLAMA, attention_bias=True), 1)


def test_pipeline_parallel_is_a_clear_config_error():
    from verlcli.engine.megatron_convert import check_parallel_sizes
    from verlcli.errors import UserError

    with pytest.raises(UserError, match="pipeline_parallel_size=2 is not supported on CPU"):
        check_parallel_sizes(1, 2, 2, "cpu")
    with pytest.raises(UserError, match="must divide the number of ranks"):
        check_parallel_sizes(3, 1, 2, "cpu")


def test_preflight_names_bad_megatron_settings(tmp_path):
    from pathlib import Path

    from verlcli.config.schema import Config
    from verlcli.errors import UserError
    from verlcli.trainer.preflight import Checked, check_megatron

    out = Checked(model_path=Path(_llama_path(tmp_path)))  # 4 heads, 2 KV heads

    def check(**over):
        tree = {"actor": {"strategy": "megatron", "tensor_parallel_size": 2},
                "resources": {"devices_per_node": 2, "device": "cpu"}}
        for key, value in over.items():
            section, name = key.split("__")
            tree.setdefault(section, {})[name] = value
        check_megatron(Config.model_validate(tree), "rl", out)

    check()  # TP=2 on 2 ranks: fine
    with pytest.raises(UserError, match="pipeline_parallel_size=2"):
        check(actor__pipeline_parallel_size=2)
    with pytest.raises(UserError, match="attention heads"):
        check(actor__tensor_parallel_size=4, resources__devices_per_node=4)
    with pytest.raises(UserError, match="float32"):
        check(resources__compute_dtype="bfloat16")


def test_dp_dispatch_gives_a_tensor_parallel_group_one_slice():
    from verlcli.data.batch import Batch
    from verlcli.distributed.dispatch import DispatchSpec, collect_results, dp_group_size, split_call

    assert dp_group_size([(0, 2), (1, 2)]) == 1  # plain data parallel
    k = dp_group_size([(0, 2), (0, 2), (1, 2), (1, 2)])  # TP=2 × DP=2
    assert k == 2
    with pytest.raises(ValueError, match="consecutive"):
        dp_group_size([(0, 2), (1, 2), (0, 2), (1, 2)])
    spec = DispatchSpec("dp")
    per_rank, plan = split_call(spec, 4, (Batch({"x": torch.arange(4)}),), {}, "update", k)
    assert [a[0]["x"].tolist() for a, _ in per_rank] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    metrics = collect_results(spec, plan, [{"r": r} for r in range(4)], "update")
    assert metrics == [{"r": 0}, {"r": 2}]  # one answer per slice


# ---------------------------------------------------------------- the 2-rank run


def _rows(rank, ws, *tensors):
    n = B // ws
    return [t[rank * n:(rank + 1) * n] for t in tensors]


def _step(engine, ids, mask, pos, rmask):
    """One optimizer step on the global token-mean of -log p (this DP rank's share)."""
    gt = engine.all_reduce_sum(float(rmask.sum()))
    lp, _ = engine.log_probs(ids, mask, pos, R)
    partial = -(lp * rmask).sum() / gt
    engine.backward(partial)
    stats = engine.step()
    stats["loss"] = engine.all_reduce_sum(partial.item())
    return stats


def _engine(path, tp, **kw):
    from megatron.core import parallel_state as ps

    from verlcli.engine.megatron import MegatronEngine

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != tp:
        ps.destroy_model_parallel()  # one TP size per process in the product; tests switch
    return MegatronEngine(path, tensor_parallel_size=tp, device="cpu", compute_dtype="float32", **kw)


def _packed_vs_alone(eng, ids):
    """SFT packing: two samples in one row (block-diagonal additive mask, positions restart)
    must give each sample the logits it gets alone."""
    from verlcli.data.packing import block_causal_mask

    a, b = ids[0, :5], ids[1, :4]
    row = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        packed = eng.forward_logits(row, block_causal_mask(pos), pos)[0]
        alone = [eng.forward_logits(x[None], torch.ones(1, len(x), dtype=torch.long),
                                    torch.arange(len(x))[None])[0] for x in (a, b)]
    return float((packed - torch.cat(alone)).abs().max())


def _worker(rank, out_dir, paths):
    warnings.filterwarnings("ignore")
    from verlcli.engine import FSDPEngine

    res = {}
    for name, path in paths.items():
        vocab = 3000 if name == "qwen2" else LLAMA["vocab_size"]
        ids, mask, pos, rmask = _batch(vocab)
        for tp in (2, 1):
            eng = _engine(path, tp)
            rows = (ids, mask, pos) if tp == 2 else _rows(rank, WS, ids, mask, pos)
            with torch.no_grad():
                res[f"{name}/logits_tp{tp}"] = eng.forward_logits(*rows)
                lp, ent = eng.log_probs(*rows, R, with_entropy=True)
            res[f"{name}/lp_tp{tp}"], res[f"{name}/ent_tp{tp}"] = lp, ent
            if tp == 2 and name == "qwen2":
                res["packed"] = _packed_vs_alone(eng, ids)
                eng.pack_mode = "block_mask"  # padding removal: the same rows, packed
                with torch.no_grad():
                    res["rp_lp"], res["rp_ent"] = eng.log_probs(*rows, R, with_entropy=True)
                eng.pack_mode = None
            del eng

    # 3 steps at TP=2 (both ranks: the whole batch) vs FSDP on 2 ranks (half each).
    path = paths["qwen2"]
    ids, mask, pos, rmask = _batch(3000)
    fsdp = FSDPEngine(path, optim=OPT, total_optimizer_steps=STEPS, device="cpu", compute_dtype="float32")
    res["fsdp"] = [_step(fsdp, *_rows(rank, WS, ids, mask, pos, rmask)) for _ in range(STEPS)]
    del fsdp
    eng = _engine(path, 2, optim=OPT, total_optimizer_steps=STEPS)
    res["dp"] = (eng.dp_rank, eng.dp_size)
    res["params"] = eng.num_parameters()
    res["mega"] = [_step(eng, ids, mask, pos, rmask) for _ in range(STEPS - 1)]
    eng.save_checkpoint(f"{out_dir}/ckpt", extra={"step": 2})
    buckets = list(eng.weight_buckets(200_000))
    res["n_buckets"] = len(buckets)
    res["buckets"] = {k: v for b in buckets for k, v in b} if rank == 0 else {}
    res["mega"].append(_step(eng, ids, mask, pos, rmask))
    del eng
    # Resume the TP=2 checkpoint at TP=1 × DP=2: the third step must match.
    eng = _engine(path, 1, optim=OPT, total_optimizer_steps=STEPS)
    res["extra"] = eng.load_checkpoint(f"{out_dir}/ckpt")
    res["resumed"] = _step(eng, *_rows(rank, WS, ids, mask, pos, rmask))
    del eng

    eng = _engine(path, 2, optim=OPT, total_optimizer_steps=STEPS, gradient_checkpointing=True)
    res["recompute"] = _step(eng, ids, mask, pos, rmask)
    del eng

    val = _engine(paths["llama"], 2, kind="value", optim=OptimConfig(lr=1e-2), total_optimizer_steps=2)
    ids, mask, pos, rmask = _batch(LLAMA["vocab_size"])
    v0 = val.values(ids, mask, pos, R)
    res["v0"] = v0.detach()
    val.backward(((v0 - 1.0) ** 2 * rmask).sum() / rmask.sum())
    res["v_stats"] = val.step()
    with torch.no_grad():
        res["v1"] = val.values(ids, mask, pos, R)
        val.pack_mode = "block_mask"
        res["v1_packed"] = val.values(ids, mask, pos, R)
    return res


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron")
    paths = {"qwen2": _qwen2_path(), "llama": _llama_path(out)}
    ranks = run_ranks(_worker, out, paths, world=WS)
    return {"dir": out, "ranks": ranks, "paths": paths}


def _hf_reference(path, ids, mask, pos):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ls = torch.log_softmax(logits[:, -R - 1:-1], -1)
    return logits, ls.gather(-1, ids[:, -R:, None]).squeeze(-1), -(ls.exp() * ls).sum(-1)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_logits_log_probs_entropy_equal_transformers_at_tp2_and_tp1(run, family):
    path = run["paths"][family]
    ids, mask, pos, rmask = _batch(3000 if family == "qwen2" else LLAMA["vocab_size"])
    logits, lp, ent = _hf_reference(path, ids, mask, pos)
    valid = mask.bool()
    for tp in (2, 1):
        if tp == 2:  # both ranks of the TP group hold the whole batch
            got = [run["ranks"][r][f"{family}/logits_tp2"] for r in range(WS)]
            assert torch.equal(got[0], got[1])
            got_lg, got_lp, got_ent = got[0], run["ranks"][0][f"{family}/lp_tp2"], run["ranks"][0][f"{family}/ent_tp2"]
        else:  # DP=2: each rank its half
            got_lg, got_lp, got_ent = (torch.cat([run["ranks"][r][f"{family}/{k}_tp1"] for r in range(WS)])
                                       for k in ("logits", "lp", "ent"))
        assert got_lg.shape == logits.shape
        assert (got_lg - logits)[valid].abs().max() < 1e-4, tp
        keep = rmask.bool()
        assert (got_lp - lp)[keep].abs().max() < 1e-4, tp
        assert (got_ent - ent)[keep].abs().max() < 1e-4, tp


def test_packed_rows_give_each_sample_its_own_logits(run):
    assert run["ranks"][0]["packed"] < 1e-4


def test_remove_padding_packs_with_the_same_results(run):
    """Packed rows (block-diagonal mask) = padded rows at TP=2, log-probs, entropy, values."""
    r0 = run["ranks"][0]
    keep = _batch(3000)[3].bool()
    assert (r0["rp_lp"] - r0["qwen2/lp_tp2"])[keep].abs().max() < 1e-5
    assert (r0["rp_ent"] - r0["qwen2/ent_tp2"])[keep].abs().max() < 1e-5
    keep = _batch(LLAMA["vocab_size"])[3].bool()
    assert r0["v1"][keep].abs().min() > 0 and (r0["v1_packed"] - r0["v1"])[keep].abs().max() < 1e-5


def test_three_steps_at_tp2_match_fsdp(run):
    r0, r1 = run["ranks"]
    assert r0["dp"] == (0, 1) and r1["dp"] == (0, 1)  # TP=2 on 2 ranks: one DP slice
    fsdp = [s["loss"] for s in r0["fsdp"]]
    mega = [s["loss"] for s in r0["mega"]]
    assert mega[2] < mega[0]
    for a, b in zip(fsdp, mega):
        assert abs(a - b) <= 1e-4 * abs(a), (fsdp, mega)
    for a, b in zip(r0["fsdp"], r0["mega"]):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"]
        assert a["lr"] == pytest.approx(b["lr"])
    assert [s["loss"] for s in r1["mega"]] == mega  # TP ranks agree


def test_gradient_checkpointing_gives_the_same_gradient(run):
    r0 = run["ranks"][0]
    assert r0["recompute"]["grad_norm"] == pytest.approx(r0["mega"][0]["grad_norm"], rel=1e-6)


def test_checkpoint_resumes_at_another_tp_size_and_merges(run):
    from verlcli.engine import load_full_state_dict, read_meta

    r0, r1 = run["ranks"]
    assert r0["extra"] == {"step": 2}
    assert abs(r0["resumed"]["loss"] - r0["mega"][2]["loss"]) <= 1e-5 * abs(r0["mega"][2]["loss"])
    meta = read_meta(run["dir"] / "ckpt")
    assert meta["strategy"] == "megatron" and meta["tensor_parallel_size"] == 2
    sd = load_full_state_dict(run["dir"] / "ckpt")  # what merge-checkpoint writes out
    assert set(sd) == set(r0["buckets"])
    for k, v in r0["buckets"].items():
        assert torch.equal(sd[k], v), k


def test_weight_buckets_are_bounded_and_complete(run):
    from safetensors.torch import load_file

    r0 = run["ranks"][0]
    assert r0["n_buckets"] > 3
    base = load_file(os.path.join(run["paths"]["qwen2"], "model.safetensors"))
    names = set(base) | {"lm_head.weight"}
    assert set(r0["buckets"]) == names
    assert torch.equal(r0["buckets"]["lm_head.weight"], r0["buckets"]["model.embed_tokens.weight"])
    assert r0["params"][1] == sum(v.numel() for k, v in base.items() if k != "lm_head.weight")


def test_value_model_starts_at_zero_and_trains(run):
    r0, r1 = run["ranks"]
    assert r0["v0"].shape == (B, R) and r0["v0"].abs().max() == 0
    assert r0["v_stats"]["grad_norm"] > 0
    assert torch.equal(r0["v1"], r1["v1"]) and r0["v1"].abs().max() > 0
