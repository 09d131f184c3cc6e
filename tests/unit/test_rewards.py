"""Rewards: built-in scorers on hand-checked cases (with traps), the registry's aliases, user
functions, and the process pool's guarantees (never raises, timeouts kill only the hung item)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from verlcli.errors import UserError
from verlcli.rewards import REWARDS, RewardScorer, get_scorer, load_user_fn, score_item
from verlcli.rewards.arithmetic import score_arithmetic
from verlcli.rewards.countdown import evaluate, score_countdown
from verlcli.rewards.gsm8k import score_gsm8k
from verlcli.rewards.math_reward import last_boxed, score_math
from verlcli.rewards.numeric import last_hash_answer, last_number, numbers_equal


# -- numbers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,truth,equal", [
    ("1,000", "1000", True), ("18.0", "18", True), ("$18", "18", True), ("18.00", "18", True),
    ("-3", "-3", True), ("0.5", ".5", True), ("17", "18", False), ("1,000", "100", False), ("abc", "18", False),
])
def test_numbers_equal(pred, truth, equal):
    assert numbers_equal(pred, truth) is equal


def test_number_extraction_reads_last_and_keeps_thousands_together():
    assert last_hash_answer("#### 5 then\n#### $1,000.50") == "1000.50"
    assert last_hash_answer("**#### 42**") == "42"
    assert last_hash_answer("no marker 12") is None
    assert last_number("take 3,4 and 1,234 apples") == "1234"
    assert last_number("lists 3,4") == "4"  # "3,4" is two numbers, not 34


# -- gsm8k ------------------------------------------------------------------------------------
def test_gsm8k_strict_value_comparison():
    assert score_gsm8k("openai/gsm8k", "so the total is #### 1,000", "1000")["score"] == 1.0
    assert score_gsm8k("gsm8k", "#### 18.0", "18")["score"] == 1.0
    assert score_gsm8k("gsm8k", "#### $18", "18")["score"] == 1.0


def test_gsm8k_early_mention_then_different_final_answer_is_wrong():
    r = score_gsm8k("gsm8k", "Maybe 18? No: 9 * 2 = 20, wait. #### 18 is wrong.\n#### 20", "18")
    assert r == {"score": 0.0, "acc": 0.0, "format_ok": True, "pred": "20"}


def test_gsm8k_answer_far_from_the_end_is_found():
    # verl only looks at the last 300 characters; we search the whole response.
    r = score_gsm8k("gsm8k", "#### 18\n" + "padding " * 100, "18")
    assert r["score"] == 1.0


def test_gsm8k_no_marker_and_format_score_and_flexible():
    assert score_gsm8k("gsm8k", "The answer is 18.", "18") == {"score": 0.0, "acc": 0.0, "format_ok": False, "pred": None}
    assert score_gsm8k("gsm8k", "#### 17", "18", format_score=0.1)["score"] == 0.1
    assert score_gsm8k("gsm8k", "The answer is 18.", "18", method="flexible")["score"] == 1.0
    assert score_gsm8k("gsm8k", "18 or rather 19", "18", method="flexible")["score"] == 0.0


# -- math -------------------------------------------------------------------------------------
def test_last_boxed_balances_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"cut off \boxed{\frac{1}{2") is None
    assert last_boxed("no box") is None


def test_math_equivalence_through_math_verify():
    assert score_math("math", r"so \boxed{\frac{1}{2}}", "0.5")["score"] == 1.0
    assert score_math("lighteval/MATH", r"\boxed{0.5}", r"\frac{1}{2}")["score"] == 1.0
    assert score_math("math", r"\boxed{\dfrac{1}{2}}", r"\frac12")["score"] == 1.0
    r = score_math("math", r"\boxed{\frac{1}{3}}", "0.5")
    assert r["score"] == 0.0 and r["format_ok"] is True
    assert score_math("math", "the answer is 1/2", "0.5")["format_ok"] is False


# -- countdown --------------------------------------------------------------------------------
GT = json.dumps({"target": 16, "numbers": [3, 5, 2]})


def test_countdown_correct_in_either_format():
    assert score_countdown("countdown", "<answer>(3 + 5) * 2</answer>", GT)["score"] == 1.0
    assert score_countdown("countdown", "think...\n#### (3 + 5) * 2 = 16", GT)["score"] == 1.0
    assert score_countdown("countdown", "#### (5+3)*2", {"target": 16, "numbers": [3, 5, 2]})["score"] == 1.0


def test_countdown_rejects_reused_number_unknown_number_and_wrong_value():
    r = score_countdown("countdown", "#### 5 + 5 + 3 + 3", GT)  # 16, but 5 and 3 used twice
    assert r["score"] == 0.0 and "more often than given" in r["reason"]
    assert score_countdown("countdown", "#### 8 * 2", GT)["score"] == 0.0  # 8 is not given
    assert score_countdown("countdown", "#### 3 + 5 + 2", GT)["reason"].startswith("evaluates to 10")
    assert score_countdown("countdown", "#### (3 + 5) * 2", json.dumps({"target": 16, "numbers": [3, 5, 2, 9]}))[
        "score"] == 1.0  # at most once: not every number must be used


def test_countdown_never_evaluates_code():
    for bad in ["__import__('os').system('echo hi')", "3 ** 5", "2 // 1", "(3).real", "-3 + 5"]:
        r = score_countdown("countdown", f"<answer>{bad}</answer>", GT)
        assert r["score"] == 0.0 and r["reason"]
    assert score_countdown("countdown", "#### 3 / (5 - 5)", GT)["reason"] == "division by zero"
    assert evaluate("6 / 4 * 2")[0] == 3  # exact fractions, no float error


def test_countdown_without_expression():
    assert score_countdown("countdown", "I give up", GT) == {
        "score": 0.0, "acc": 0.0, "format_ok": False, "pred": None, "reason": "no expression"}


# -- arithmetic -------------------------------------------------------------------------------
def test_arithmetic_marker_and_fallback():
    assert score_arithmetic("arithmetic", "7 * 8 = 56\n#### 56", "56")["score"] == 1.0
    assert score_arithmetic("arithmetic", "It is 56.", "56") == {"score": 0.5, "acc": 1.0, "format_ok": False, "pred": "56"}
    assert score_arithmetic("arithmetic", "56? no.\n#### 54", "56")["score"] == 0.0
    assert score_arithmetic("arithmetic", "I think 56 maybe 57", "56")["score"] == 0.0


# -- registry ---------------------------------------------------------------------------------
def test_registry_aliases_cover_verl_data_sources():
    assert get_scorer("openai/gsm8k") is get_scorer("gsm8k")
    for name in ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "math"):
        assert get_scorer(name) is score_math
    assert {"countdown", "arithmetic"} <= set(REWARDS)
    with pytest.raises(UserError, match="no reward function for data_source 'nope'"):
        get_scorer("nope")


# -- user functions ---------------------------------------------------------------------------
USER_FNS = textwrap.dedent("""
    import time

    def exact(data_source, solution_str, ground_truth, extra_info=None):
        return float(solution_str.strip() == ground_truth)

    def with_extras(data_source, response, ground_truth, extra_info):
        return {"score": 0.75, "acc": True, "note": "ok", "len": len(response)}

    def boom(data_source, response, ground_truth, extra_info):
        raise RuntimeError("kaboom")

    def nan(*args):
        return float("nan")

    def text(*args):
        return "1.0"

    def exits(*args):
        raise SystemExit(3)

    def slow(data_source, response, ground_truth, extra_info):
        if response == "hang":
            time.sleep(60)
        return 1.0

    def crash(data_source, response, ground_truth, extra_info):
        if response == "crash":
            import os
            os._exit(7)
        return 1.0

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return 0.25
""")


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_FNS)
    return path


def test_load_user_fn(user_file):
    assert load_user_fn(f"{user_file}:exact")("x", "a", "a", None) == 1.0
    assert load_user_fn(str(user_file))("x", "a", "b", None) == 0.25  # default name compute_score
    with pytest.raises(UserError, match="has no function 'missing'.*exact"):
        load_user_fn(f"{user_file}:missing")
    with pytest.raises(UserError, match="does not exist"):
        load_user_fn(f"{user_file.parent}/nope.py:fn")


def test_load_user_fn_reports_import_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n")
    with pytest.raises(UserError, match="importing reward function file .* failed: SyntaxError"):
        load_user_fn(f"{bad}:f")


def _item(response, ds="gsm8k", gt="18"):
    return {"data_source": ds, "response": response, "ground_truth": gt, "extra_info": {}}


@pytest.mark.parametrize("name,expect_error", [
    ("boom", "RuntimeError: kaboom"), ("nan", "non-finite"), ("text", "returned str"), ("exits", "SystemExit"),
])
def test_score_item_turns_bad_user_functions_into_errors(user_file, name, expect_error):
    r = score_item(_item("x", ds="my_ds"), load_user_fn(f"{user_file}:{name}"))
    assert r["score"] == 0.0 and "my_ds" in r["error"] and expect_error in r["error"]


def test_score_item_dict_and_unknown_source(user_file):
    r = score_item(_item("abc"), load_user_fn(f"{user_file}:with_extras"))
    assert r == {"score": 0.75, "error": None, "acc": True, "note": "ok", "len": 3}
    r = score_item(_item("#### 18", ds="unknown_source"))
    assert r["score"] == 0.0 and "unknown_source" in r["error"] and "reward.fn" in r["error"]


def test_inline_scorer_kwargs_reach_builtins():
    scorer = RewardScorer(num_workers=0, scorer_kwargs={"gsm8k": {"format_score": 0.1}})
    assert [r["score"] for r in scorer.score([_item("#### 17"), _item("#### 18", ds="openai/gsm8k")])] == [0.1, 1.0]


def test_pool_timeout_kills_only_the_hung_item_and_keeps_order(user_file):
    items = [_item("a"), _item("hang"), _item("b"), _item("c"), _item("d")]
    with RewardScorer(f"{user_file}:slow", timeout_s=1.0, num_workers=2) as scorer:
        results = scorer.score(items)
        assert [r["score"] for r in results] == [1.0, 0.0, 1.0, 1.0, 1.0]
        assert "timed out after 1s" in results[1]["error"] and "gsm8k" in results[1]["error"]
        assert all(r["error"] is None for i, r in enumerate(results) if i != 1)
        assert scorer.stats["timeouts"] == 1
        # the rebuilt pool keeps working
        assert [r["score"] for r in scorer.score([_item("e")])] == [1.0]


def test_pool_survives_a_worker_that_dies(user_file):
    with RewardScorer(f"{user_file}:crash", timeout_s=30, num_workers=1) as scorer:
        results = scorer.score([_item("a"), _item("crash"), _item("b")])
    assert [r["score"] for r in results] == [1.0, 0.0, 1.0]
    assert "died (exit code 7)" in results[1]["error"]


def test_pool_builtins_unknown_source_and_raising_fn(user_file):
    items = [_item("#### 1,000", gt="1000"), _item(r"\boxed{\frac{1}{2}}", ds="math", gt="0.5"),
             _item("#### 18", ds="who_knows")]
    with RewardScorer(timeout_s=30, num_workers=1) as scorer:
        results = scorer.score(items)
    assert [r["score"] for r in results] == [1.0, 1.0, 0.0]
    assert results[0]["acc"] == 1.0 and results[2]["error"].startswith("no reward function for data_source 'who_knows'")
    with RewardScorer(f"{user_file}:boom", timeout_s=30, num_workers=1) as scorer:
        r = scorer.score([_item("x")])[0]
    assert r["score"] == 0.0 and "kaboom" in r["error"]
    assert not math.isnan(r["score"])


def test_pool_bad_spec_fails_fast(tmp_path):
    with pytest.raises(UserError):
        RewardScorer(f"{tmp_path}/missing.py:fn")
