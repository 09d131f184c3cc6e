"""Tool data: `prepare-data arithmetic-tools` (RL prompts with a tools column, the same held-out
problems without tools, SFT tool-use transcripts), and the loaders reading them (real parquet,
a real offline tokenizer with a ChatML template that has no tool support)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from data_prep import prepare
from tests.unit._tok import tiny_tokenizer
from verlcli.data.dataset import load_rl_dataset
from verlcli.data.sft_dataset import load_sft_dataset
from verlcli.errors import UserError
from verlcli.tools import make_tools, parser_for, run_tools, tool_schemas


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("at")
    result = prepare("arithmetic-tools", out=out, train_size=30, test_size=8, seed=3)
    return out, result


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_arithmetic_tools_files(data):
    out, result = data
    assert result["rows"] == {"train": 30, "test": 8, "sft_train": 30, "sft_test": 8, "test_no_tools": 8}
    train, test, plain = _rows(out / "train.parquet"), _rows(out / "test.parquet"), _rows(out / "test_no_tools.parquet")
    key = lambda r: (r["extra_info"]["a"], r["extra_info"]["op"], r["extra_info"]["b"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in test}  # disjoint
    assert [key(r) for r in plain] == [key(r) for r in test]      # the same held-out problems
    for r in train + test:
        a, op, b = key(r)
        assert 100 <= a <= 9999 and 100 <= b <= 9999 and op == "*"
        assert r["data_source"] == "arithmetic" and r["reward_model"]["ground_truth"] == str(a * b)
        assert r["tools"] == ["calculator"] and "calculator" in r["prompt"][-1]["content"]
    assert "tools" not in plain[0] and "calculator" not in plain[0]["prompt"][-1]["content"]


def test_sft_transcripts_train_only_the_assistant_turns(data):
    out, _ = data
    tok = tiny_tokenizer()
    [row] = _rows(out / "sft_test.parquet")[:1]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(row["tools"])[0]["function"]["name"] == "calculator"
    ds = load_sft_dataset([out / "sft_test.parquet"], tok, max_length=1024)
    ids, mask = ds[0]["input_ids"], ds[0]["loss_mask"]
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    call, result, answer = row["messages"][1]["content"], row["messages"][2]["content"], row["messages"][3]["content"]
    assert learned == f"{call}<|im_end|>\n{answer}<|im_end|>\n"
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<tools>" in context and f"<tool_response>\n{result}\n</tool_response>" in context
    # The transcript's call is what the parser reads and the calculator answers correctly.
    [parsed] = parser_for(tok).parse(call)
    [res] = run_tools([parsed], make_tools(["calculator"], timeout_s=1, memory_mb=256))
    assert res.ok and res.content == result


def test_rl_prompts_with_tools(data):
    out, _ = data
    tok = tiny_tokenizer()
    tools = make_tools(["calculator"], timeout_s=1, memory_mb=256)
    schemas = dict(zip(tools, tool_schemas(tools)))
    with_tools = load_rl_dataset([out / "test.parquet"], tok, max_prompt_tokens=2048, tool_schemas=schemas)
    assert with_tools[0]["tools"] == ["calculator"]
    assert "<tools>" in tok.decode(with_tools[0]["input_ids"])
    plain = load_rl_dataset([out / "test.parquet"], tok, max_prompt_tokens=2048)  # no schemas: not shown
    assert plain[0]["tools"] == ["calculator"] and "<tools>" not in tok.decode(plain[0]["input_ids"])
    with pytest.raises(UserError, match="'calculator', which is not among"):
        load_rl_dataset([out / "test.parquet"], tok, max_prompt_tokens=2048, tool_schemas={})
    no_column = load_rl_dataset([out / "test_no_tools.parquet"], tok, max_prompt_tokens=2048)
    assert no_column[0]["tools"] is None
