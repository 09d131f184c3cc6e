"""The `verl` command: registers the subcommands, nothing else.

Command modules import heavy libraries (torch, ray, vllm) inside their functions so that
`verl --help` is instant. Bad input raises UserError: one line, exit code 2.
"""

from __future__ import annotations

import sys

import typer

from verlcli.commands import doctor, eval as eval_cmd, grpo, merge, plan, ppo, prepare_data, presets, report, sft
from verlcli.errors import UserError

app = typer.Typer(
    name="verl",
    help="RL post-training for LLMs: prepare data, SFT, PPO/GRPO, eval, merge checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("prepare-data")(prepare_data.command)
app.command("sft", context_settings={"allow_extra_args": True})(sft.command)
app.command("ppo", context_settings={"allow_extra_args": True})(ppo.command)
app.command("grpo", context_settings={"allow_extra_args": True})(grpo.command)
app.command("eval")(eval_cmd.command)
app.command("merge-checkpoint")(merge.command)
app.command("presets")(presets.command)
app.command("plan", context_settings={"allow_extra_args": True})(plan.command)
app.command("doctor")(doctor.command)
app.command("report")(report.command)


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a worker's failure: show its real cause, not a Ray wrapper
        from verlcli.distributed import WorkerError

        if not isinstance(e, WorkerError):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
