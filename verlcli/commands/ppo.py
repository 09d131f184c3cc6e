"""`verl ppo`: PPO with a critic (GAE advantages)."""

from verlcli.commands.train import make_command

command = make_command(
    "ppo",
    """Train with PPO: actor + critic, GAE advantages (algorithm.adv_estimator=gae).

    Examples:

      verl ppo --preset tiny-cpu

      verl ppo --preset qwen2.5-7b-8xH100 critic.optim.lr=1e-5 reward.model.path=/models/rm

      verl ppo --preset llama3.1-8b-8xH100 --dry-run
    """,
)
