"""A model's shape from its `config.json`, without loading weights (for `verl plan`).

Where the config comes from, in this order:
  1. a local directory → its config.json;
  2. a built-in name → the built directory's config.json, or, before the first build, the
     config shipped in `verlcli/models/configs/` (planning must not trigger a 17 s build);
  3. a hub id → the shipped config of the preset models (offline), then the local Hugging
     Face cache, then the hub through transformers' AutoConfig (only with network).
Parameter counts follow the Llama/Qwen2 decoder layout (GQA attention, SwiGLU MLP, RMSNorm),
with MoE experts when the config names them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from verlcli.errors import UserError

CONFIGS_PACKAGE = "verlcli.models.configs"
# Built-in name → shipped config of the same architecture (used until the model is built).
BUILTIN_CONFIGS = {"smollm2-135m-instruct": "HuggingFaceTB--SmolLM2-135M-Instruct",
                   "tiny-qwen2": "verlcli--tiny-qwen2"}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    experts: int = 0            # routed experts per MoE layer (0 = dense)
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0  # shared expert(s) of a MoE layer, summed

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        """Input embedding (+ output layer when not tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def _attention_params(self) -> int:
        h = self.hidden
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return h * self.q_dim * 2 + h * self.kv_dim * 2 + bias

    def _mlp_params(self, active: bool) -> int:
        if not self.experts:
            return 3 * self.hidden * self.intermediate
        routed = self.experts_per_token if active else self.experts
        return (3 * self.hidden * (self.moe_intermediate * routed + self.shared_intermediate)
                + self.hidden * self.experts)  # router

    def layer_params(self, active: bool = False) -> int:
        return self._attention_params() + self._mlp_params(active) + 2 * self.hidden

    @property
    def params(self) -> int:
        """All parameters of the causal LM (tied embeddings counted once)."""
        return self.embedding_params + self.layers * self.layer_params() + self.hidden

    @property
    def active_params(self) -> int:
        """Parameters one token passes through (MoE: only its experts) — for FLOPs."""
        return self.embedding_params + self.layers * self.layer_params(active=True) + self.hidden

    @property
    def value_model_params(self) -> int:
        """The critic: the backbone with a 1-output head instead of the LM head."""
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden + self.hidden + 1

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """Adapter parameters: rank × (in + out) per targeted linear per layer."""
        h, i = self.hidden, self.intermediate
        dims = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        per_layer = sum(rank * sum(dims[t]) for t in targets if t in dims)
        return per_layer * self.layers


def shape_from_config(name: str, c: dict) -> ModelShape:
    """ModelShape from the dict of a config.json (missing keys named in the error)."""
    c = {**c, **(c.get("text_config") or {})}  # multimodal configs nest the language model
    try:
        hidden, layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
        heads, vocab = int(c["num_attention_heads"]), int(c["vocab_size"])
    except KeyError as e:
        raise UserError(f"config.json of {name} has no {e.args[0]!r}: cannot size the model",
                        fix="point model.path at a decoder LM directory (Llama/Qwen/Mistral-like)") from None
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    experts = int(c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts") or 0)
    moe_i = int(c.get("moe_intermediate_size") or c.get("intermediate_size") or 0) if experts else 0
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    if experts and not shared and c.get("n_shared_experts"):
        shared = int(c["n_shared_experts"]) * moe_i
    qkv_bias = bool(c.get("attention_bias", c.get("model_type") == "qwen2"))
    return ModelShape(
        name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim,
        intermediate=int(c.get("intermediate_size") or 4 * hidden), vocab=vocab,
        tied=bool(c.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, experts=experts,
        experts_per_token=int(c.get("num_experts_per_tok") or 0), moe_intermediate=moe_i,
        shared_intermediate=shared)


def shipped_config(key: str) -> dict | None:
    """The shipped config.json for a hub id ('Qwen/Qwen2.5-7B-Instruct') or file key."""
    fname = key.replace("/", "--") + ".json"
    files = {f.name.lower(): f for f in resources.files(CONFIGS_PACKAGE).iterdir()}
    f = files.get(fname.lower())
    return json.loads(f.read_text()) if f is not None else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}", fix="check the model directory") from None


def _hub_config(repo_id: str) -> dict:
    """The local HF cache first; the hub only when the network works."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cached, str) and os.path.isfile(cached):
            return _read_json(Path(cached))
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(repo_id).to_dict()
    except Exception as e:
        raise UserError(
            f"the config.json of {repo_id!r} is not shipped, not in the Hugging Face cache, and "
            f"the hub cannot be reached ({type(e).__name__})",
            fix=f"run once with network (`hf download {repo_id} config.json`), or set model.path "
                "to a local model directory") from None


def load_shape(name_or_path: str) -> ModelShape:
    """ModelShape for a model.path value: local dir, built-in, or hub id (see module doc)."""
    from verlcli.models.builtin import BUILTINS, MARKER, models_dir

    name = os.fspath(name_or_path).strip()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {name} has no config.json",
                            fix="point model.path at a Hugging Face model directory")
        return shape_from_config(name, _read_json(path / "config.json"))
    if name in BUILTINS:
        built = models_dir() / name
        if (built / MARKER).is_file() and (built / "config.json").is_file():
            return shape_from_config(name, _read_json(built / "config.json"))
        return shape_from_config(name, shipped_config(BUILTIN_CONFIGS[name]))
    if "/" in name and not name.startswith((".", "/", "~")):
        return shape_from_config(name, shipped_config(name) or _hub_config(name))
    raise UserError(f"model.path {name!r} is not a directory, a built-in or a hub id",
                    fix="use a local model directory, a built-in (tiny-qwen2, smollm2-135m-instruct) "
                        "or a hub id like Qwen/Qwen2.5-0.5B-Instruct")


def divides_heads(shape: ModelShape, tp: int) -> bool:
    """Tensor parallelism must split attention heads and KV heads evenly (vLLM's check;
    KV heads fewer than TP are replicated instead)."""
    kv_ok = shape.kv_heads % tp == 0 if shape.kv_heads >= tp else tp % shape.kv_heads == 0
    return shape.heads % tp == 0 and kv_ok


def kv_heads_per_rank(shape: ModelShape, tp: int) -> int:
    return max(1, math.ceil(shape.kv_heads / tp))
