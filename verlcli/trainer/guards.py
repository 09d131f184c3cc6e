"""Non-finite updates: skipped, counted, and after k in a row a stop that says why.

The engines already refuse to apply an update whose gradient norm is NaN/inf (`skipped` in
their step metrics). A run that keeps skipping is not training: after
`trainer.max_nonfinite_steps` such steps in a row it stops, naming the step and the likely
cause, so the last good checkpoint is still the newest one.
"""

from __future__ import annotations

import math

from verlcli.errors import UserError

_SKIP_KEYS = ("actor/skipped", "critic/skipped")


class NonFiniteGuard:
    def __init__(self, cfg):
        self.cfg = cfg
        self.limit = cfg.trainer.max_nonfinite_steps
        self.in_a_row = 0
        self.total = 0
        self.first_bad_step = None

    def update(self, step: int, metrics: dict) -> dict:
        """Count this step; returns the metrics to log with it."""
        skipped = [k for k in _SKIP_KEYS if metrics.get(k, 0) > 0]
        bad_loss = [k for k, v in metrics.items() if k.endswith("loss") and isinstance(v, float) and not math.isfinite(v)]
        if skipped or bad_loss:
            self.in_a_row += 1
            self.total += 1
            self.first_bad_step = self.first_bad_step if self.in_a_row > 1 else step
            what = ", ".join(skipped + bad_loss)
            print(f"warning: step {step}: non-finite loss or gradient ({what}); the update was skipped "
                  f"({self.in_a_row} in a row, stop at {self.limit})", flush=True)
        else:
            self.in_a_row = 0
        self.last = metrics
        return {"train/nonfinite_steps": float(self.total), "train/nonfinite_in_a_row": float(self.in_a_row)}

    def stop_if_diverged(self, step: int) -> None:
        if self.in_a_row < self.limit:
            return
        raise UserError(
            f"step {step}: the loss or gradient was NaN/inf in {self.in_a_row} steps in a row "
            f"(steps {self.first_bad_step}–{step}), so no update was applied; likely cause: {self.likely_cause()}",
            fix="lower actor.optim.lr, check the reward function's scale, or set resources.compute_dtype=float32; "
                "then run the same command again (it resumes from the last checkpoint). "
                f"trainer.max_nonfinite_steps={self.limit} sets how many to tolerate",
        )

    def likely_cause(self) -> str:
        m, c = self.last, self.cfg
        adv = m.get("advantage/abs_max", 0.0)
        if not math.isfinite(adv) or adv > 1e4:
            return f"rewards of extreme magnitude (|advantage| up to {adv:.3g}; rewards are not normalized)"
        if not math.isfinite(m.get("actor/entropy", 0.0)) or not math.isfinite(m.get("score/mean", 0.0)):
            return "the model's weights are already non-finite (a previous update diverged)"
        dtype = c.resources.compute_dtype
        return (f"the learning rate (actor.optim.lr={c.actor.optim.lr:g}) is too high for this model, or "
                f"an overflow in {dtype} compute (resources.compute_dtype={dtype})")
