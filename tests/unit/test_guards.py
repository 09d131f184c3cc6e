"""NaN/inf updates: each skipped one is counted and warned about; k in a row stop the run,
naming the step and the likely cause."""

import pytest

from verlcli.config.schema import Config
from verlcli.errors import UserError
from verlcli.trainer.guards import NonFiniteGuard


def test_skipped_updates_are_counted_and_k_in_a_row_stop_with_the_cause(capsys):
    cfg = Config.model_validate({"trainer": {"max_nonfinite_steps": 2}})
    g = NonFiniteGuard(cfg)
    ok = {"actor/skipped": 0.0, "actor/pg_loss": 0.1, "advantage/abs_max": 1.0}
    bad = {"actor/skipped": 1.0, "actor/pg_loss": float("nan"), "advantage/abs_max": 3e37}
    assert g.update(1, bad) == {"train/nonfinite_steps": 1.0, "train/nonfinite_in_a_row": 1.0}
    g.stop_if_diverged(1)
    assert "step 1: non-finite loss or gradient (actor/skipped, actor/pg_loss)" in capsys.readouterr().out
    assert g.update(2, ok)["train/nonfinite_in_a_row"] == 0.0  # a good step resets the run
    g.update(3, bad)
    g.stop_if_diverged(3)
    assert g.update(4, bad) == {"train/nonfinite_steps": 3.0, "train/nonfinite_in_a_row": 2.0}
    with pytest.raises(UserError, match=r"step 4: the loss or gradient was NaN/inf in 2 steps in a row \(steps 3–4\)") as e:
        g.stop_if_diverged(4)
    assert "extreme magnitude" in str(e.value) and "actor.optim.lr" in e.value.fix


def test_likely_cause_names_the_learning_rate_when_rewards_are_sane():
    cfg = Config.model_validate({"trainer": {"max_nonfinite_steps": 1}, "actor": {"optim": {"lr": 0.5}}})
    g = NonFiniteGuard(cfg)
    g.update(7, {"critic/skipped": 1.0, "advantage/abs_max": 2.0})
    with pytest.raises(UserError, match=r"actor.optim.lr=0.5\) is too high"):
        g.stop_if_diverged(7)
