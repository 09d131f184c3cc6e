"""`verl eval`: generate with a rollout engine, score with the reward registry, report metrics."""

from typing import List, Optional

import typer


def command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF model dir, built-in (tiny-qwen2, smollm2-135m-instruct), hub id, or a training checkpoint (step_N or step_N/actor: merged to a temp dir first)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Parquet in the dataset schema (verl prepare-data writes it)."),
    n: int = typer.Option(1, "--n", help="Responses sampled per prompt."),
    k: Optional[List[int]] = typer.Option(None, "--k", help="pass@k for these k (repeat the flag); default 1, 2, 4, ..., n."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output dir for generations.jsonl and metrics.json (default evals/MODEL_DATA; with --generations: its folder/rescored)."),
    engine: str = typer.Option("vllm", "--engine", help="Rollout engine: vllm or hf (transformers generate)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Default: 0 (greedy) with --n 1, else 1.0."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(-1, "--top-k", help="-1 = off."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Generation limit per response."),
    max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens", help="Longer prompts are an error."),
    seed: int = typer.Option(0, "--seed", help="Sampling and bootstrap seed: same data + same seed = same metrics."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first L prompts only."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16."),
    reward_fn: Optional[str] = typer.Option(None, "--reward-fn", help="path.py:function scoring every response (default: the registry by data_source)."),
    reward_workers: int = typer.Option(2, "--reward-workers", help="Scoring processes (0 = in-process, no timeout)."),
    generations: Optional[str] = typer.Option(None, "--generations", help="Score this generations.jsonl again instead of generating."),
    tool: Optional[List[str]] = typer.Option(None, "--tool", help="Multi-turn: a tool the model may call (repeat the flag): calculator, python, or path.py:function. --max-tokens then bounds the whole trajectory; the final answer is scored."),
    max_turns: int = typer.Option(4, "--max-turns", help="Multi-turn (--tool): model turns per trajectory."),
    tool_timeout_s: float = typer.Option(10.0, "--tool-timeout-s", help="Multi-turn (--tool): time limit of one tool call."),
):
    """Generate responses and score them: mean@n (± bootstrap standard error), pass@k (unbiased estimator), maj@n (majority vote over extracted answers), per data source.

    Writes OUT/generations.jsonl (one line per response: prompt, response, score, correct, answer, ...) and OUT/metrics.json, and prints a table. A response counts as correct for pass@k and maj@n when the scorer says acc=1 (built-in scorers), else when score >= 1.

    Examples:

      verl eval --model hf_model/ --data data/gsm8k/test.parquet

      verl eval --model runs/my-run/checkpoints/step_200 --data data/gsm8k/test.parquet --n 8 --k 1 --k 8

      verl eval --model smollm2-135m-instruct --data data/arithmetic/test.parquet --engine hf --limit 50 --out evals/base

      verl eval --generations evals/base/generations.jsonl --reward-fn my_reward.py:compute_score --out evals/rescored

      verl eval --model runs/tools/checkpoints/step_50 --data data/arithmetic_tools/test.parquet --tool calculator --max-turns 4
    """
    from rich.console import Console

    from verlcli.evaluation import EvalOptions, evaluate, metrics_table

    opts = EvalOptions(model=model, data=data, out=out, n=n, ks=list(k) if k else None, engine=engine,
                       temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                       max_prompt_tokens=max_prompt_tokens, seed=seed, limit=limit, dtype=dtype,
                       reward_fn=reward_fn, reward_workers=reward_workers, generations=generations,
                       tools=list(tool) if tool else None, max_turns=max_turns, tool_timeout_s=tool_timeout_s)
    result = evaluate(opts)
    console = Console()
    console.print(metrics_table(result.metrics, title=f"eval: {model or generations}"))
    if "agent" in result.info:
        a = result.info["agent"]
        console.print(f"agent: {a['answered_frac']:.0%} of trajectories answered, {a['turns_mean']:.2f} turns and "
                      f"{a['tool_calls_per_trajectory']:.2f} tool calls each; per tool (ok/failed): "
                      + (", ".join(f"{k} {v['ok']}/{v['failed']}" for k, v in a["tools"].items()) or "none"),
                      markup=False, highlight=False)
    console.print(f"wrote {result.out / 'generations.jsonl'} and {result.out / 'metrics.json'}", markup=False,
                  highlight=False)
