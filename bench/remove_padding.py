"""Padded rows vs packed rows in the RL forwards (issue 15): which attention is fastest here.

A GRPO mini-batch like `smollm2-135m-cpu`'s (32 sequences there; 16 by default here, so that a
run fits in 10 minutes on a busy 2-core machine): prompts ~46 tokens, responses 10–64 tokens,
rows sorted by length as `HybridWorker._update` does, cut into micro-batches of 8 (update: forward + backward of the log-probs) and of 16
(the no-grad log-prob pass, `_forward_rows`: log-probs + entropy). Every mode runs through the
real `FSDPEngine` (1 rank, gloo) on the same rows, modes interleaved within each repeat so that
a busy machine slows all of them alike; medians over repeats.

Modes: `padded` (today's trimmed rows: `[B, T]` with a 2D mask), and the packed modes of
`verlcli/engine/packing.py`: `varlen` (per-sequence attention), `block_mask` (additive
block-diagonal mask, one SDPA), `position_ids` (transformers builds the mask). The packed
log-probs are checked against the padded ones before timing.

    OMP_NUM_THREADS=1 python bench/remove_padding.py --out bench/results/remove_padding.json
    python bench/remove_padding.py --repeats 1 --sequences 8      # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

MODES = ("padded", "varlen", "block_mask", "position_ids")


def mini_batch(n: int, seed: int, prompt=(40, 52), response=(10, 64), vocab=49000):
    """Rows in the worker layout (seq.build_rows), sorted by real length like `_update`."""
    from verlcli.workers.seq import position_ids

    g = torch.Generator().manual_seed(seed)
    P, R = prompt[1], response[1]
    ids = torch.randint(100, vocab, (n, P + R), generator=g)
    mask = torch.zeros(n, P + R, dtype=torch.long)
    for i in range(n):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        r = int(torch.randint(response[0], response[1] + 1, (1,), generator=g))
        mask[i, P - p:P + r] = 1
    order = torch.argsort(mask.sum(-1), stable=True)
    ids, mask = ids[order], mask[order]
    return ids.masked_fill(mask == 0, 0), mask, position_ids(mask), R


def trim(ids, mask, pos, R):
    """seq.trim on raw tensors: drop the columns that are padding in every row."""
    P = ids.shape[1] - R
    left = int(mask[:, :P].any(0).nonzero()[0])
    r_keep = int(mask[:, P:].any(0).nonzero()[-1]) + 1
    sl = slice(left, P + r_keep)
    return ids[:, sl], mask[:, sl], pos[:, sl], r_keep


def run_mode(engine, mode, micro, grad: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for all micro-batches of one pass."""
    engine.pack_mode = None if mode == "padded" else mode
    t, c = time.perf_counter(), time.process_time()
    for ids, mask, pos, r in micro:
        if grad:
            lp, _ = engine.log_probs(ids, mask, pos, r)
            (lp * mask[:, -r:]).sum().backward()
        else:
            with torch.no_grad():
                engine.log_probs(ids, mask, pos, r, with_entropy=True)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sequences", type=int, default=16, help="rows in the mini-batch")
    ap.add_argument("--micro", type=int, default=8, help="rows per update micro-batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON (and the table as .md beside it)")
    args = ap.parse_args()

    from verlcli.config.schema import OptimConfig
    from verlcli.engine import packing
    from verlcli.engine.fsdp import FSDPEngine
    from verlcli.models.resolve import resolve_model

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # varlen's attention falls back to SDPA without cu_seq_lens, so one model serves all modes.
    engine = FSDPEngine(resolve_model(args.model), optim=OptimConfig(), device=device,
                        remove_padding="varlen")
    ids, mask, pos, R = mini_batch(args.sequences, args.seed)
    passes = {
        "update": ([trim(*t, R) for t in zip(*(x.split(args.micro) for x in (ids, mask, pos)))], True),
        "log_prob": ([trim(*t, R) for t in zip(*(x.split(args.micro * 2) for x in (ids, mask, pos)))], False),
    }
    tokens = int(mask.sum())
    slots = sum(m.numel() for _, m, _, _ in passes["update"][0])

    with torch.no_grad():  # packed = padded, before anything is timed
        a, b, c, r = passes["log_prob"][0][0]
        engine.pack_mode = None
        ref = engine.log_probs(a, b, c, r, with_entropy=True)
        for mode in MODES[1:]:
            engine.pack_mode = mode
            got = engine.log_probs(a, b, c, r, with_entropy=True)
            m = b[:, -r:].bool()
            err = max(float((x - y)[m].abs().max()) for x, y in zip(ref, got))
            assert err < 1e-3, f"{mode}: packed log-probs differ from padded by {err}"

    times = {p: {m: [] for m in MODES} for p in passes}
    cpu = {p: {m: [] for m in MODES} for p in passes}
    for rep in range(args.repeats + 1):  # repeat 0 (one micro-batch) warms up allocators and kernels
        for name, (micro, grad) in passes.items():
            for mode in MODES:
                s, c = run_mode(engine, mode, micro if rep else micro[:1], grad)
                engine.model.zero_grad(set_to_none=True)
                if rep:
                    times[name][mode].append(s)
                    cpu[name][mode].append(c)
                    print(f"repeat {rep} {name} {mode}: {s:.2f} s wall, {c:.2f} s CPU", flush=True)
                    if args.out:  # what is measured so far survives a timeout
                        from verlcli.io import write_json_atomic

                        write_json_atomic(args.out, {"partial": True, "seconds": times, "cpu_seconds": cpu})
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "cpu_model": _cpu_model(), "device": device, "dtype": str(engine.compute_dtype),
        "flash_attn": packing.flash_attn_available(), "model": args.model,
        "sequences": args.sequences, "micro_batch": args.micro, "real_tokens": tokens,
        "padded_slots_update": slots, "repeats": args.repeats,
        "seconds": {p: {m: statistics.median(v) for m, v in d.items()} for p, d in times.items()},
        # One thread: CPU seconds are the work itself, less disturbed by a busy machine.
        "cpu_seconds": {p: {m: statistics.median(v) for m, v in d.items()} for p, d in cpu.items()},
    }
    table = _table(result)
    print(table)
    if args.out:
        from verlcli.io import write_json_atomic, write_text_atomic

        write_json_atomic(args.out, result)
        write_text_atomic(Path(args.out).with_suffix(".md"), table + "\n")
    dist.destroy_process_group()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _table(r: dict) -> str:
    lines = [f"{r['model']}, {r['dtype']}, {r['cpu_model']} ({r['machine']}); "
             f"{r['sequences']} sequences, {r['real_tokens']} real tokens, "
             f"{r['padded_slots_update']} slots after trimming (micro-batches of {r['micro_batch']}); "
             f"median of {r['repeats']}; (n×) = padded / mode",
             "", "| pass | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for key, unit in (("cpu_seconds", "CPU s"), ("seconds", "wall s")):
        for p, d in r[key].items():
            base = d["padded"]
            cells = [f"{d[m]:.2f} ({base / d[m]:.2f}×)" for m in MODES]
            lines.append(f"| {p}, {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
