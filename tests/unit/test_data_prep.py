"""`verl prepare-data`: every dataset writes the one schema; bad input is a UserError that names
the thing; nothing is half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep import DATASETS, prepare
from verlcli.errors import UserError
from verlcli.rewards import get_scorer

GSM8K_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"
RL_COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]


def _rows(path):
    return pq.read_table(path).to_pylist()


def _check_schema(rows, split):
    for i, r in enumerate(rows[:50]):
        assert list(r) == RL_COLUMNS
        assert isinstance(r["data_source"], str)
        assert r["prompt"] and all(set(m) == {"role", "content"} for m in r["prompt"])
        assert r["reward_model"]["style"] == "rule" and isinstance(r["reward_model"]["ground_truth"], str)
        assert r["extra_info"]["split"] == split and r["extra_info"]["index"] == i


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="shared GSM8K copy not present")
def test_gsm8k_from_local_source(tmp_path):
    result = prepare("gsm8k", source=str(GSM8K_DIR), out=tmp_path)
    assert result["rows"] == {"train": 7473, "test": 1319, "sft_train": 7473, "sft_test": 1319}
    train, test = _rows(tmp_path / "train.parquet"), _rows(tmp_path / "test.parquet")
    assert (len(train), len(test)) == (7473, 1319)
    _check_schema(train, "train")
    _check_schema(test, "test")
    first = test[0]  # Janet's ducks
    assert first["data_source"] == "openai/gsm8k" and first["reward_model"]["ground_truth"] == "18"
    assert first["prompt"][0]["content"].endswith('Let\'s think step by step and output the final answer after "####".')
    assert first["extra_info"]["question"].startswith("Janet")
    assert all("," not in r["reward_model"]["ground_truth"] for r in train)  # "#### 1,000" -> "1000"
    sft = _rows(tmp_path / "sft_test.parquet")[0]
    assert sft["prompt"] == first["prompt"] and sft["response"].endswith("#### 18") and "<<" not in sft["response"]
    # the reference solutions score 1.0 with the gsm8k reward
    scorer = get_scorer(first["data_source"])
    assert scorer(first["data_source"], sft["response"], first["reward_model"]["ground_truth"], None)["score"] == 1.0


def _write_jsonl(path: Path, rows: list, broken_line: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if broken_line:
        lines.insert(broken_line - 1, '{"question": "oops", ')
    path.write_text("\n".join(lines) + "\n")
    return path


def _gsm8k_dir(tmp_path, n=3, **kw) -> Path:
    src = tmp_path / "src"
    src.mkdir(parents=True)
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i:,}"}
            for i in range(n)]
    _write_jsonl(src / "train.jsonl", rows, **kw)
    _write_jsonl(src / "test.jsonl", rows[:1])
    return src


def test_gsm8k_malformed_jsonl_names_the_line_and_writes_nothing(tmp_path):
    src = _gsm8k_dir(tmp_path, broken_line=3)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"train\.jsonl: line 3 is not valid JSON") as e:
        prepare("gsm8k", source=str(src), out=out)
    assert "line 3" in e.value.fix
    assert not out.exists() or not list(out.iterdir())


def test_gsm8k_missing_key_and_missing_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "train.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q2", "solution": "#### 2"}])
    with pytest.raises(UserError, match=r"line 2 has no 'answer' \(it has: 'question', 'solution'\)"):
        prepare("gsm8k", source=str(src), out=tmp_path / "out")
    with pytest.raises(UserError, match="has no test.jsonl"):
        (src / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
        prepare("gsm8k", source=str(src), out=tmp_path / "out")
    with pytest.raises(UserError, match="is missing"):
        prepare("gsm8k", source=str(tmp_path / "nowhere"), out=tmp_path / "out")


def test_gsm8k_sizes_and_comma_ground_truth(tmp_path):
    prepare("gsm8k", source=str(_gsm8k_dir(tmp_path, n=600)), out=tmp_path / "o", train_size=2)
    rows = _rows(tmp_path / "o" / "train.parquet")
    assert len(rows) == 2
    big = prepare("gsm8k", source=str(_gsm8k_dir(tmp_path / "b", n=600)), out=tmp_path / "p")
    assert _rows(tmp_path / "p" / "train.parquet")[599]["reward_model"]["ground_truth"] == "1198"
    assert big["rows"]["train"] == 600


def test_unknown_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'gsm9k'; valid: gsm8k, math, countdown, arithmetic, arithmetic-tools, custom"):
        prepare("gsm9k", out=tmp_path)


def test_option_that_does_not_apply(tmp_path):
    with pytest.raises(UserError, match="--operators does not apply to gsm8k") as e:
        prepare("gsm8k", out=tmp_path, operators="+")
    assert "--source" in e.value.fix


def test_arithmetic_is_seeded_disjoint_and_scorable(tmp_path):
    a = prepare("arithmetic", out=tmp_path / "a", seed=1, train_size=40, test_size=10, max_operand=9)
    b = prepare("arithmetic", out=tmp_path / "b", seed=1, train_size=40, test_size=10, max_operand=9)
    train, test = _rows(tmp_path / "a" / "train.parquet"), _rows(tmp_path / "a" / "test.parquet")
    assert train == _rows(tmp_path / "b" / "train.parquet") and a["rows"] == b["rows"]
    _check_schema(train, "train")
    assert {r["data_source"] for r in train} == {"arithmetic"}
    qs = lambda rows: {r["extra_info"]["question"] for r in rows}  # noqa: E731
    assert not qs(train) & qs(test)
    r = train[0]
    e = r["extra_info"]
    assert int(r["reward_model"]["ground_truth"]) == {"+": e["a"] + e["b"], "*": e["a"] * e["b"]}[e["op"]]
    assert "####" in r["prompt"][-1]["content"]
    for row, sft in zip(train, _rows(tmp_path / "a" / "sft_train.parquet")):
        assert get_scorer("arithmetic")("arithmetic", sft["response"], row["reward_model"]["ground_truth"], None)["score"] == 1.0


def test_arithmetic_small_space_overlaps_with_a_note(tmp_path):
    result = prepare("arithmetic", out=tmp_path, train_size=30, test_size=5, min_operand=1, max_operand=2, operators="+")
    assert result["rows"]["train"] == 30 and "overlap" in result["notes"][0]
    with pytest.raises(UserError, match="unknown operator '/'"):
        prepare("arithmetic", out=tmp_path, operators="+/")


def test_arithmetic_default_train_size_keeps_a_small_space_disjoint(tmp_path):
    # 12 × 12 × {+, *} = 288 problems: without --train-size, train is what the 100 test rows leave.
    result = prepare("arithmetic", out=tmp_path, max_operand=12)
    assert result["rows"]["train"] == 188 and result["rows"]["test"] == 100 and not result["notes"]
    qs = lambda rows: {r["extra_info"]["question"] for r in rows}  # noqa: E731
    assert not qs(_rows(tmp_path / "train.parquet")) & qs(_rows(tmp_path / "test.parquet"))


def test_countdown_solutions_score_one(tmp_path):
    prepare("countdown", out=tmp_path, seed=3, train_size=30, test_size=5, num_count=4)
    train, sft = _rows(tmp_path / "train.parquet"), _rows(tmp_path / "sft_train.parquet")
    _check_schema(train, "train")
    for row, s in zip(train, sft):
        gt = json.loads(row["reward_model"]["ground_truth"])
        assert len(gt["numbers"]) == 4 and 1 <= gt["target"] <= 100
        assert get_scorer("countdown")("countdown", s["response"], row["reward_model"]["ground_truth"], None)["score"] == 1.0


def test_custom_jsonl_with_holdout_and_system_prompt(tmp_path):
    src = _write_jsonl(tmp_path / "qa.jsonl", [{"q": f"question {i}", "a": i, "r": f"#### {i}"} for i in range(20)])
    result = prepare("custom", source=str(src), out=tmp_path / "o", prompt_key="q", answer_key="a",
                     response_key="r", data_source="gsm8k", system_prompt="Be brief.")
    assert result["rows"] == {"train": 18, "test": 2, "sft_train": 18, "sft_test": 2}
    rows = _rows(tmp_path / "o" / "train.parquet") + _rows(tmp_path / "o" / "test.parquet")
    assert sorted(int(r["reward_model"]["ground_truth"]) for r in rows) == list(range(20))
    assert rows[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert rows[0]["data_source"] == "gsm8k"


def test_custom_parquet_chat_prompts_and_missing_column(tmp_path):
    import pyarrow as pa

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "hi"}]] * 3, "gt": ["1", "2", "3"]}), path)
    prepare("custom", source=str(path), out=tmp_path / "o", prompt_key="messages", answer_key="gt", test_size=1)
    assert _rows(tmp_path / "o" / "train.parquet")[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert not (tmp_path / "o" / "sft_train.parquet").exists()
    with pytest.raises(UserError, match=r"in\.parquet: row 0 has no 'answer' \(it has: 'messages', 'gt'\)") as e:
        prepare("custom", source=str(path), out=tmp_path / "p", prompt_key="messages")
    assert "--answer-key" in e.value.fix
    with pytest.raises(UserError, match="needs --source"):
        prepare("custom", out=tmp_path / "p")
    with pytest.raises(UserError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        prepare("custom", source=str(tmp_path / "x.csv"), out=tmp_path / "p")


def test_math_local_source_boxed_ground_truth(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    rows = [{"problem": "Half of one?", "solution": r"It is \boxed{\frac{1}{2}}.", "level": "Level 1", "type": "Algebra"},
            {"problem": "No box", "solution": "42"}]
    _write_jsonl(src / "train.jsonl", rows)
    _write_jsonl(src / "test.jsonl", rows[:1])
    result = prepare("math", source=str(src), out=tmp_path / "o")
    assert result["rows"]["train"] == 1 and "skipped 1" in result["notes"][0]
    row = _rows(tmp_path / "o" / "train.parquet")[0]
    assert row["reward_model"]["ground_truth"] == r"\frac{1}{2}"
    assert row["data_source"] == "DigitalLearningGmbH/MATH-lighteval"
    assert row["prompt"][0]["content"].endswith(r"output the final answer within \boxed{}.")


def test_every_dataset_is_registered():
    assert list(DATASETS) == ["gsm8k", "math", "countdown", "arithmetic", "arithmetic-tools", "custom"]


def test_command_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, verlcli.commands.prepare_data; "
            "print([m for m in ('torch', 'transformers', 'datasets', 'pyarrow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
