"""Training checkpoint → Hugging Face directory (`verl merge-checkpoint` as a library).

    from verlcli.merge import merge_checkpoint
    info = merge_checkpoint("runs/x/checkpoints/step_200", out="hf_model", verify=True)

A role checkpoint (`.../step_N/actor` or `.../step_N/critic`, written by the engine at any world
size) holds `model/` (a torch.distributed.checkpoint of the sharded state dict, HF or peft
names), `hf/` (config, tokenizer, generation config) and `meta.json` (kind, lora, dtype, base
model). A step directory means its `actor`.

What this guards against (the classic export bugs):
- wrong or missing keys: the state dict is loaded into the HF class strictly; only the tied
  alias (`lm_head.weight` with tied embeddings) may be absent, and it is tied again;
- a LoRA "merge" that silently equals the base model: an all-zero adapter is an error, and
  after `merge_and_unload` at least one target weight must differ from its base weight;
- a broken export: `verify=True` reloads the written directory with transformers and compares
  its logits with the model built from the checkpoint on sample inputs. The output is written
  to a temp directory and renamed into place only after every check passed, so a failed merge
  or verification leaves nothing at `out`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from verlcli.errors import UserError
from verlcli.io import atomic_path

DEFAULT_OUT_NAME = "huggingface"  # default output: CKPT_DIR/huggingface
# Files of hf/ that describe the model, which save_pretrained writes itself.
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}
# Maximum |Δlogit| allowed by verify: atol + rtol * max|reference logit|.
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 2e-2)}
SAMPLE_TEXTS = ["The capital of France is", "Q: What is 12 + 30?\nA: 12 + 30 = 42\n#### 42"]


class VerificationError(RuntimeError):
    """--verify found the exported model's logits differ from the checkpoint's."""


# ------------------------------------------------------------------ finding the checkpoint


def find_role_dir(path: Path) -> Path | None:
    """The role checkpoint under `path` (itself, or its `actor`), or None if it is not one."""
    path = Path(path)
    for cand in (path, path / "actor"):
        if (cand / "meta.json").is_file() and (cand / "model").is_dir():
            return cand
    return None


def resolve_role_dir(ckpt_dir: str | Path) -> Path:
    """Like find_role_dir, but a UserError naming the path and the fix when it is not one."""
    path = Path(ckpt_dir).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint directory {path} does not exist",
                        fix="pass a run's checkpoints/step_N (or step_N/actor, step_N/critic) directory")
    if not path.is_dir():
        raise UserError(f"checkpoint path {path} is a file, not a directory",
                        fix="pass the checkpoints/step_N directory of a training run")
    role = find_role_dir(path)
    if role is not None:
        return role
    steps = sorted(p.name for p in path.glob("step_*") if p.is_dir())
    if steps:
        fix = f"pass one step: {path / steps[-1]}"
    elif (path / "config.json").is_file():
        fix = "it is already a Hugging Face model directory: use it as it is"
    else:
        fix = ("pass checkpoints/step_N, checkpoints/step_N/actor or checkpoints/step_N/critic of a run "
               "(a checkpoint holds meta.json and model/)")
    raise UserError(f"{path} is not a training checkpoint (no meta.json and model/ in it or in {path}/actor)",
                    fix=fix)


def check_against_manifest(role_dir: Path, log=None) -> None:
    """Refuse a checkpoint whose files differ from its step's manifest.json (sizes and sha256):
    a damaged or half-copied checkpoint must not become a model that loads but is wrong."""
    from verlcli.manifest import MANIFEST, check_manifest

    for root, under in ((role_dir, ""), (role_dir.parent, role_dir.name)):
        if (root / MANIFEST).is_file():
            problems = check_manifest(root, hashes=True, under=under)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise UserError(f"checkpoint {role_dir} does not match {root / MANIFEST}: {problems[0]}{more}",
                                fix="the checkpoint is damaged or was changed after it was saved: "
                                    "use another checkpoints/step_N, or copy it again from its source")
            if log:
                log(f"{role_dir} matches {root / MANIFEST} (sizes and sha256)")
            return
    if log:
        log(f"note: {role_dir} has no manifest.json (saved by an older version): not verified")


def read_meta(role_dir: Path) -> dict:
    try:
        meta = json.loads((role_dir / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{role_dir / 'meta.json'} is unreadable ({e})",
                        fix="the checkpoint is damaged: use another step") from None
    if not (role_dir / "hf" / "config.json").is_file():
        raise UserError(f"checkpoint {role_dir} has no hf/config.json",
                        fix="the checkpoint is incomplete (interrupted save?): use another step")
    return meta


def lora_settings(meta: dict) -> dict | None:
    """meta['lora'] → peft LoraConfig kwargs, or None for a full fine-tuning checkpoint."""
    lora = meta.get("lora") or {}
    rank = lora.get("rank", lora.get("r", 0))
    if not rank:
        return None
    return {"r": int(rank), "lora_alpha": lora.get("alpha", lora.get("lora_alpha", 16)),
            "lora_dropout": lora.get("dropout", lora.get("lora_dropout", 0.0)),
            "target_modules": list(lora.get("target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj"])}


def base_model_path(meta: dict) -> str | None:
    for key in ("base_model_path", "base_model", "model_path"):
        if isinstance(meta.get(key), str):
            return meta[key]
    return None


# ------------------------------------------------------------------ building the model


def _model_class(kind: str):
    """The Auto class the engine trains with for this kind."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    if kind == "value":  # critic: the LM body with a one-output token head (verl's value model)
        return AutoModelForTokenClassification
    if kind == "causal_lm":
        return AutoModelForCausalLM
    raise UserError(f"checkpoint kind {kind!r} is not one merge-checkpoint knows",
                    fix="meta.json 'kind' must be causal_lm or value")


def _load_config(role_dir: Path, kind: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(role_dir / "hf")
    if kind == "value":
        config.num_labels = 1
    return config


def _tied_aliases(model) -> set[str]:
    """State-dict keys that are aliases of another weight (tied embeddings) in this model."""
    tied = getattr(model, "all_tied_weights_keys", None)
    return set(tied or {})


def _load_strict(model, state_dict: dict, role_dir: Path) -> None:
    """load_state_dict(assign=True), failing on any missing or unexpected key but tied aliases."""
    prefix = "base_model.model." if _is_peft(model) else ""
    aliases = {prefix + k for k in _tied_aliases(_inner_hf(model))}
    expected = model.state_dict()
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state_dict.items()
                   if k in expected and v.shape != expected[k].shape]
    if wrong_shape:
        raise UserError(
            f"checkpoint {role_dir} does not fit {type(_inner_hf(model)).__name__}: {len(wrong_shape)} "
            f"weight(s) with other shapes (checkpoint vs config): {wrong_shape[:3]}",
            fix="the checkpoint's hf/config.json does not describe its weights; restore the config the run "
                "was trained with")
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - aliases)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {role_dir} does not fit {type(_inner_hf(model)).__name__}: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}",
            fix="the checkpoint's hf/config.json or meta.json (kind, lora) do not match its weights; "
                "re-save it with the same verlcli version that trained it")
    _inner_hf(model).tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise UserError(f"checkpoint {role_dir} lacks weights for {still_meta[:5]}",
                        fix="the checkpoint is incomplete: use another step")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _inner_hf(model):
    return model.get_base_model() if _is_peft(model) else model


def build_from_checkpoint(role_dir: Path, meta: dict):
    """The checkpoint as an fp32 model: an HF model, or a peft model with its adapters unmerged."""
    import accelerate
    import torch

    from verlcli.engine.checkpoint import load_full_state_dict

    kind = meta.get("kind", "causal_lm")
    config = _load_config(role_dir, kind)
    with accelerate.init_empty_weights():  # parameters on meta; buffers (rotary) real
        model = _model_class(kind).from_config(config, dtype=torch.float32)
    lora = lora_settings(meta)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora))
    # As stored: peft names with LoRA, so the adapter is merged here by peft itself (and the
    # unmerged model is the reference that --verify compares the export with).
    stored = load_full_state_dict(role_dir, merge_lora=False)
    state_dict = {k: v.to(torch.float32) for k, v in stored.items()}
    _load_strict(model, state_dict, role_dir)
    return model.eval()


# ------------------------------------------------------------------ LoRA


def _lora_layers(peft_model) -> dict:
    """name -> LoRA layer (a module holding base_layer, lora_A, lora_B)."""
    return {name: mod for name, mod in peft_model.named_modules()
            if hasattr(mod, "lora_B") and hasattr(mod, "base_layer") and len(mod.lora_B)}


def check_adapter_nonzero(peft_model, role_dir: Path) -> int:
    """Number of LoRA layers with a non-zero B; a UserError when every B is zero."""
    layers = _lora_layers(peft_model)
    nonzero = sum(any(bool(b.weight.abs().max() > 0) for b in mod.lora_B.values()) for mod in layers.values())
    if layers and nonzero == 0:
        raise UserError(
            f"the LoRA adapter in {role_dir} is all zeros (lora_B = 0 in all {len(layers)} layers): "
            "merging it would export the unchanged base model",
            fix="this checkpoint was saved before any effective optimizer step (lr 0, no steps, or the "
                "adapter was not trained): use a later step, or use the base model directly")
    return nonzero


def merge_lora(peft_model, role_dir: Path):
    """merge_and_unload, then prove the merged weights differ from the base weights."""
    layers = _lora_layers(peft_model)
    before = {name: mod.base_layer.weight.detach().clone() for name, mod in layers.items()}
    merged = peft_model.merge_and_unload()
    modules = dict(merged.named_modules())
    changed = 0
    for name, w0 in before.items():
        plain = name.removeprefix("base_model.model.")
        if not bool((modules[plain].weight.detach() == w0).all()):
            changed += 1
    if changed == 0:
        raise UserError(f"merging the LoRA adapter of {role_dir} changed no weight (merged == base)",
                        fix="the adapter's update is below the weights' precision or zero: use a later step")
    return merged, changed


# ------------------------------------------------------------------ verification


def sample_inputs(tokenizer, vocab_size: int) -> list:
    """A few token sequences: fixed texts, a chat prompt if there is a template, seeded random ids."""
    import torch

    seqs = [tokenizer(t, return_tensors="pt").input_ids[0] for t in SAMPLE_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 * 6?"}],
                                             add_generation_prompt=True, tokenize=False)
        seqs.append(tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0])
    gen = torch.Generator().manual_seed(0)
    seqs.append(torch.randint(0, vocab_size, (24,), generator=gen))
    return [s.reshape(1, -1).long() for s in seqs if s.numel()]


def _logits(model, inputs: list) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=x).logits.float() for x in inputs]


def compare_logits(ref: list, got: list, dtype: str, tolerance: float | None = None) -> dict:
    atol, rtol = TOLERANCE[dtype]
    max_ref = max(float(r.abs().max()) for r in ref)
    limit = tolerance if tolerance is not None else atol + rtol * max_ref
    diff = max(float((r - g).abs().max()) for r, g in zip(ref, got))
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    total = sum(r.shape[1] for r in ref)
    return {"max_abs_diff": diff, "tolerance": limit, "argmax_agreement": agree / total,
            "inputs": len(ref), "ok": diff <= limit}


def _load_export(out: Path, kind: str, meta: dict, adapter: bool, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    auto = AutoModelForTokenClassification if kind == "value" else AutoModelForCausalLM
    if not adapter:  # the way a user loads it: the Auto class reading config.json
        return auto.from_pretrained(out, dtype=dtype).eval()
    from peft import PeftModel

    from verlcli.models.resolve import resolve_model

    base_path = base_model_path(meta)
    if not base_path:
        raise UserError(f"cannot verify the adapter in {out}: meta.json names no base model",
                        fix="merge without --verify, or use --lora merge")
    extra = {"num_labels": 1} if kind == "value" else {}
    base = auto.from_pretrained(resolve_model(base_path), dtype=dtype, **extra)
    return PeftModel.from_pretrained(base, out).eval()


# ------------------------------------------------------------------ the whole merge


def default_out(ckpt_dir: str | Path) -> Path:
    return Path(ckpt_dir).expanduser() / DEFAULT_OUT_NAME


def _copy_tokenizer_files(hf_dir: Path, out: Path) -> None:
    for f in hf_dir.iterdir():
        if f.is_file() and f.name not in _MODEL_FILES and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)


def _set_generation_config(model, hf_dir: Path) -> None:
    from transformers import GenerationConfig

    if (hf_dir / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(hf_dir)


def merge_checkpoint(ckpt_dir: str | Path, out: str | Path | None = None, lora: str = "merge",
                     dtype: str = "float32", verify: bool = False, tolerance: float | None = None,
                     log=None) -> dict:
    """Write a Hugging Face directory for checkpoint `ckpt_dir`; returns what was done.

    lora: "merge" (weights merged into the base, a plain HF model) or "adapter" (a PEFT adapter
    directory; the base model is the one named in meta.json). dtype: float32 or bfloat16.
    """
    import torch

    log = log or (lambda msg: None)
    if lora not in ("merge", "adapter"):
        raise UserError(f"--lora {lora!r} is not a choice", fix="use --lora merge or --lora adapter")
    if dtype not in TOLERANCE:
        raise UserError(f"--dtype {dtype!r} is not supported", fix="use --dtype float32 or --dtype bfloat16")
    role_dir = resolve_role_dir(ckpt_dir)
    check_against_manifest(role_dir, log)
    meta = read_meta(role_dir)
    kind = meta.get("kind", "causal_lm")
    out = Path(out).expanduser() if out else default_out(ckpt_dir)
    _check_out(out, role_dir)
    info = {"checkpoint": str(role_dir), "out": str(out), "kind": kind, "dtype": dtype,
            "lora": None, "world_size": meta.get("world_size")}
    log(f"loading {role_dir} (kind {kind}, saved by {meta.get('world_size', '?')} rank(s))")
    model = build_from_checkpoint(role_dir, meta)
    tokenizer = _load_tokenizer(role_dir / "hf")
    inputs = sample_inputs(tokenizer, _inner_hf(model).config.vocab_size) if verify else []
    ref = _logits(model, inputs) if verify else []
    adapter = False
    if _is_peft(model):
        info["lora"] = {"mode": lora, "layers_nonzero": check_adapter_nonzero(model, role_dir)}
        if lora == "merge":
            model, changed = merge_lora(model, role_dir)
            info["lora"]["weights_changed"] = changed
            log(f"merged LoRA: {changed} weight matrices differ from the base")
        else:
            adapter = True
            model.peft_config["default"].base_model_name_or_path = base_model_path(meta)
    elif lora == "adapter":
        raise UserError(f"checkpoint {role_dir} has no LoRA adapter (full fine-tuning)",
                        fix="drop --lora adapter: the merge writes the full model")
    if adapter and kind == "value":
        raise UserError(f"{role_dir} is a critic: its trained value head is not part of a LoRA adapter",
                        fix="use --lora merge (the default) to export the critic")
    torch_dtype = getattr(torch, dtype)
    with atomic_path(out, is_dir=True) as tmp:
        _save(model, tmp, role_dir / "hf", torch_dtype, adapter)
        if verify:
            got = _logits(_load_export(tmp, kind, meta, adapter, torch_dtype), inputs)
            info["verify"] = compare_logits(ref, got, dtype, tolerance)
            log(_verify_line(info["verify"]))
            if not info["verify"]["ok"]:
                raise VerificationError(_verify_line(info["verify"]) + f"; nothing was written to {out}")
    log(f"wrote {out}")
    return info


def _check_out(out: Path, role_dir: Path) -> None:
    """The output replaces `out` wholesale: it must not be the checkpoint or hold it."""
    o, r = out.resolve(), role_dir.resolve()
    if o == r or o in r.parents or (r in o.parents and o.relative_to(r).parts[0] in ("model", "hf", "optim")):
        raise UserError(f"--out {out} would replace the checkpoint {role_dir} (or part of it)",
                        fix=f"choose an --out outside the checkpoint, e.g. the default {role_dir / DEFAULT_OUT_NAME}")


def _load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def _save(model, tmp: Path, hf_dir: Path, torch_dtype, adapter: bool) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    model = model.to(torch_dtype)
    if adapter:
        # adapter_config.json + adapter_model.safetensors, and no config.json: transformers then
        # loads the base named in adapter_config.json and attaches the adapter.
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        model.config.dtype = torch_dtype
        # The class that loads it (vLLM picks its implementation from this list).
        model.config.architectures = [type(model).__name__]
        _set_generation_config(model, hf_dir)
        model.save_pretrained(tmp, safe_serialization=True)
    _copy_tokenizer_files(hf_dir, tmp)
    tmp.chmod(0o755)  # mkdtemp makes it private


def _verify_line(v: dict) -> str:
    status = "OK" if v["ok"] else "FAILED"
    return (f"verify {status}: max |Δlogit| = {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}) "
            f"on {v['inputs']} inputs; argmax agreement {v['argmax_agreement']:.1%}")
