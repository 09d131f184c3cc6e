"""`verl grpo`: GRPO (critic-free, group-relative advantages)."""

from verlcli.commands.train import make_command

command = make_command(
    "grpo",
    """Train with GRPO (or any critic-free estimator: rloo, reinforce_plus_plus, remax, ...).

    Examples:

      verl grpo                                   # embedded default: SmolLM2-135M, arithmetic, CPU

      verl grpo --preset qwen2.5-7b-8xH100 rollout.n=16 actor.optim.lr=1e-6

      verl grpo --preset tiny-cpu --dry-run       # show the resolved config and batch arithmetic
    """,
)
