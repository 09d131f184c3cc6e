import json

import pytest

from verlcli.errors import UserError
from verlcli.report import heldout_vs_time, make_report, series


def _run(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(d)


def test_report_overlays_runs_and_writes_pngs(tmp_path):
    rows = [{"step": s, "score/mean": s / 10, "val/score/mean": s / 20, "response/length_mean": 20 + s,
             "actor/entropy": 1.0, "timing/gen_s": 1.0, "timing/update_actor_s": 2.0, "timing/step_s": 3.0} for s in range(1, 5)]
    a = _run(tmp_path, "a", rows)
    b = _run(tmp_path, "b", rows[:2])
    out = make_report([a, b], str(tmp_path / "plots"))
    assert [p.name for p in out] == ["curves.png", "heldout_vs_time.png", "timing.png"]
    for p in out:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_step_wins_and_missing_file(tmp_path):
    rows = [{"step": 1, "score/mean": 0.1}, {"step": 1, "score/mean": 0.3}]
    assert series(rows, "score/mean") == ([1], [0.3])
    with pytest.raises(UserError, match="no metrics.jsonl"):
        make_report([str(tmp_path / "nope")])


def test_heldout_against_training_seconds_leaves_out_validation_and_checkpoints():
    rows = [{"step": 0, "val/score/mean": 0.1},
            {"step": 1, "timing/step_s": 10.0},
            {"step": 2, "timing/step_s": 25.0, "timing/validate_s": 5.0, "val/score/mean": 0.4},
            {"step": 3, "timing/step_s": 12.0, "timing/checkpoint_s": 2.0, "val/score/mean": 0.5}]
    assert heldout_vs_time(rows) == ([0.0, 30.0, 40.0], [0.1, 0.4, 0.5])
