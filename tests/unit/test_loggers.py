"""Metric sinks: metrics.jsonl always, TensorBoard event files, wandb offline without a key."""

import json

from verlcli.trainer.loggers import Tracker


def test_jsonl_and_tensorboard(tmp_path):
    t = Tracker(str(tmp_path), ["console", "tensorboard"], "verlcli-test", "t", {"a": 1})
    t.log(1, {"score/mean": 0.5, "timing/step_s": 1.0, "bad": float("nan")})
    t.log(2, {"score/mean": 0.7})
    t.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "score/mean": 0.5, "timing/step_s": 1.0, "bad": None}, {"step": 2, "score/mean": 0.7}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_runs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Tracker(str(tmp_path), ["wandb"], "verlcli-test", "offline", {"a": 1})
    t.log(1, {"score/mean": 0.5})
    t.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
