"""One rollout call, three ways, on the same vLLM engine kind (issue 15: why was verl's generation
slower than TRL's colocated vLLM on the same token count?).

In ONE process, alternating calls so that machine load hits all of them alike:
  * `verl`      — verl's `VLLMRollout.generate` (our engine settings and sampling parameters);
  * `verl-raw`  — the same engine, a bare `llm.generate` with our SamplingParams (what our wrapper
                  adds: PrivateRNG swap, output conversion);
  * `trl`       — an `LLM(...)` built with TRL 1.16's colocate arguments (max_num_seqs = the batch,
                  max_num_batched_tokens=4096) and TRL's SamplingParams (logprobs=0, detokenize on);
  * `verl@nice15` — `verl` with every thread of this process at nice 15, where Ray put its workers
                  before verl started its local Ray with worker_niceness = the driver's (needs root
                  to come back to nice 0; skipped otherwise). Only differs from `verl` on a busy machine.
Every call: the same prompts (arithmetic, chat template), n=1 per row, temperature 0.8,
`ignore_eos` so each call makes exactly rows × max_tokens tokens.

    python bench/gen_call.py --rows 32 --max-tokens 64 --reps 5 --out bench/results/gen_call.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prompts(rows: int, model_path: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = [f"Compute {a} {op} {b}. Put the final answer after ####." for a, op, b in
             ((3 + i % 17, "+*"[i % 2], 2 + i % 13) for i in range(rows))]
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                     tokenize=False) for t in texts]
    return [tok(c, add_special_tokens=False).input_ids for c in chats]


def set_nice(value: int) -> None:
    # Linux nice values are per thread: set the main thread and every OpenMP/helper thread.
    for tid in os.listdir("/proc/self/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), value)


def niced(call):
    def run():
        set_nice(15)
        try:
            return call()
        finally:
            set_nice(0)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", default="verl,verl-raw,trl,verl@nice15")
    p.add_argument("--out")
    a = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from verlcli.models.resolve import resolve_model
    from verlcli.rollout import SamplingSpec, make_rollout

    path = str(resolve_model("smollm2-135m-instruct"))
    ids = prompts(a.rows, path)
    max_len = max(map(len, ids)) + a.max_tokens + 8
    ours = make_rollout("vllm", path, device="cpu", dtype=a.dtype, max_model_len=max_len, seed=0)
    spec = SamplingSpec(n=1, temperature=0.8, max_tokens=a.max_tokens, ignore_eos=True)
    calls = {
        "verl": lambda: ours.generate(ids, spec),
        "verl-raw": lambda: ours.llm.generate([{"prompt_token_ids": x} for x in ids], ours._params(spec, 1),
                                              use_tqdm=False),
    }
    if "trl" in a.only:
        trl = LLM(model=path, max_model_len=max_len, max_num_seqs=a.rows, seed=0, max_num_batched_tokens=4096,
                  logprobs_mode="processed_logprobs", enforce_eager=True, dtype=a.dtype,
                  kv_cache_memory_bytes=1 << 30)  # = the VLLM_CPU_KVCACHE_SPACE=1 the TRL side runs with
        trl_params = SamplingParams(n=1, repetition_penalty=1.0, temperature=0.8, top_p=1.0, top_k=0, min_p=0.0,
                                    max_tokens=a.max_tokens, logprobs=0, ignore_eos=True)
        calls["trl"] = lambda: trl.generate([{"prompt_token_ids": x} for x in ids], trl_params, use_tqdm=False)
    if os.geteuid() == 0:
        calls["verl@nice15"] = niced(calls["verl"])
    names = [n for n in a.only.split(",") if n in calls]
    times = {n: [] for n in names}
    for n in names:
        calls[n]()  # warm-up
    for _ in range(a.reps):
        for n in names:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
            print(f"{n:12s} {times[n][-1]:.3f} s", flush=True)  # a cut-short run still tells something
    tokens = a.rows * a.max_tokens
    out = {n: {"median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t), "all_s": t}
           for n, t in times.items()}
    for n, r in out.items():
        print(f"{n:12s} median {r['median_s']:.3f} s  {r['tokens_per_s']:.0f} tok/s  ({', '.join(f'{x:.2f}' for x in r['all_s'])})")
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": vars(a), "tokens_per_call": tokens, "results": out,
                                           "load_avg_at_end": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
