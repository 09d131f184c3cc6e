"""prepare-data → sft (tiny model, Ray world size 2) → merge-checkpoint --verify → eval,
plus a LoRA run that must merge into weights different from the base."""

import json

from e2e_helpers import ok, verl


def _sft(workdir, run, *extra):
    return ok(verl("sft", "--preset", "tiny-cpu", f"trainer.run_dir={run}",
                   "data.train_files=[data/arithmetic/sft_train.parquet]",
                   "data.val_files=[data/arithmetic/sft_test.parquet]",
                   "trainer.total_steps=3", "trainer.val_every=3", "trainer.save_every=3",
                   "sft.batch_sequences=8", "sft.micro_batch_sequences_per_device=2",
                   "sft.optim.lr=1e-3", "logging.progress_bar=false", *extra, cwd=workdir))


def test_sft_merge_verify_eval_deterministic(workdir):
    run = workdir / "runs" / "sft"
    _sft(workdir, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert any("val/loss" in r for r in rows)

    ckpt = run / "checkpoints" / "step_3"
    hf = workdir / "hf_sft"
    # --verify reloads the export with transformers and compares logits with the checkpoint
    ok(verl("merge-checkpoint", ckpt, "--out", hf, "--verify", cwd=workdir))
    assert (hf / "model.safetensors").exists() and (hf / "config.json").exists()
    assert any(hf.glob("tokenizer*"))

    outs = []
    for name in ("e1", "e2"):
        out = workdir / "evals" / name
        ok(verl("eval", "--model", hf, "--data", "data/arithmetic/test.parquet", "--n", "2", "--limit", "6",
                "--engine", "hf", "--max-tokens", "8", "--seed", "3", "--out", out, cwd=workdir))
        outs.append(json.loads((out / "metrics.json").read_text()))
        assert (out / "generations.jsonl").exists()
    assert outs[0] == outs[1]  # same data, same seed → same metrics


def test_lora_sft_merges_into_new_weights(workdir):
    run = workdir / "runs" / "sft_lora"
    _sft(workdir, run, "model.lora.rank=4", "model.lora.alpha=8", "resources.devices_per_node=1", "launcher=local")
    hf = workdir / "hf_lora"
    r = ok(verl("merge-checkpoint", run / "checkpoints" / "step_3", "--out", hf, "--verify", cwd=workdir))
    assert "lora" in (r.stdout + r.stderr).lower()
    from safetensors.torch import load_file

    from verlcli.models.resolve import resolve_model

    merged = load_file(str(hf / "model.safetensors"))
    base = load_file(str(resolve_model("tiny-qwen2") / "model.safetensors"))
    changed = [k for k in base if k in merged and not (merged[k] == base[k]).all()]
    assert any("q_proj" in k for k in changed), "LoRA merge equals the base model"
