"""Helpers of bench/gpu_check.sh (the lent GPU machine: no network, no Ray, no vLLM).

    python bench/gpu_check.py model NAME OUT_DIR   # random-init Qwen2.5 shape → HF directory
    python bench/gpu_check.py summary LABEL RUN_DIR [PLAN_LOG] [--out FILE.jsonl]

`model` writes config + bf16 safetensors with the published Qwen2.5 shapes (152k vocab,
tied embeddings) and the built-in tiny-qwen2 tokenizer: nothing to download, and ids the
tokenizer does not know decode to nothing, which a throughput check does not mind.
`summary` prints one line per run from its metrics.jsonl: per-phase seconds, actor-update
MFU, generation tokens/s, weight-sync GB/s and peak GPU memory (median over steps ≥ 2, step
1 warms up), next to `verl plan`'s peak and step-time estimate when a plan log is given.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=True)
SHAPES = {  # from the models' published config.json files
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, **COMMON),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, **COMMON),
    # a smoke-test shape so the script itself can be tried on a CPU machine
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=True),
}


def build_model(name: str, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from verlcli.models.tiny_qwen2 import build_tokenizer

    tok = build_tokenizer()
    pad, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, **SHAPES[name])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # init on the GPU: seconds, not a minute
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"[gpu_check] {name}: {n / 1e6:.0f}M parameters → {out}", flush=True)


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def summarize(label: str, run: Path, plan_log: Path | None) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "score/mean" in r]
    warm = [r for r in steps if r["step"] >= 2] or steps
    out = {"run": label, "steps": len(steps)}
    for key in sorted({k for r in warm for k in r if k.startswith("timing/")}):
        out[key] = _median(warm, key)
    for key in ("perf/mfu_actor_update", "perf/gen_tokens_per_s", "perf/tokens_per_s", "sync/gbps", "sync/s",
                "mem/peak_gpu_gb", "mem/peak_rss_gb", "response/length_mean"):
        out[key] = _median(warm, key)
    peaks = [r["mem/peak_gpu_gb"] for r in steps if "mem/peak_gpu_gb" in r]
    out["mem/peak_gpu_gb"] = max(peaks) if peaks else None  # the peak over the run, not a median
    if plan_log and plan_log.exists():
        text = plan_log.read_text()
        verdict = re.search(r"verdict: .*?(?:\n\S.*?)*?(?=\n[a-z]+\b|\Z)", text)
        step = re.search(r"time per step ≈ ([\d.]+) s", text)
        peak = re.search(r"peak ([\d.]+) of ([\d.]+) GiB", text)
        out["plan/verdict"] = " ".join(verdict.group(0).split()) if verdict else None
        out["plan/step_s"] = float(step.group(1)) if step else None
        out["plan/peak_gpu_gb"] = float(peak.group(1)) if peak else None
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv: list[str]) -> int:
    if argv[:1] == ["model"] and len(argv) == 3:
        build_model(argv[1], Path(argv[2]))
        return 0
    if argv[:1] == ["summary"] and len(argv) >= 3:
        out_file = None
        if "--out" in argv:
            i = argv.index("--out")
            out_file, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
        res = summarize(argv[1], Path(argv[2]), Path(argv[3]) if len(argv) > 3 else None)
        print("[gpu_check] " + " | ".join(f"{k.split('/')[-1] if k.startswith('timing/') else k}={_fmt(v)}"
                                          for k, v in res.items()), flush=True)
        if out_file:
            with open(out_file, "a") as f:
                f.write(json.dumps(res) + "\n")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
