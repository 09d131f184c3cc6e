"""Actor → rollout weight sync: extra host memory, seconds and GB/s, whole-model vs buckets.

Two ranks (gloo) each hold an FSDP2 shard of the model and an in-process vLLM engine, as the
hybrid worker does. Each mode runs in fresh processes (the allocator keeps freed pages, so a
second mode in the same process would look cheaper than it is):

  full     the pre-bucket path: `full_state_dict()` (the whole fp32 model gathered on every
           rank), then `sync_weights(state)`                       (bucket = infinity, no cast)
  buckets  `sync_weight_buckets(weight_buckets(MB, rollout dtype))`  (what the worker runs)

Extra memory = peak RSS during the sync minus RSS just before it (after `malloc_trim`), sampled
every millisecond by a thread, max over ranks. Seconds = wall time of the whole sync (gather,
cast, load), median of --reps syncs on both ranks; GB/s = bytes handed to the engine / seconds
(fp32 for `full`, the rollout dtype for buckets).

    python bench/sync_memory.py [--model smollm2-135m-instruct] [--dtype bfloat16]
        [--modes full,buckets:256,buckets:32] [--reps 3] [--out bench/results/sync_memory.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Max RSS seen by a 1 ms sampling thread while the block runs."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        return False


def rank_main(mode: str, model: str, dtype: str, reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from verlcli.engine import make_engine
    from verlcli.models.resolve import resolve_model
    from verlcli.rollout import make_rollout

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    path = resolve_model(model)
    torch_dtype = getattr(torch, dtype)
    actor = make_engine(None, path, kind="causal_lm", optim=None, device="cpu", compute_dtype=dtype)
    rollout = make_rollout("vllm", path, device="cpu", dtype=dtype, max_model_len=256, seed=rank)
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    runs = []
    for _ in range(reps):
        dist.barrier()
        trim(0)
        start = time.perf_counter()  # gather + cast + load: the whole sync
        with PeakRSS() as mem:
            if mode == "full":
                stats = rollout.sync_weights(actor.full_state_dict())
            else:
                mb = int(mode.split(":")[1])
                stats = rollout.sync_weight_buckets(actor.weight_buckets(mb << 20, torch_dtype))
        wall = time.perf_counter() - start
        runs.append({"extra_gb": (mem.peak - mem.base) / 1e9, "base_gb": mem.base / 1e9, **stats,
                     "wall_s": wall, "wall_gbps": stats["sync_gb"] / wall})
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(runs))
    rollout.shutdown()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode: str, args, tmp: Path) -> dict:
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
        log = open(tmp / f"{mode.replace(':', '_')}.rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--rank-job", mode, "--model", args.model, "--dtype", args.dtype,
             "--reps", str(args.reps), "--out", str(tmp / mode.replace(":", "_"))],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    if any(p.wait() for p in procs):
        raise SystemExit(f"mode {mode} failed; logs in {tmp}")
    ranks = [json.loads((tmp / f"{mode.replace(':', '_')}.rank{r}.json").read_text()) for r in range(2)]
    runs = [r for rank in ranks for r in rank]
    return {
        "mode": mode,
        "peak_extra_gb": max(r["extra_gb"] for r in runs),
        "seconds": statistics.median(r["wall_s"] for r in runs),
        "gb": runs[0]["sync_gb"],
        "gbps": statistics.median(r["wall_gbps"] for r in runs),
        "buckets": runs[0].get("sync_buckets", 1.0),
        "rss_before_gb": max(r["base_gb"] for r in runs),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--modes", default="full,buckets:256,buckets:32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rank-job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_job:
        return rank_main(args.rank_job, args.model, args.dtype, args.reps, args.out)
    import tempfile

    from verlcli.models.resolve import resolve_model

    resolve_model(args.model)  # build a built-in once, before two ranks race for it
    tmp = Path(tempfile.mkdtemp(prefix="sync_bench_"))
    rows = [run_mode(m, args, tmp) for m in args.modes.split(",")]
    lines = ["| sync | buckets | peak extra RSS / rank (GB) | seconds | GB moved | GB/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['buckets']:.0f} | {r['peak_extra_gb']:.2f} | {r['seconds']:.2f} | "
                     f"{r['gb']:.3f} | {r['gbps']:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
