"""verl merge-checkpoint on real engine checkpoints of tiny-qwen2 (CPU, gloo).

A module fixture trains one step and saves with `FSDPEngine.save_checkpoint`: at world size 1
(in this process, a 1-rank gloo group) a full actor; at world size 2 (two spawned processes)
a full actor + critic run dir, a LoRA actor after one step, and a LoRA actor saved before any
step (an all-zero adapter). Each job also writes the engine's own `full_state_dict()` so the
merged weights can be checked against what was trained.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from verlcli.errors import UserError
from verlcli.merge import VerificationError, merge_checkpoint, resolve_role_dir

from _data import arith_parquet

os.environ.setdefault("OMP_NUM_THREADS", "1")
LR = 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_and_save(engine, kind: str, steps: int, rank: int, path, ref_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(10, 3000, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    pos = torch.arange(10).expand(2, 10)
    for _ in range(steps):
        if kind == "value":
            loss = ((engine.values(ids, mask, pos, 4) - 1.0) ** 2).mean()
        else:
            loss = -engine.log_probs(ids, mask, pos, 6)[0].mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(path, {"step": steps})
    sd = engine.full_state_dict()  # collective
    if rank == 0:
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(ref_path))


def _jobs(world_size):
    from verlcli.config.schema import LoraConfig

    lora = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    jobs = [("run", "actor", "causal_lm", None, 1)]
    if world_size == 2:  # the rest at world size 2: merging must not care how it was sharded
        jobs += [("run", "critic", "value", None, 1), ("lora", "actor", "causal_lm", lora, 1),
                 ("lorazero", "actor", "causal_lm", lora, 0)]
    return jobs


def _save_all(rank, world_size, root):
    from verlcli.config.schema import OptimConfig
    from verlcli.engine import FSDPEngine
    from verlcli.models.resolve import resolve_model

    model = resolve_model("tiny-qwen2")
    for name, role, kind, lora_cfg, steps in _jobs(world_size):
        eng = FSDPEngine(model, kind=kind, optim=OptimConfig(lr=LR), total_optimizer_steps=4,
                         device="cpu", compute_dtype="float32", lora=lora_cfg, seed=1)
        step_dir = f"{root}/{name}/checkpoints/step_{steps}"
        _train_and_save(eng, kind, steps, rank, f"{step_dir}/{role}", f"{root}/{name}_{role}_ref.safetensors")
        del eng


def _worker(rank, world_size, port, root):
    """One rank of the 2-rank job (module level: spawn pickles it by name)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    _save_all(rank, world_size, root)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{world size: root}. World size 2 in spawned processes; world size 1 in this process
    (a 1-rank gloo group, destroyed afterwards) while they start up."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    roots = {ws: tmp_path_factory.mktemp(f"ckpt_ws{ws}") for ws in (1, 2)}
    job = mp.start_processes(_worker, args=(2, _free_port(), str(roots[2])), nprocs=2, join=False,
                             start_method="spawn")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        _save_all(0, 1, roots[1])
    finally:
        dist.destroy_process_group()
    while not job.join():
        pass
    return roots


def _ref(root, name, role):
    from safetensors.torch import load_file

    return load_file(str(root / f"{name}_{role}_ref.safetensors"))


def _assert_weights_equal(out_dir, ref: dict, allow_missing=("lm_head.weight",)):
    from safetensors.torch import load_file

    got = {}
    for f in out_dir.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(ref) - set(got) <= set(allow_missing)
    assert set(got) <= set(ref)
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-6, msg=k)


# ------------------------------------------------------------------ full fine-tuning


def test_merge_step_dir_means_actor_and_verify(ckpts, tmp_path):
    root = ckpts[1]
    step = root / "run" / "checkpoints" / "step_1"
    info = merge_checkpoint(step, verify=True)
    out = step / "huggingface"  # the documented default
    assert info["out"] == str(out) and info["kind"] == "causal_lm" and info["checkpoint"] == str(step / "actor")
    assert info["verify"]["ok"] and info["verify"]["max_abs_diff"] <= 1e-4
    names = {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    _assert_weights_equal(out, _ref(root, "run", "actor"))
    # it loads as a plain HF model and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = tok("1 + 1 =", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_merge_world_size_2_checkpoint(ckpts, tmp_path):
    root = ckpts[2]
    info = merge_checkpoint(root / "run" / "checkpoints" / "step_1" / "actor", out=tmp_path / "hf", verify=True)
    assert info["world_size"] == 2 and info["verify"]["ok"]
    _assert_weights_equal(tmp_path / "hf", _ref(root, "run", "actor"))


def test_merge_critic_and_bfloat16(ckpts, tmp_path):
    root = ckpts[2]
    info = merge_checkpoint(root / "run" / "checkpoints" / "step_1" / "critic", out=tmp_path / "critic",
                            dtype="bfloat16", verify=True)
    assert info["kind"] == "value" and info["verify"]["ok"]
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "critic")
    assert model.config.num_labels == 1 and model.score.weight.dtype == torch.bfloat16
    ref = _ref(root, "run", "critic")["score.weight"]
    torch.testing.assert_close(model.score.weight.float(), ref.to(torch.bfloat16).float())
    assert ref.abs().max() > 0  # the value head was trained (it starts at zero)


# ------------------------------------------------------------------ LoRA


def test_lora_merge_differs_from_base_and_matches_engine(ckpts, tmp_path):
    root = ckpts[2]
    ckpt = root / "lora" / "checkpoints" / "step_1" / "actor"
    info = merge_checkpoint(ckpt, out=tmp_path / "merged", verify=True)
    assert info["lora"]["weights_changed"] == 8  # q_proj and v_proj in 4 layers
    assert info["verify"]["ok"]
    # equal to the engine's own merge (W + alpha/r·B·A), different from the base model
    from safetensors.torch import load_file

    from verlcli.models.resolve import resolve_model

    _assert_weights_equal(tmp_path / "merged", _ref(root, "lora", "actor"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(resolve_model("tiny-qwen2") / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], base[key])
    assert not any("lora" in k or "base_layer" in k for k in merged)


def test_lora_adapter_export(ckpts, tmp_path):
    root = ckpts[2]
    info = merge_checkpoint(root / "lora" / "checkpoints" / "step_1", out=tmp_path / "adapter", lora="adapter",
                            verify=True)
    assert info["verify"]["ok"] and info["lora"]["mode"] == "adapter"
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "config.json" not in names and "model.safetensors" not in names
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"]


def test_zero_lora_adapter_is_a_loud_error(ckpts, tmp_path):
    ckpt = ckpts[2] / "lorazero" / "checkpoints" / "step_0"
    with pytest.raises(UserError, match="all zeros"):
        merge_checkpoint(ckpt, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------ bad input and guards


def test_bad_inputs_name_path_and_fix(tmp_path, ckpts):
    with pytest.raises(UserError, match="does not exist") as e:
        resolve_role_dir(tmp_path / "missing")
    assert e.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a training checkpoint") as e:
        resolve_role_dir(tmp_path / "empty")
    assert str(tmp_path / "empty") in e.value.message
    with pytest.raises(UserError) as e:  # a run's checkpoints/ dir: suggests the newest step
        resolve_role_dir(ckpts[1] / "run" / "checkpoints")
    assert "step_1" in e.value.fix
    step = ckpts[1] / "run" / "checkpoints" / "step_1"
    with pytest.raises(UserError, match="replace the checkpoint"):
        merge_checkpoint(step, out=ckpts[1] / "run")
    with pytest.raises(UserError, match="no LoRA adapter"):
        merge_checkpoint(step, out=tmp_path / "x", lora="adapter")
    with pytest.raises(UserError, match="--dtype"):
        merge_checkpoint(step, out=tmp_path / "x", dtype="float16")


def test_strict_keys_catch_a_mismatched_config(ckpts, tmp_path):
    import shutil

    src = ckpts[1] / "run" / "checkpoints" / "step_1" / "actor"
    bad = tmp_path / "actor"
    shutil.copytree(src, bad)
    good = json.loads((bad / "hf" / "config.json").read_text())
    cfg = {**good, "num_hidden_layers": 3}  # the weights have 4 layers
    cfg.pop("layer_types", None)
    (bad / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="unexpected"):
        merge_checkpoint(bad, out=tmp_path / "out")
    (bad / "hf" / "config.json").write_text(json.dumps({**good, "intermediate_size": 128}))
    with pytest.raises(UserError, match="other shapes"):
        merge_checkpoint(bad, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_failure_exits_1_and_writes_nothing(ckpts, tmp_path):
    from typer.testing import CliRunner

    from verlcli.cli import app

    step = ckpts[1] / "run" / "checkpoints" / "step_1"
    r = CliRunner().invoke(app, ["merge-checkpoint", str(step), "--out", str(tmp_path / "o"), "--verify",
                                 "--dtype", "bfloat16", "--tolerance", "1e-9"])
    assert r.exit_code == 1, r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["merge-checkpoint", str(step), "--out", str(tmp_path / "o"), "--verify"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_eval_accepts_a_checkpoint_dir(ckpts, tmp_path):
    """--model CKPT_DIR merges to a temp dir and generates (hf engine, greedy)."""
    from verlcli.evaluation import EvalOptions, evaluate

    data = arith_parquet(tmp_path / "d.parquet", 2)
    res = evaluate(EvalOptions(model=str(ckpts[1] / "run" / "checkpoints" / "step_1"), data=str(data),
                               engine="hf", max_tokens=4, out=str(tmp_path / "ev"), reward_workers=0))
    assert res.info["merged_from"].endswith("actor")
    assert res.metrics["arithmetic"]["num_prompts"] == 2
    with pytest.raises(UserError, match="critic"):
        evaluate(EvalOptions(model=str(ckpts[2] / "run" / "checkpoints" / "step_1" / "critic"), data=str(data),
                             engine="hf", out=str(tmp_path / "ev2")))


@pytest.mark.slow
def test_merged_lora_checkpoint_loads_in_vllm(ckpts, tmp_path):
    """The export loads in vLLM and generates what transformers generates (fp32, greedy)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # missing, or broken by a mismatched torchvision
        pytest.skip(f"vllm not importable: {e}")
    from verlcli.evaluation import EvalOptions, evaluate

    data = arith_parquet(tmp_path / "d.parquet", 3)
    ckpt = str(ckpts[2] / "lora" / "checkpoints" / "step_1")
    res = {eng: evaluate(EvalOptions(model=ckpt, data=str(data), engine=eng, max_tokens=8, dtype="float32",
                                     out=str(tmp_path / eng), reward_workers=0)) for eng in ("vllm", "hf")}
    assert [r["response"] for r in res["vllm"].rows] == [r["response"] for r in res["hf"].rows]
