"""PF-PPO (policy filtration, arXiv 2409.06957): resample the batch towards responses whose
reward is most reliable — the extremes — as verl's `use_pf_ppo` / `pf_ppo` settings do.

Weights from each response's score s = Σ_t token_level_scores (before any KL penalty):
- `pow`: |s|^weight_pow (verl default, weight_pow 2.0);
- `max_min`: 1 for responses with the batch's highest or lowest score, else 0;
- `max_random`: 0.4 for the highest score, 0.1 for the rest.
Then weights + 1e-8 (so no response has probability exactly 0) and B indices are drawn
WITH replacement, proportional to the weights (`torch.multinomial`), B = batch size. The
trainer reorders every column of the batch by these indices after advantages are computed.
verl applies this only in its GAE branch (with any other estimator the setting is silently
ignored); here it applies with every estimator.
"""

from __future__ import annotations

import torch

from verlcli.errors import UserError

PF_PPO_METHODS = ("pow", "max_min", "max_random")


def pf_ppo_weights(scores: torch.Tensor, method: str = "pow", weight_pow: float = 2.0) -> torch.Tensor:
    """Sampling weights per response (module docstring), +1e-8 as verl."""
    scores = scores.detach().float()
    if method == "pow":
        w = scores.abs().pow(weight_pow)
    elif method == "max_min":
        w = ((scores == scores.max()) | (scores == scores.min())).float()
    elif method == "max_random":
        w = torch.where(scores == scores.max(), 0.4, 0.1)
    else:
        raise UserError(f"unknown PF-PPO reweight method {method!r} for algorithm.pf_ppo.reweight_method",
                        fix=f"set algorithm.pf_ppo.reweight_method to one of: {', '.join(PF_PPO_METHODS)}")
    return (w + 1e-8).clamp(min=1e-8)


def pf_ppo_resample(scores: torch.Tensor, method: str = "pow", weight_pow: float = 2.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices `[B]` of the resampled batch (with replacement, module docstring)."""
    weights = pf_ppo_weights(scores, method, weight_pow)
    return torch.multinomial(weights, weights.numel(), replacement=True, generator=generator)
