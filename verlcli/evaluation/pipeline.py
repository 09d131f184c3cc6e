"""`verl eval` as a library: generate → score → metrics → files.

    from verlcli.evaluation import EvalOptions, evaluate
    result = evaluate(EvalOptions(model="runs/x/checkpoints/step_20", data="data/gsm8k/test.parquet",
                                  n=4, out="evals/step_20"))
    result.metrics["gsm8k"]["pass@1"]

Generations are one JSON object per sampled response (OUT/generations.jsonl):
    prompt_id, sample, index, data_source, prompt, response, ground_truth, extra_info,
    finish_reason, response_tokens, score, correct, answer, error, reward (the scorer's extras).
`--generations FILE` reads such a file (or any JSONL with at least prompt_id, data_source,
response, ground_truth) and scores it again without generating.

Correctness (for pass@k and maj@n): the scorer's `acc` field when it returns one, else
`score >= pass_threshold` (default 1.0 — a format-only partial reward is not a pass).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from verlcli.errors import UserError
from verlcli.evaluation.metrics import compute_metrics, default_ks
from verlcli.io import atomic_path, write_json_atomic

REQUIRED_GEN_FIELDS = ("prompt_id", "data_source", "response", "ground_truth")


@dataclass
class EvalOptions:
    model: str | None = None          # HF dir, built-in name, hub id, or a training checkpoint dir
    data: str | None = None           # parquet in the dataset schema
    out: str | None = None            # output dir (default: see default_out)
    n: int = 1
    ks: list[int] | None = None       # default: 1, 2, 4, ..., n
    engine: str = "vllm"
    temperature: float | None = None  # default: 0 (greedy) when n == 1, else 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    max_prompt_tokens: int = 1024
    prompt_key: str = "prompt"
    seed: int = 0
    limit: int | None = None          # first L prompts only
    dtype: str = "auto"               # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    reward_fn: str | None = None      # path.py:function, scores every row
    reward_timeout_s: float = 10.0
    reward_workers: int = 2           # 0 = score in this process (no timeout)
    generations: str | None = None    # score this file instead of generating
    pass_threshold: float = 1.0
    bootstrap: int = 1000
    tools: list[str] | None = None    # multi-turn: the model may call these (agent loop); max_tokens = trajectory
    max_turns: int = 4
    tool_timeout_s: float = 10.0
    tool_memory_mb: int = 1024
    max_tool_response_tokens: int = 256


@dataclass
class EvalResult:
    metrics: dict                     # data_source -> {mean@n, mean@n/se, pass@k, maj@n, ...}
    rows: list[dict]
    out: Path
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------ generations files


def read_generations(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"generations file {path} does not exist",
                        fix="pass the generations.jsonl written by an earlier `verl eval` run")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg})",
                            fix="each line of a generations file is one JSON object") from None
        missing = [k for k in REQUIRED_GEN_FIELDS if k not in row]
        if missing:
            raise UserError(f"{path}:{lineno} lacks field(s) {', '.join(missing)}",
                            fix=f"every row needs {', '.join(REQUIRED_GEN_FIELDS)}")
        rows.append(row)
    if not rows:
        raise UserError(f"generations file {path} is empty", fix="generate first: verl eval --model ... --data ...")
    return rows


def write_generations(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, default=str, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ scoring


def score_rows(rows: list[dict], reward_fn: str | None = None, timeout_s: float = 10.0,
               num_workers: int = 2, pass_threshold: float = 1.0) -> list[dict]:
    """Score every row with the reward registry (or `reward_fn`); returns new rows."""
    from verlcli.rewards import RewardScorer

    items = [{k: r.get(k) for k in ("data_source", "response", "ground_truth", "extra_info")} for r in rows]
    with RewardScorer(fn_spec=reward_fn, timeout_s=timeout_s, num_workers=num_workers) as scorer:
        results = scorer.score(items)
    out = []
    for r, res in zip(rows, results):
        extras = {k: v for k, v in res.items() if k not in ("score", "error")}
        acc = extras.get("acc")
        correct = bool(acc) if acc is not None else res["score"] >= pass_threshold
        # A scorer that extracts answers says so with `pred` (None = no answer: abstains in the
        # vote). Without `pred`, the whole stripped response is the answer.
        answer = extras["pred"] if "pred" in extras else str(r.get("response") or "").strip()
        out.append({**r, "score": res["score"], "correct": correct, "answer": answer,
                    "error": res.get("error"), "reward": extras})
    return out


# ------------------------------------------------------------------ generating


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


@contextlib.contextmanager
def model_directory(model: str):
    """A Hugging Face directory for `model`; a training checkpoint is merged to a temp dir first."""
    from verlcli.merge import find_role_dir, merge_checkpoint, read_meta

    role_dir = find_role_dir(Path(model)) if Path(model).is_dir() else None
    if role_dir is None:
        from verlcli.models.resolve import resolve_model

        yield resolve_model(model), {"model": str(model)}
        return
    kind = read_meta(role_dir).get("kind", "causal_lm")
    if kind != "causal_lm":
        raise UserError(f"{role_dir} is a {kind} checkpoint (a critic), not a language model",
                        fix="evaluate the actor: pass .../step_N or .../step_N/actor")
    tmp = Path(tempfile.mkdtemp(prefix="verl-eval-merged-"))
    try:
        merge_checkpoint(role_dir, out=tmp / "hf", lora="merge", dtype="float32", verify=False)
        yield tmp / "hf", {"model": str(model), "merged_from": str(role_dir)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_prompts(opts: EvalOptions, tokenizer, tools: dict | None = None) -> list[dict]:
    from verlcli.data.dataset import load_rl_dataset

    if not opts.data:
        raise UserError("no data to evaluate on", fix="pass --data FILE.parquet (or --generations FILE)")
    schemas = None
    if tools:  # each prompt shows the tools it may call (data/tool_chat.py)
        from verlcli.tools import tool_schemas

        schemas = dict(zip(tools, tool_schemas(tools)))
    items = load_rl_dataset([opts.data], tokenizer, prompt_key=opts.prompt_key,
                            max_prompt_tokens=opts.max_prompt_tokens, truncation="error", tool_schemas=schemas)
    items = list(items)
    if opts.limit:
        items = items[: opts.limit]
    if not items:
        raise UserError(f"{opts.data} holds no prompts", fix="check the file, or drop --limit 0")
    return items


def generate_rows(opts: EvalOptions, model_dir: Path) -> tuple[list[dict], dict]:
    """Sample n responses per prompt; rows are prompt-major, unscored."""
    from transformers import AutoTokenizer

    from verlcli.rollout import SamplingSpec, make_rollout

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tools = None
    if opts.tools:  # built once: the prompts show their schemas, the agent loop calls them
        from verlcli.tools import make_tools

        tools = make_tools(list(opts.tools), timeout_s=opts.tool_timeout_s, memory_mb=opts.tool_memory_mb)
    items = load_prompts(opts, tokenizer, tools)
    device = _resolve_device(opts.device)
    dtype = _resolve_dtype(opts.dtype, device)
    max_len = max(len(it["input_ids"]) for it in items) + opts.max_tokens
    spec = SamplingSpec(n=opts.n, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
                        max_tokens=opts.max_tokens, stop=[], seed=opts.seed)
    engine = make_rollout(opts.engine, str(model_dir), device=device, dtype=dtype,
                          max_model_len=max_len, seed=opts.seed)
    try:
        if opts.tools:
            return _agent_rows(opts, engine, tokenizer, tools, items, spec), {
                "engine": opts.engine, "device": device, "dtype": dtype, "num_prompts": len(items),
                "tools": list(opts.tools), "max_turns": opts.max_turns}
        outputs = engine.generate([list(it["input_ids"]) for it in items], spec)
    finally:
        engine.shutdown()
    rows, sample_no = [], {}
    for o in outputs:
        it = items[o.prompt_index]
        j = sample_no.get(o.prompt_index, 0)
        sample_no[o.prompt_index] = j + 1
        rows.append({
            "prompt_id": o.prompt_index, "sample": j, "index": it.get("index"),
            "data_source": it["data_source"],
            "prompt": tokenizer.decode(list(it["input_ids"]), skip_special_tokens=False),
            "response": tokenizer.decode(list(o.response_ids), skip_special_tokens=True),
            "ground_truth": it.get("ground_truth"), "extra_info": it.get("extra_info"),
            "finish_reason": o.finish_reason, "response_tokens": len(o.response_ids),
        })
    rows.sort(key=lambda r: (r["prompt_id"], r["sample"]))
    return rows, {"engine": opts.engine, "device": device, "dtype": dtype, "num_prompts": len(items)}


def _agent_rows(opts: EvalOptions, engine, tokenizer, tools: dict, items: list[dict], spec) -> list[dict]:
    """Multi-turn: n tool-calling trajectories per prompt (the agent loop the trainer uses).
    `response` is the final answer (the model's last turn, what the reward scores);
    `trajectory` the whole conversation after the prompt, tool results included."""
    from verlcli.rollout.agent_loop import AgentLoop
    from verlcli.tools import parser_for

    loop = AgentLoop(engine, tokenizer, tools, parser_for(tokenizer), budget_tokens=opts.max_tokens,
                     max_turns=opts.max_turns, max_tool_response_tokens=opts.max_tool_response_tokens)
    order = [(i, j) for i in range(len(items)) for j in range(opts.n)]
    trajs = loop.run([list(items[i]["input_ids"]) for i, _ in order], [items[i]["messages"] for i, _ in order],
                     [items[i].get("tools") for i, _ in order], spec)
    rows = []
    for (i, j), t in zip(order, trajs):
        it = items[i]
        rows.append({
            "prompt_id": i, "sample": j, "index": it.get("index"), "data_source": it["data_source"],
            "prompt": tokenizer.decode(list(it["input_ids"]), skip_special_tokens=False),
            "response": t.final_text, "trajectory": tokenizer.decode(t.ids, skip_special_tokens=False),
            "ground_truth": it.get("ground_truth"), "extra_info": it.get("extra_info"),
            "finish_reason": t.finish, "response_tokens": len(t.ids), "turns": t.turns,
            "tool_calls": [{"name": name, "ok": ok} for name, ok in t.calls],
        })
    return rows


# ------------------------------------------------------------------ orchestration


def default_out(opts: EvalOptions) -> Path:
    if opts.generations:
        return Path(opts.generations).parent / "rescored"
    name = Path(str(opts.model).rstrip("/")).name or "model"
    return Path("evals") / f"{name}_{Path(opts.data or 'data').stem}"


def _check_options(opts: EvalOptions) -> None:
    if opts.n < 1:
        raise UserError(f"--n {opts.n} must be at least 1", fix="pass --n 1 or more")
    bad = [k for k in (opts.ks or []) if not 1 <= k <= opts.n]
    if bad and not opts.generations:
        raise UserError(f"--k {bad} must lie in 1..n (n={opts.n})", fix=f"pass --n {max(bad)} or a smaller --k")
    if not opts.generations and not opts.model:
        raise UserError("no model to evaluate", fix="pass --model PATH|CKPT_DIR (or --generations FILE to re-score)")
    if not opts.generations and not opts.data:
        raise UserError("no data to evaluate on", fix="pass --data FILE.parquet (or --generations FILE to re-score)")
    if opts.temperature is None:
        opts.temperature = 0.0 if opts.n == 1 else 1.0
    if opts.n > 1 and opts.temperature == 0.0:
        raise UserError(f"--n {opts.n} with --temperature 0 samples the same greedy response n times",
                        fix="pass --temperature 1.0 (or another positive value), or --n 1")
    if not opts.generations and not any(c in opts.data for c in "*?[") and not Path(opts.data).exists():
        # Checked before a checkpoint is merged or a model loaded: fail in a second, not a minute.
        raise UserError(f"data file {opts.data} does not exist",
                        fix="pass a parquet made by `verl prepare-data`, e.g. data/gsm8k/test.parquet")


def evaluate(opts: EvalOptions) -> EvalResult:
    """Generate (unless opts.generations), score, compute metrics, write OUT/*. Deterministic per seed."""
    _check_options(opts)
    out = Path(opts.out) if opts.out else default_out(opts)
    if opts.generations:
        rows, info = read_generations(opts.generations), {"generations": str(opts.generations)}
    else:
        with model_directory(opts.model) as (model_dir, info):
            rows, gen_info = generate_rows(opts, model_dir)
        info.update(gen_info, data=str(opts.data), temperature=opts.temperature, top_p=opts.top_p,
                    top_k=opts.top_k, max_tokens=opts.max_tokens)
        if opts.tools:
            info["agent"] = agent_summary(rows)
    rows = score_rows(rows, opts.reward_fn, opts.reward_timeout_s, opts.reward_workers, opts.pass_threshold)
    n = _samples_per_prompt(rows)
    too_big = [k for k in (opts.ks or []) if k > n]
    if too_big:
        raise UserError(f"--k {too_big} exceeds the {n} samples per prompt in {opts.generations}",
                        fix=f"pass --k values from 1 to {n}")
    ks = sorted(set(opts.ks or default_ks(n)))
    try:
        metrics = compute_metrics(rows, ks, seed=opts.seed, num_resamples=opts.bootstrap)
    except ValueError as e:
        raise UserError(f"cannot compute metrics: {e}", fix="score a file where every prompt has n samples") from None
    info.update(n=n, k=ks, seed=opts.seed, reward_fn=opts.reward_fn, pass_threshold=opts.pass_threshold)
    out.mkdir(parents=True, exist_ok=True)
    write_generations(out / "generations.jsonl", rows)
    write_json_atomic(out / "metrics.json", {"metrics": metrics, "config": info})
    return EvalResult(metrics=metrics, rows=rows, out=out, info=info)


def agent_summary(rows: list[dict]) -> dict:
    """Multi-turn generations: how trajectories ended and what the tools did."""
    calls: dict[str, list[int]] = {}
    for r in rows:
        for c in r.get("tool_calls") or []:
            calls.setdefault(c["name"], [0, 0])[0 if c["ok"] else 1] += 1
    n = max(len(rows), 1)
    return {"answered_frac": sum(r.get("finish_reason") == "answer" for r in rows) / n,
            "turns_mean": sum(r.get("turns", 1) for r in rows) / n,
            "tool_calls_per_trajectory": sum(sum(v) for v in calls.values()) / n,
            "tools": {name: {"ok": v[0], "failed": v[1]} for name, v in sorted(calls.items())}}


def _samples_per_prompt(rows: list[dict]) -> int:
    counts: dict = {}
    for r in rows:
        counts[r["prompt_id"]] = counts.get(r["prompt_id"], 0) + 1
    return max(counts.values())


# ------------------------------------------------------------------ display


def metrics_table(metrics: dict, title: str = "eval"):
    """A rich Table: one row per metric, one column per data source (few sources, many k's)."""
    from rich import box
    from rich.table import Table

    first = next(iter(metrics.values()))
    n = first["n"]
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("metric", no_wrap=True)
    for ds in metrics:
        table.add_column(ds, justify="right", no_wrap=True)
    table.add_row("prompts", *[str(m["num_prompts"]) for m in metrics.values()])
    table.add_row(f"mean@{n} ± se", *[f"{m[f'mean@{n}']:.3f} ± {m[f'mean@{n}/se']:.3f}" for m in metrics.values()])
    for c in [k for k in first if k.startswith(("pass@", "maj@"))]:
        table.add_row(c, *[f"{m[c]:.3f}" for m in metrics.values()])
    table.add_row("errors", *[str(m["errors"]) for m in metrics.values()])
    return table

__all__ = ["EvalOptions", "EvalResult", "evaluate", "generate_rows", "metrics_table", "model_directory",
           "read_generations", "score_rows", "write_generations"]
