"""`verl prepare-data NAME`: build train/test parquet files in the one dataset schema."""

from __future__ import annotations

from typing import Optional

import typer


def command(
    name: str = typer.Argument(..., help="gsm8k, math, countdown, arithmetic, arithmetic-tools or custom."),
    source: Optional[str] = typer.Option(None, "--source", help="Local raw data: a directory (gsm8k, math) or a file (custom). Without it, gsm8k/math load from the Hugging Face hub."),
    out: Optional[str] = typer.Option(None, "--out", help="Output directory [default: data/NAME]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for generated data and custom's test hold-out [default: 0]."),
    train_size: Optional[int] = typer.Option(None, "--train-size", help="Rows in train (generated: how many to make; others: keep the first N)."),
    test_size: Optional[int] = typer.Option(None, "--test-size", help="Rows in test (custom without --test-source: rows held out, default 10%)."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Put this system message before every prompt."),
    test_source: Optional[str] = typer.Option(None, "--test-source", help="custom: a separate file for the test split."),
    prompt_key: Optional[str] = typer.Option(None, "--prompt-key", help="custom: column with the prompt (text or chat list) [default: prompt]."),
    answer_key: Optional[str] = typer.Option(None, "--answer-key", help="custom: column with the ground-truth answer [default: answer]."),
    response_key: Optional[str] = typer.Option(None, "--response-key", help="custom: column with a reference response; also writes sft_*.parquet."),
    data_source: Optional[str] = typer.Option(None, "--data-source", help="custom: data_source value, which picks the reward [default: custom]."),
    min_operand: Optional[int] = typer.Option(None, "--min-operand", help="arithmetic: smallest operand [default: 1]."),
    max_operand: Optional[int] = typer.Option(None, "--max-operand", help="arithmetic: largest operand [default: 20]."),
    operators: Optional[str] = typer.Option(None, "--operators", help="arithmetic: operators to use, from + - * [default: +*]."),
    num_count: Optional[int] = typer.Option(None, "--num-count", help="countdown: numbers per puzzle [default: 3]."),
    max_number: Optional[int] = typer.Option(None, "--max-number", help="countdown: largest given number [default: 25]."),
    max_target: Optional[int] = typer.Option(None, "--max-target", help="countdown: largest target [default: 100]."),
):
    """Build DIR/train.parquet and DIR/test.parquet (and sft_train/sft_test where the data has
    solutions) in the one dataset schema: data_source, prompt (chat list), ability,
    reward_model {style, ground_truth}, extra_info {split, index, ...}.

    Examples:

      verl prepare-data gsm8k

      verl prepare-data gsm8k --source ../shared/data/gsm8k --out data/gsm8k

      verl prepare-data arithmetic --operators '+*' --max-operand 9

      verl prepare-data countdown --num-count 3 --seed 1

      verl prepare-data custom --source qa.jsonl --prompt-key q --answer-key a
    """
    from data_prep import prepare
    from verlcli.rewards.registry import REWARDS

    result = prepare(
        name, out=out, source=source, seed=seed, train_size=train_size, test_size=test_size,
        system_prompt=system_prompt, test_source=test_source, prompt_key=prompt_key, answer_key=answer_key,
        response_key=response_key, data_source=data_source, min_operand=min_operand, max_operand=max_operand,
        operators=operators, num_count=num_count, max_number=max_number, max_target=max_target,
    )
    for split, path in result["files"].items():
        typer.echo(f"wrote {path}  ({result['rows'][split]} rows)")
    for note in result["notes"]:
        typer.echo(f"note: {note}")
    example = result["example"]
    typer.echo(f"data_source: {', '.join(result['data_sources'])}")
    typer.echo(f"example prompt: {example['prompt'][-1]['content'][:200]!r}")
    typer.echo(f"example ground truth: {example['reward_model']['ground_truth'][:100]!r}")
    unscored = [ds for ds in result["data_sources"] if ds not in REWARDS]
    if unscored:
        typer.echo(f"note: no built-in reward for data_source {', '.join(unscored)}: train with "
                   f"reward.fn=path.py:function, or re-run with --data-source set to one of {', '.join(sorted(REWARDS))}")
    train = result["files"]["train"]
    typer.echo(f"next: verl grpo data.train_files=[{train}] data.val_files=[{result['files']['test']}]")
