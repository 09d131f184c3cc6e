"""The names the config can select, and what each needs — declared here, without torch, so
loading a config (`--dry-run`, `verl plan`) checks every name without importing the tensor
code. The functions bind to these entries when their modules are imported (registry.py);
an undeclared binding is an error, so this list cannot drift from the code.
"""

from __future__ import annotations

import difflib

from verlcli.algorithms.registry import Needs, Registry
from verlcli.errors import UserError

ADV_ESTIMATORS = Registry("advantage estimator", "algorithm.adv_estimator",
                          modules=("verlcli.algorithms.advantages", "verlcli.algorithms.token_baseline"))
POLICY_LOSSES = Registry("policy loss", "actor.policy_loss", modules=("verlcli.algorithms.policy_loss",))
KL_ESTIMATORS = Registry("KL estimator", "algorithm.kl_penalty", modules=("verlcli.algorithms.kl",))

GROUP = Needs(group=True)  # compares the responses to one prompt: rollout.n >= 2
ADV_ESTIMATORS.declare("gae", needs=Needs(critic=True))
ADV_ESTIMATORS.declare("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "grpo_passk",
                       "reinforce_plus_plus_baseline", needs=GROUP)
ADV_ESTIMATORS.declare("reinforce_plus_plus", "gpg")
ADV_ESTIMATORS.declare("remax", needs=Needs(baseline=True))
ADV_ESTIMATORS.declare("optimal_token_baseline", "tir_optimal_token_baseline",
                       needs=Needs(group=True, old_log_probs=True, sum_pi_squared=True))

POLICY_LOSSES.declare("vanilla", "gspo", "sapo", "geo_mean", "cispo", "gpg", "clip_cov", "kl_cov", "bypass_mode")

KL_BASE = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
KL_ESTIMATORS.declare(*KL_BASE, *(name + "+" for name in KL_BASE))

RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
              "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def _thresholds(options: list[str], spec) -> dict[str, tuple[float | None, float]]:
    parts = [p.strip() for p in str(spec).split(",") if p.strip()] if spec is not None else []
    if len(parts) not in (1, len(options)):
        raise UserError(
            f"algorithm.rollout_correction.rollout_rs_threshold={spec!r} must give one threshold, "
            f"or one per rollout_rs option ({len(options)})",
            fix="e.g. rollout_rs=token_k1 rollout_rs_threshold=2.0, or '0.5_2.0' (lower_upper) for k1 options",
        )
    parts = parts * len(options) if len(parts) == 1 else parts
    out = {}
    for opt, p in zip(options, parts):
        try:
            if opt.endswith("k1"):
                low, high = (float(x) for x in p.split("_", 1)) if "_" in p else (1 / float(p), float(p))
                ok = low > 0 and high > 0
            else:
                low, high = None, float(p)
                ok = high > 0
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"bad rollout_rs_threshold {p!r} for {opt}",
                            fix="thresholds are positive numbers; k1 options also take 'lower_upper'")
        out[opt] = (low, high)
    return out


def check_rejection(options: str, threshold) -> tuple[list[str], dict]:
    """(option names, their bounds), or UserError naming the bad option or threshold."""
    names = list(dict.fromkeys(o.strip() for o in str(options).split(",") if o.strip()))
    for name in names or [str(options)]:
        if name not in RS_OPTIONS:
            close = difflib.get_close_matches(name, RS_OPTIONS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"unknown rollout_rs option {name!r} for algorithm.rollout_correction.rollout_rs",
                            fix=f"{hint}use any of (comma-separated): {', '.join(RS_OPTIONS)}")
    return names, _thresholds(names, threshold)


