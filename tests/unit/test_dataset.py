"""Reading parquet for training: RL prompts (chat template, length limit, verl-made files),
the resumable PromptLoader, and SFT samples with assistant-only loss masks."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import prepare
from verlcli.data.dataset import PromptLoader, load_rl_dataset
from verlcli.data.sft_dataset import _tokenize_segments, assistant_spans, load_sft_dataset, tokenize_conversation
from verlcli.errors import UserError

try:  # tests/unit is on sys.path under pytest's default import mode
    from _tok import tiny_tokenizer
except ImportError:  # tests/ made into a package
    from tests.unit._tok import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    prepare("arithmetic", out=out, seed=0, train_size=12, test_size=4)
    return out


def _write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


# -- RL dataset -------------------------------------------------------------------------------
def test_items_are_templated_and_tokenized(tok, arith):
    ds = load_rl_dataset(str(arith / "train.parquet"), tok, max_prompt_tokens=256)
    assert len(ds) == 12 and ds.data_sources == {"arithmetic": 12}
    row = pq.read_table(arith / "train.parquet").to_pylist()[3]
    item = ds[3]
    assert set(item) == {"input_ids", "messages", "data_source", "ground_truth", "extra_info", "index", "tools"}
    text = f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert item["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert item["ground_truth"] == row["reward_model"]["ground_truth"] and item["index"] == 3
    assert item["extra_info"]["question"] == row["prompt"][0]["content"]


def test_verl_style_parquet_with_string_prompts_and_extra_columns(tok, tmp_path):
    path = _write(tmp_path / "verl.parquet",
                  data_source=["openai/gsm8k", "lighteval/MATH"],
                  prompt=["What is 7 + 5?", "Half of one?"],
                  ability=["math", "math"],
                  reward_model=[{"style": "rule", "ground_truth": "12"}, {"style": "rule", "ground_truth": "0.5"}],
                  something_else=[1, 2])
    ds = load_rl_dataset([path, path], tok, max_prompt_tokens=64)
    assert [it["index"] for it in ds] == [0, 1, 2, 3]  # indexes continue across files
    assert ds[1]["ground_truth"] == "0.5" and ds[1]["extra_info"] == {}
    assert tok.decode(ds[0]["input_ids"]).startswith("<|im_start|>user\nWhat is 7 + 5?<|im_end|>")


def test_missing_file_and_columns_name_the_file_and_the_fix(tok, tmp_path):
    with pytest.raises(UserError, match="nope.parquet does not exist") as e:
        load_rl_dataset(str(tmp_path / "nope.parquet"), tok, max_prompt_tokens=64)
    assert "verl prepare-data" in e.value.fix
    path = _write(tmp_path / "a.parquet", data_source=["x"], question=["hi"])
    with pytest.raises(UserError, match=r"a\.parquet has no column 'prompt' \(columns: data_source, question\)") as e:
        load_rl_dataset(path, tok, max_prompt_tokens=64)
    assert "data.prompt_key" in e.value.fix
    assert len(load_rl_dataset(path, tok, prompt_key="question", max_prompt_tokens=64)) == 1
    path = _write(tmp_path / "b.parquet", prompt=["hi"])
    with pytest.raises(UserError, match="no column 'data_source'"):
        load_rl_dataset(path, tok, max_prompt_tokens=64)
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable parquet file"):
        load_rl_dataset(str(tmp_path / "c.parquet"), tok, max_prompt_tokens=64)


def test_bad_prompt_cell_and_no_chat_template(tok, tmp_path):
    path = _write(tmp_path / "a.parquet", data_source=["x", "x"], prompt=[[{"role": "user", "content": "ok"}], []])
    with pytest.raises(UserError, match=r"a\.parquet: row 1: column 'prompt' holds list"):
        load_rl_dataset(path, tok, max_prompt_tokens=64)
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(UserError, match="has no chat template"):
        load_rl_dataset(path, plain, max_prompt_tokens=64)


def test_too_long_prompt_error_or_truncation(tok, tmp_path):
    long = "Natalia sold clips to 48 of her friends. " * 20
    path = _write(tmp_path / "long.parquet", data_source=["x"] * 3, prompt=["short", long, "short"])
    n = len(load_rl_dataset(path, tok, max_prompt_tokens=10_000)[1]["input_ids"])
    with pytest.raises(UserError, match=rf"long\.parquet: row 1 \(index 1\) has a {n}-token prompt, over data\.max_prompt_tokens=32") as e:
        load_rl_dataset(path, tok, max_prompt_tokens=32)
    assert f"data.max_prompt_tokens={n}" in e.value.fix and "data.truncation=left" in e.value.fix
    full = load_rl_dataset(path, tok, max_prompt_tokens=10_000)[1]["input_ids"]
    ds = load_rl_dataset(path, tok, max_prompt_tokens=32, truncation="left")
    assert ds[1]["input_ids"] == full[-32:] and ds.num_truncated == 1
    with pytest.raises(UserError, match="data.truncation='middle'"):
        load_rl_dataset(path, tok, max_prompt_tokens=32, truncation="middle")


# -- PromptLoader -----------------------------------------------------------------------------
DATA = [{"index": i} for i in range(10)]


def _ids(batch):
    return [it["index"] for it in batch]


def test_loader_covers_each_epoch_once_and_never_yields_short_steps():
    loader = PromptLoader(DATA, prompts_per_step=4, seed=7)
    steps = [_ids(loader.next_batch()) for _ in range(5)]  # 20 prompts = exactly 2 epochs
    assert all(len(s) == 4 for s in steps)
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled with seed + epoch
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["position"] == 0
    assert PromptLoader(DATA, 4, seed=7).next_batch() == [DATA[i] for i in steps[0]]  # reproducible


def test_loader_resume_continues_at_the_exact_position():
    a = PromptLoader(DATA, prompts_per_step=3, seed=1)
    for _ in range(3):
        a.next_batch()  # 9 prompts: mid epoch 0
    state = a.state_dict()
    expected = [_ids(a.next_batch()) for _ in range(4)]  # crosses into epoch 1
    b = PromptLoader(DATA, prompts_per_step=3, seed=1)
    b.load_state_dict(state)
    assert [_ids(b.next_batch()) for _ in range(4)] == expected
    # resuming exactly at an epoch boundary still trains: the next step is full
    c = PromptLoader(DATA, prompts_per_step=5, seed=1)
    c.next_batch(), c.next_batch()
    d = PromptLoader(DATA, prompts_per_step=5, seed=1)
    d.load_state_dict(c.state_dict())
    assert len(d.next_batch()) == 5 and d.state_dict()["epoch"] == 1


def test_loader_edge_cases():
    big = PromptLoader(DATA[:3], prompts_per_step=7, seed=0, shuffle=False)
    assert _ids(next(iter(big))) == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(UserError):
        PromptLoader([], prompts_per_step=2)


# -- SFT --------------------------------------------------------------------------------------
def _masked_text(tok, ids, mask, keep=1):
    return tok.decode([i for i, m in zip(ids, mask) if m == keep])


def test_sft_prompt_response_masks_only_the_response(tok, arith):
    data = load_sft_dataset(str(arith / "sft_train.parquet"), tok, max_length=128)
    assert len(data) == 12
    row = pq.read_table(arith / "sft_train.parquet").to_pylist()[0]
    ids, mask = data[0]["input_ids"], data[0]["loss_mask"]
    assert len(ids) == len(mask)
    assert _masked_text(tok, ids, mask) == row["response"] + "<|im_end|>\n"
    assert _masked_text(tok, ids, mask, keep=0) == (
        f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n")


def test_sft_multi_turn_messages(tok, tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 5?"},
            {"role": "assistant", "content": "#### 12"}, {"role": "user", "content": "And 2 * 3?"},
            {"role": "assistant", "content": "#### 6"}]
    path = _write(tmp_path / "m.parquet", messages=[conv], other=[1])
    item = load_sft_dataset(path, tok, max_length=128)[0]
    assert _masked_text(tok, item["input_ids"], item["loss_mask"]) == "#### 12<|im_end|>\n#### 6<|im_end|>\n"
    assert "And 2 * 3?" in _masked_text(tok, item["input_ids"], item["loss_mask"], keep=0)
    # the slow-tokenizer path gives the same mask on this text
    text, spans = assistant_spans(tok, conv, "row")
    assert _tokenize_segments(tok, text, spans)[1].count(1) == sum(item["loss_mask"])


def test_sft_truncation_and_errors(tok, tmp_path):
    path = _write(tmp_path / "s.parquet", prompt=["x " * 40, "hi"], response=["ok", "#### 1"])
    n = len(tokenize_conversation(tok, [{"role": "user", "content": "x " * 40}, {"role": "assistant", "content": "ok"}])[0])
    with pytest.raises(UserError, match=rf"s\.parquet: row 0 is {n} tokens, over sft\.max_length_tokens=20"):
        load_sft_dataset(path, tok, max_length=20)
    data = load_sft_dataset(path, tok, max_length=20, truncation="right")
    assert len(data) == 1 and data.num_dropped == 1 and data.num_truncated == 1  # row 0 lost its response
    bad = _write(tmp_path / "b.parquet", prompt=["hi"], answer=["1"])
    with pytest.raises(UserError, match=r"has neither 'messages' nor 'prompt' \+ 'response' columns \(columns: prompt, answer\)"):
        load_sft_dataset(bad, tok, max_length=20)
    none = _write(tmp_path / "n.parquet", messages=[[{"role": "user", "content": "hi"}]])
    with pytest.raises(UserError, match="no assistant message"):
        load_sft_dataset(none, tok, max_length=20)
