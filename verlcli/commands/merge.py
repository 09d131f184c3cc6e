"""`verl merge-checkpoint`: a sharded training checkpoint → a Hugging Face directory."""

from typing import Optional

import typer


def command(
    ckpt_dir: str = typer.Argument(..., help="A run's checkpoints/step_N (= its actor), or step_N/actor, step_N/critic."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (default CKPT_DIR/huggingface). Replaced if it exists."),
    verify: bool = typer.Option(False, "--verify", help="Reload the output with transformers and compare logits with the checkpoint."),
    lora: str = typer.Option("merge", "--lora", help="LoRA checkpoints: 'merge' into the base weights, or save an 'adapter' (PEFT)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype of the output: float32 or bfloat16."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max |Δlogit| for --verify (default: 1e-4 scaled for float32, 5e-2 for bfloat16)."),
):
    """Turn a sharded training checkpoint (any world size, actor or critic) into a Hugging Face directory: safetensors weights, config.json, tokenizer and generation config. It loads with transformers (AutoModelForCausalLM; a critic with AutoModelForTokenClassification) and with vLLM.

    Keys are checked strictly (no missing or unexpected weight). A LoRA adapter is merged into the base weights; an all-zero adapter (the merge would equal the base model) is an error. The output appears only after every check passed (written to a temp dir, renamed).

    Examples:

      verl merge-checkpoint runs/my-run/checkpoints/step_200

        → runs/my-run/checkpoints/step_200/huggingface/

      verl merge-checkpoint runs/my-run/checkpoints/step_200 --out hf_model/ --verify

      verl merge-checkpoint runs/lora-run/checkpoints/step_50/actor --lora adapter --out adapter/

      verl merge-checkpoint runs/ppo-run/checkpoints/step_100/critic --out critic_hf/ --dtype bfloat16

    Exit codes: 0 ok; 1 --verify found the logits differ; 2 bad input (the message says the fix).
    """
    import sys

    from rich.console import Console

    from verlcli.merge import VerificationError, merge_checkpoint

    console = Console(stderr=True)
    try:
        info = merge_checkpoint(ckpt_dir, out=out, lora=lora, dtype=dtype, verify=verify,
                                tolerance=tolerance, log=lambda m: console.print(m, markup=False, highlight=False))
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1)
    print(info["out"])
