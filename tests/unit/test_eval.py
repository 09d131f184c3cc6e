"""verl eval: metric conventions with hand-computed numbers, re-scoring, determinism."""

from __future__ import annotations

import json
import math
import os

import pytest

from verlcli.errors import UserError
from verlcli.evaluation import EvalOptions, compute_metrics, default_ks, evaluate, majority_correct, pass_at_k
from verlcli.evaluation.metrics import bootstrap_means, bootstrap_se, vote_key

from _data import arith_parquet

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------ pass@k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),                # c/n
    (5, 2, 2, 1 - 3 / 10),         # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),      # 1 - C(7,5)/C(10,5)
    (5, 0, 3, 0.0),                # nothing correct
    (5, 4, 2, 1.0),                # n - c = 1 < k: every pair holds a correct sample
    (4, 1, 4, 1.0),                # k = n: correct iff any is correct
    (1, 1, 1, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_ratio():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(6) == [1, 2, 4, 6]


# ------------------------------------------------------------------ maj@n


def test_majority_numbers_compare_by_value_and_none_abstains():
    # "18" and "18.0" are one answer (2 votes) against "7" (1 vote); None abstains.
    assert majority_correct(["18", "18.0", "7", None], [True, True, False, False]) is True
    assert majority_correct(["7", "7", "18", None], [False, False, True, False]) is False


def test_majority_tie_goes_to_first_seen_and_all_abstain_is_wrong():
    assert majority_correct(["7", "18"], [False, True]) is False
    assert majority_correct(["18", "7"], [True, False]) is True
    assert majority_correct([None, None], [False, False]) is False


def test_vote_key():
    assert vote_key(" Paris ") == "Paris"
    assert vote_key("$1,000.0") == vote_key("1000") == "1000"
    assert vote_key("") is None and vote_key(None) is None


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_std_of_resampled_means_hand_computed():
    values = [0.0, 1.0, 1.0]
    means = bootstrap_means(values, [[0, 0, 0], [1, 1, 2], [0, 1, 2]])
    assert means == pytest.approx([0.0, 1.0, 2 / 3])
    # mean 5/9; squared deviations 25/81 + 16/81 + 1/81 = 42/81; / (3 - 1) -> sqrt(21/81)
    from verlcli.evaluation.metrics import _std

    assert _std(means) == pytest.approx(math.sqrt(21 / 81))


def test_bootstrap_se_seeded_and_sane():
    values = [0.0, 1.0] * 20
    a, b = bootstrap_se(values, seed=3), bootstrap_se(values, seed=3)
    assert a == b
    assert a != bootstrap_se(values, seed=4)
    # analytic SE of a mean of 40 fair coin flips (population std 0.5): 0.5 / sqrt(40) = 0.079
    assert a == pytest.approx(0.5 / math.sqrt(40), rel=0.15)
    assert bootstrap_se([0.7] * 10) == 0.0
    assert bootstrap_se([0.7]) == 0.0


# ------------------------------------------------------------------ compute_metrics


def _rows(pid, ds, scores, correct, answers):
    return [{"prompt_id": pid, "sample": j, "data_source": ds, "score": s, "correct": c, "answer": a}
            for j, (s, c, a) in enumerate(zip(scores, correct, answers))]


def _hand_rows():
    T, F = True, False
    return (_rows(0, "a", [1, 0, 1, 0], [T, F, T, F], ["5", "3", "5", "4"])       # c=2, majority "5" right
            + _rows(1, "a", [0, 0, 0, 0.5], [F, F, F, F], ["1", "1", None, "2"])  # c=0, partial credit
            + _rows(2, "b", [1, 1, 1, 1], [T, T, T, T], ["x"] * 4))


def test_compute_metrics_hand_computed():
    m = compute_metrics(_hand_rows(), ks=[1, 2, 4], seed=0)
    a = m["a"]
    assert a["num_prompts"] == 2 and a["n"] == 4
    assert a["mean@4"] == pytest.approx((0.5 + 0.125) / 2)
    assert a["pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert a["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # 1 - C(2,2)/C(4,2)
    assert a["pass@4"] == pytest.approx(0.5)
    assert a["maj@4"] == pytest.approx(0.5)
    assert m["b"]["mean@4"] == 1.0 and m["b"]["maj@4"] == 1.0 and m["b"]["mean@4/se"] == 0.0
    assert m["all"]["num_prompts"] == 3
    assert m["all"]["mean@4"] == pytest.approx((0.5 + 0.125 + 1) / 3)
    assert m["all"]["pass@1"] == pytest.approx(0.5)
    assert m["all"]["maj@4"] == pytest.approx(2 / 3)
    assert a["mean@4/se"] > 0


def test_compute_metrics_rejects_uneven_n():
    rows = _rows(0, "a", [1, 0], [True, False], ["1", "2"]) + _rows(1, "a", [1], [True], ["1"])
    with pytest.raises(ValueError, match="same n"):
        compute_metrics(rows)


# ------------------------------------------------------------------ re-scoring a generations file


def _write_generations(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


GEN_ROWS = [
    # prompt 0 (ground truth 12): right with ####, right without #### (partial 0.5), wrong
    {"prompt_id": 0, "sample": 0, "data_source": "arithmetic", "response": "7 + 5 = 12 #### 12", "ground_truth": "12"},
    {"prompt_id": 0, "sample": 1, "data_source": "arithmetic", "response": "it is 12", "ground_truth": "12"},
    {"prompt_id": 0, "sample": 2, "data_source": "arithmetic", "response": "#### 13", "ground_truth": "12"},
    # prompt 1 (ground truth 6): all wrong, two say 5
    {"prompt_id": 1, "sample": 0, "data_source": "arithmetic", "response": "#### 5", "ground_truth": "6"},
    {"prompt_id": 1, "sample": 1, "data_source": "arithmetic", "response": "#### 5.0", "ground_truth": "6"},
    {"prompt_id": 1, "sample": 2, "data_source": "arithmetic", "response": "no idea", "ground_truth": "6"},
]


def test_rescore_generations_file(tmp_path):
    gen = tmp_path / "gen.jsonl"
    _write_generations(gen, GEN_ROWS)
    res = evaluate(EvalOptions(generations=str(gen), out=str(tmp_path / "out"), ks=[1, 3], reward_workers=0))
    m = res.metrics["arithmetic"]
    # scores: p0 [1, 0.5, 0] (acc 1, 1, 0), p1 [0, 0, 0]
    assert m["mean@3"] == pytest.approx((1.5 / 3 + 0) / 2)
    assert m["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["pass@3"] == pytest.approx(0.5)
    # p0 votes 12, 12, 13 -> right; p1 votes 5, 5.0 (one answer), abstain -> wrong
    assert m["maj@3"] == pytest.approx(0.5)
    written = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [r["score"] for r in written] == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert written[1]["reward"]["format_ok"] is False
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"] == res.metrics
    assert saved["config"]["n"] == 3 and saved["config"]["k"] == [1, 3]


def test_rescore_with_user_reward_fn_and_no_pred(tmp_path):
    # A float-returning function: correct = score >= 1; the answer to vote on = stripped response.
    fn = tmp_path / "rw.py"
    fn.write_text("def compute_score(ds, response, gt, extra):\n    return float(response.strip() == gt)\n")
    gen = tmp_path / "gen.jsonl"
    _write_generations(gen, [
        {"prompt_id": 0, "data_source": "anything", "response": " b ", "ground_truth": "b", "sample": 0},
        {"prompt_id": 0, "data_source": "anything", "response": "a", "ground_truth": "b", "sample": 1},
        {"prompt_id": 0, "data_source": "anything", "response": "a ", "ground_truth": "b", "sample": 2},
    ])
    res = evaluate(EvalOptions(generations=str(gen), out=str(tmp_path / "o"), reward_fn=f"{fn}:compute_score",
                               reward_workers=0))
    m = res.metrics["anything"]
    assert m["mean@3"] == pytest.approx(1 / 3)
    assert m["pass@1"] == pytest.approx(1 / 3) and m["pass@2"] == pytest.approx(2 / 3)
    assert m["maj@3"] == 0.0  # "a" wins 2 to 1


def test_generations_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluate(EvalOptions(generations=str(tmp_path / "nope.jsonl"), out=str(tmp_path / "o")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": 0, "response": "x"}\n')
    with pytest.raises(UserError, match="data_source"):
        evaluate(EvalOptions(generations=str(bad), out=str(tmp_path / "o")))


def test_options_errors(tmp_path):
    with pytest.raises(UserError, match="no model"):
        evaluate(EvalOptions(data="x.parquet"))
    with pytest.raises(UserError, match="x.parquet does not exist"):
        evaluate(EvalOptions(model="tiny-qwen2", data="x.parquet"))
    gen = tmp_path / "gen.jsonl"
    _write_generations(gen, GEN_ROWS)
    with pytest.raises(UserError, match="exceeds the 3 samples"):
        evaluate(EvalOptions(generations=str(gen), ks=[4], out=str(tmp_path / "o"), reward_workers=0))
    with pytest.raises(UserError, match="greedy"):
        evaluate(EvalOptions(model="tiny-qwen2", data="x.parquet", n=4, temperature=0.0))
    with pytest.raises(UserError, match="--k"):
        evaluate(EvalOptions(model="tiny-qwen2", data="x.parquet", n=2, ks=[4]))


# ------------------------------------------------------------------ generating (hf engine, tiny-qwen2)


def test_same_data_same_seed_same_metrics(tmp_path):
    data = arith_parquet(tmp_path / "test.parquet", 3)

    def run(seed, out):
        return evaluate(EvalOptions(model="tiny-qwen2", data=str(data), n=3, engine="hf", max_tokens=6,
                                    seed=seed, out=str(tmp_path / out), reward_workers=0))

    a, b, c = run(7, "a"), run(7, "b"), run(8, "c")
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    assert (tmp_path / "a" / "generations.jsonl").read_bytes() == (tmp_path / "b" / "generations.jsonl").read_bytes()
    assert [r["response"] for r in a.rows] != [r["response"] for r in c.rows]
    assert len(a.rows) == 9 and [(r["prompt_id"], r["sample"]) for r in a.rows][:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    m = a.metrics["arithmetic"]
    assert set(m) >= {"mean@3", "mean@3/se", "pass@1", "pass@2", "pass@3", "maj@3"}
    assert a.info["temperature"] == 1.0 and a.info["k"] == [1, 2, 3]
    # re-scoring the written file reproduces the metrics without generating
    again = evaluate(EvalOptions(generations=str(tmp_path / "a" / "generations.jsonl"), seed=7,
                                 out=str(tmp_path / "re"), reward_workers=0))
    assert again.metrics == a.metrics


def test_cli_eval_prints_table(tmp_path):
    from typer.testing import CliRunner

    from verlcli.cli import app

    data = arith_parquet(tmp_path / "test.parquet", 2)
    r = CliRunner().invoke(app, ["eval", "--model", "tiny-qwen2", "--data", str(data), "--engine", "hf",
                                 "--max-tokens", "4", "--limit", "1", "--out", str(tmp_path / "o"),
                                 "--reward-workers", "0"])
    assert r.exit_code == 0, r.output
    assert "arithmetic" in r.output and "maj@1" in r.output
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["metrics"]["arithmetic"]["num_prompts"] == 1 and saved["config"]["engine"] == "hf"
