"""`verl sft` in one process (launcher=local, tiny-qwen2, fp32): the loss goes down, packed
and unpacked batches give the same loss through the FSDP engine, LoRA trains only the
adapters, and a resumed run continues exactly where an uninterrupted one would be."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from verlcli.config.loader import load_config
from verlcli.data.batch import Batch
from verlcli.distributed import make_worker_group
from verlcli.trainer.sft import run_sft, to_sample_batch
from verlcli.workers.sft import SFTWorker

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

PAIRS = [(3, 4), (2, 5), (6, 1), (4, 4), (7, 2), (1, 8)]


def _write_data(tmp) -> tuple[str, str]:
    """prompt + response (train) and multi-turn messages (validation), tiny and short."""
    train = pa.table({
        "prompt": [[{"role": "user", "content": f"{a} + {b} ="}] for a, b in PAIRS],
        "response": [f"{a + b}" for a, b in PAIRS],
    })
    val = pa.table({"messages": [[
        {"role": "user", "content": f"{a} + {b} ="}, {"role": "assistant", "content": f"{a + b}"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": f"{a + b}"},
    ] for a, b in PAIRS[:3]]})
    paths = str(tmp / "train.parquet"), str(tmp / "val.parquet")
    pq.write_table(train, paths[0])
    pq.write_table(val, paths[1])
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("sft_data"))


def _cfg(data, run_dir, *extra):
    train, val = data
    return load_config(overrides=[
        "model.path=tiny-qwen2", f"data.train_files=[{train}]", f"data.val_files=[{val}]",
        "launcher=local", "resources.device=cpu", "resources.devices_per_node=1", "resources.compute_dtype=float32",
        "sft.max_length_tokens=64", "sft.batch_sequences=4", "sft.micro_batch_sequences_per_device=2",
        "sft.optim.lr=3e-3", "sft.optim.schedule=constant", "sft.optim.weight_decay=0.0",
        f"trainer.run_dir={run_dir}", "trainer.val_before_train=true", "trainer.val_every=3",
        "logging.backends=[jsonl]", "logging.progress_bar=false", *extra,
    ])


def _metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(r)
    return out


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("full")
    last = run_sft(_cfg(data, run, "trainer.total_steps=6", "trainer.save_every=3"))
    return run, last


def test_loss_goes_down_with_validation_and_checkpoints(full_run):
    run, last = full_run
    m = _metrics(run)
    assert sorted(m) == list(range(7))  # step 0: validation before training
    losses = [m[s]["train/loss"] for s in range(1, 7)]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.75 * losses[0], losses
    assert m[6]["val/loss"] < m[0]["val/loss"] and "val/loss" in m[3]
    for s in range(1, 7):
        assert m[s]["train/lr"] == pytest.approx(3e-3)
        assert m[s]["train/grad_norm"] > 0 and m[s]["perf/tokens_per_s"] > 0
        assert m[s]["timing/train_s"] > 0 and m[s]["perf/padding_efficiency"] <= 1.0
    assert m[6]["train/epoch"] == pytest.approx(4.0)  # 6 steps × 4 samples over 6 samples
    assert last["train/loss"] == losses[-1]
    for step in (3, 6):
        ckpt = run / "checkpoints" / f"step_{step}"
        assert (ckpt / "trainer.json").exists() and (ckpt / "actor" / "model").is_dir()
        assert json.loads((ckpt / "trainer.json").read_text())["step"] == step


def test_resume_continues_at_the_right_step_with_the_same_data(data, full_run, tmp_path):
    full, _ = full_run
    run_sft(_cfg(data, tmp_path, "trainer.total_steps=3"))  # stops mid-epoch (12 samples of 6)
    first = _metrics(tmp_path)
    assert max(first) == 3
    run_sft(_cfg(data, tmp_path, "trainer.total_steps=6", "trainer.resume=auto"))
    m, ref = _metrics(tmp_path), _metrics(full)
    assert sorted(m) == list(range(7))  # steps 4..6 appended, nothing repeated
    for s in range(1, 7):  # model, optimizer and data position restored: the same numbers
        assert m[s]["train/loss"] == pytest.approx(ref[s]["train/loss"], rel=1e-5), s
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_6"]
    # A finished run resumed again trains nothing.
    assert run_sft(_cfg(data, tmp_path, "trainer.total_steps=6")) == {}


def _group(data, tmp_path, *extra):
    cfg = _cfg(data, tmp_path, *extra)
    group = make_worker_group("local", SFTWorker, name="sft", resources={"device": "cpu"})
    params = group.setup(cfg=cfg.model_dump(mode="json"), total_steps=4)[0]
    return group, params


def _samples(data):
    from transformers import AutoTokenizer

    from verlcli.data.sft_dataset import load_sft_dataset
    from verlcli.models.resolve import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("tiny-qwen2")))
    return list(load_sft_dataset(data[0], tok, 64)) + list(load_sft_dataset(data[1], tok, 64))


def test_packed_and_unpacked_loss_agree_through_the_engine(data, tmp_path):
    group, _ = _group(data, tmp_path, "sft.packing=true")
    try:
        batch = to_sample_batch(_samples(data))
        worker = group.worker
        packed = group.eval_loss(batch)[0]
        worker.cfg.sft.packing = False
        unpacked = group.eval_loss(batch)[0]
        assert packed["count"] == unpacked["count"] > 0
        assert packed["sum"] / packed["count"] == pytest.approx(unpacked["sum"] / unpacked["count"], rel=1e-6)
        # And one training step from the same weights reports the same loss either way.
        worker.cfg.sft.packing = True
        step = group.train_step(batch)[0]
        assert step["train/loss"] == pytest.approx(packed["sum"] / packed["count"], rel=1e-6)
        assert step["perf/padding_efficiency"] > 0.6
    finally:
        group.shutdown()


def test_lora_trains_only_the_adapters(data, tmp_path):
    group, params = _group(data, tmp_path, "model.lora.rank=4", "model.lora.alpha=8")
    try:
        assert 0 < params["trainable_params"] < 0.1 * params["total_params"]
        model = group.worker.engine.model
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        batch = to_sample_batch(_samples(data)[:4])
        losses = [group.train_step(batch)[0]["train/loss"] for _ in range(3)]
        assert losses[-1] < losses[0]
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
        assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    finally:
        group.shutdown()


def test_sample_batch_keeps_ragged_token_lists():
    b = to_sample_batch([{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4], "loss_mask": [1]}])
    assert isinstance(b, Batch) and len(b) == 2 and list(b["input_ids"][1]) == [4]
