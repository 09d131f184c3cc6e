"""One GRPO step of `smollm2-135m-cpu` with each training backend, side by side (issue 11).

The same command (`verl grpo --preset smollm2-135m-cpu`, same data, seed, lengths) runs once
per backend — fsdp, deepspeed ZeRO-2, deepspeed ZeRO-3 — one after the other in subprocesses,
while this process samples the memory of each child's whole process tree. Per backend: the
per-phase seconds of the measured step (the last; step 1 warms up caches and allocators),
the step time, and peak memory (process tree RSS/PSS, and the worker's own peak RSS).

    python bench/engines.py --out bench/results/engines.json
    python bench/engines.py --steps 2 --max-completion 8 --only fsdp       # smoke test

Run it on a quiet machine: the three runs share the cores with whatever else runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = {
    "fsdp": ["actor.strategy=fsdp"],
    "deepspeed-zero2": ["actor.strategy=deepspeed", "actor.zero_stage=2"],
    "deepspeed-zero3": ["actor.strategy=deepspeed", "actor.zero_stage=3"],
    # megatron computes in fp32 only: compare it with fp32 FSDP (same precision on both sides).
    # TP=1: SmolLM2-135M's 9 heads (3 KV heads) cannot be split over 2 ranks.
    "fsdp-fp32": ["actor.strategy=fsdp", "resources.compute_dtype=float32"],
    "megatron-tp1": ["actor.strategy=megatron", "actor.tensor_parallel_size=1", "resources.compute_dtype=float32"],
}


def _helpers():
    """bench/grpo_vs_trl.py's process-tree memory sampler and run helpers (one copy)."""
    spec = importlib.util.spec_from_file_location("grpo_vs_trl", HERE / "grpo_vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2, help="RL steps per backend; the last is reported.")
    p.add_argument("--only", choices=list(BACKENDS), action="append", help="Run only these backends.")
    p.add_argument("--out", help="Write the result JSON here (and the table beside it as .md).")
    p.add_argument("--workdir", help="Data, run dirs and logs (default: a fresh temp dir).")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-prompt", type=int, default=192)
    p.add_argument("--max-completion", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--devices", type=int, default=None,
                   help="resources.devices_per_node (default: the preset's); with 2, cpus_per_worker=1.")
    return p.parse_args(argv)


def run_backend(h, a, name: str, data: Path, work: Path) -> dict:
    run_dir = work / name
    extra = list(BACKENDS[name])
    if a.devices:
        extra += [f"resources.devices_per_node={a.devices}", f"resources.cpus_per_worker={max(1, 2 // a.devices)}"]
    cmd = [*h.VERL, "grpo", "--preset", "smollm2-135m-cpu", *h.verl_overrides(a, data, run_dir), *extra]
    print(f"{name}: " + " ".join(cmd), flush=True)
    load_before = os.getloadavg()
    rc, mem, wall = h.run_monitored(cmd, h.child_env(a.threads), work / f"{name}.log")
    mem.pop("line_times", None)
    if rc != 0:
        raise SystemExit(f"{name} failed (exit {rc}):\n{h.tail(work / f'{name}.log')}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "timing/step_s" in r]
    last = steps[-1]
    phases = {k.removeprefix("timing/"): v for k, v in last.items()
              if k.startswith("timing/") and k != "timing/checkpoint_s"}
    return {"backend": name, "command": " ".join(cmd), "total_wall_s": wall, "step": last["step"],
            "phases_s": phases, "worker_peak_rss_gb": last.get("mem/peak_rss_gb"),
            "actor_grad_norm": last.get("actor/grad_norm"), "memory": mem,
            "load_avg_before": load_before}


def table(results: list[dict]) -> str:
    phases = sorted({p for r in results for p in r["phases_s"]}, key=lambda p: (p != "step_s", p))
    head = "| phase (s) | " + " | ".join(r["backend"] for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for p in phases:
        lines.append(f"| {p} | " + " | ".join(f"{r['phases_s'].get(p, 0.0):.2f}" for r in results) + " |")
    lines.append("| worker peak RSS (GB) | " + " | ".join(f"{r['worker_peak_rss_gb'] or 0:.2f}" for r in results) + " |")
    lines.append("| process tree peak RSS (GB) | " + " | ".join(f"{r['memory']['peak_tree_rss_gb']:.2f}" for r in results) + " |")
    lines.append("| process tree peak PSS (GB) | " + " | ".join(f"{r['memory']['peak_tree_pss_gb']:.2f}" for r in results) + " |")
    lines.append("| whole run wall (s) | " + " | ".join(f"{r['total_wall_s']:.0f}" for r in results) + " |")
    lines.append("| 1-min load before | " + " | ".join(f"{r['load_avg_before'][0]:.1f}" for r in results) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_args(argv)
    h = _helpers()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="verl_engines_"))
    work.mkdir(parents=True, exist_ok=True)
    data = h.prepare_data(work)
    results = []
    for name in a.only or list(BACKENDS):
        results.append(run_backend(h, a, name, data, work))
        time.sleep(2)
    text = table(results)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(a), "results": results}, indent=2) + "\n")
        out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
