"""Sharded checkpoints of an `FSDPEngine` through `torch.distributed.checkpoint` (DCP).

Layout of a checkpoint directory (e.g. `runs/x/checkpoints/step_200/`):

    model/           DCP of get_model_state_dict(model): sharded, HF names (peft names
                     `base_model.model.…` with LoRA, base weights included)
    optim/           DCP of get_optimizer_state_dict (absent before the first step)
    scheduler.json   LR schedule position and optimizer step count          (rank 0)
    rng_rank{r}.pt   torch / cuda / python / numpy RNG, torch.load(weights_only=True)
    extra.json       the caller's `extra` dict (trainer step, data position)  (rank 0)
    hf/              config.json (of the trained class), tokenizer files and
                     generation_config copied from the base model            (rank 0)
    meta.json        kind, model class, LoRA settings, world size, base path, dtypes

Atomic: every rank writes into `DIR.tmp`; after a barrier rank 0 renames it to `DIR`, so a
crash never leaves a `DIR` that looks complete. The trainer gives engines a `DIR` inside
`checkpoints/step_N.tmp/` and publishes the step (manifest with sizes + sha256, then rename)
itself (trainer/run_dir.py): engines only ever write into the directory they are given. All ranks must see one shared filesystem.
DCP reshards on load, so a checkpoint saved at one world size loads at any other (the RNG
of a rank with no file of its own is left as it is).

`load_full_state_dict(DIR)` reads `model/` with no process group into plain full tensors
under HF names, LoRA merged (W + alpha/r · B·A) — what `verl merge-checkpoint` writes out.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from verlcli.errors import UserError
from verlcli.io import write_json_atomic

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
# Weights are in model/; everything else a HF directory needs is copied into hf/.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json",
               "verlcli_builtin.json"}


# ---------------------------------------------------------------- names and LoRA merge


def merge_lora(sd: dict[str, torch.Tensor], scale: float,
               adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft names without the `base_model.model.` prefix → HF names with W + scale·B·A.

    Raises if there is nothing to merge or an adapter half is missing: a "merge" that
    silently returns the base weights is the failure this exists to prevent."""
    out: dict[str, torch.Tensor] = {}
    merged = 0
    for key, value in sd.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        module, leaf = key.split(".base_layer.", 1)
        if leaf == "weight":
            a = sd.get(f"{module}.lora_A.{adapter}.weight")
            b = sd.get(f"{module}.lora_B.{adapter}.weight")
            if a is None or b is None:
                raise ValueError(f"LoRA module {module} lacks lora_A/lora_B of adapter {adapter!r}")
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            merged += 1
        out[f"{module}.{leaf}"] = value
    if merged == 0:
        raise ValueError("LoRA merge found no adapted modules (no '.base_layer.' weights)")
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], lora_scale: float | None,
                     tied_aliases) -> dict[str, torch.Tensor]:
    """Engine state dict (maybe peft-wrapped) → HF names; LoRA merged when `lora_scale`
    is set; every tied alias present (lm_head.weight for tied embeddings)."""
    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in sd.items()}
    if lora_scale is not None:
        sd = merge_lora(sd, lora_scale)
    for kept, alias in tied_aliases:
        if alias not in sd and kept in sd:
            sd[alias] = sd[kept]
        elif kept not in sd and alias in sd:
            sd[kept] = sd[alias]
    return sd


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """All RNG streams of this process, as tensors and numbers (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": int(version),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": float("nan") if gauss is None else float(gauss),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    gauss = state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()),
                     None if gauss != gauss else gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- save


def _copy_hf_files(engine, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(engine.model_path.iterdir()):
        if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dest / f.name)
    # The config of the class that was trained (a value model is TokenClassification).
    config = engine.hf_model.config
    saved_arch = config.architectures
    config.architectures = [engine.model_class]
    try:
        config.to_json_file(dest / "config.json")
    finally:
        config.architectures = saved_arch


def _meta(engine, has_optim: bool) -> dict:
    lora = engine.lora
    return {
        "format_version": FORMAT_VERSION,
        "kind": engine.kind,
        "model_class": engine.model_class,
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha,
                                           "dropout": lora.dropout,
                                           "target_modules": list(lora.target_modules)},
        "lora_scale": engine.lora_scale,
        "peft_prefix": PEFT_PREFIX if lora is not None else "",
        "tied_aliases": [list(p) for p in engine.tied_aliases],
        "world_size": engine.world_size,
        "base_model_path": str(engine.model_path.resolve()),
        "param_dtype": "float32",
        "compute_dtype": str(engine.compute_dtype).removeprefix("torch."),
        "has_optimizer_state": has_optim,
        "optimizer_steps": engine.optimizer_steps,
    }


def save_checkpoint(engine, path: str | os.PathLike, extra: dict) -> Path:
    """Write the checkpoint (collective: every rank calls it). Returns the final path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = engine.rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    dcp.save(get_model_state_dict(engine.model), checkpoint_id=str(tmp / "model"))
    # Before the first step the optimizer has no state; asking DCP for it would run a
    # zero-lr "init" step that advances Adam's step counter, so save none instead.
    has_optim = engine.optimizer is not None and bool(engine.optimizer.state)
    if has_optim:
        osd = get_optimizer_state_dict(engine.model, engine.optimizer)
        dcp.save(osd, checkpoint_id=str(tmp / "optim"))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        if engine.scheduler is not None:
            sched = engine.scheduler.state_dict()  # lr_lambdas is [None] for plain functions
            write_json_atomic(tmp / "scheduler.json",
                              {"scheduler": sched, "optimizer_steps": engine.optimizer_steps})
        write_json_atomic(tmp / "extra.json", extra)
        _copy_hf_files(engine, tmp / "hf")
        write_json_atomic(tmp / "meta.json", _meta(engine, has_optim))
    return publish_dir(tmp, path, rank)


def publish_dir(tmp: Path, path: Path, rank: int) -> Path:
    """Collective: after every rank wrote into `tmp`, rank 0 renames it to `path` (an existing
    `path` is moved aside first and removed last), so `path` is never half-written."""
    dist.barrier()
    if rank == 0:
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


# ---------------------------------------------------------------- load


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of a checkpoint directory, with a UserError that says what to pass."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file() or not (path / "model").is_dir():
        hint = ("pass the checkpoint directory itself (the one holding model/ and meta.json)"
                if (path.parent / "meta.json").is_file()
                else "pass a directory like RUN_DIR/checkpoints/step_N written by training")
        raise UserError(f"{path} is not a verl checkpoint (no meta.json and model/ in it)",
                        fix=hint)
    return json.loads(meta_file.read_text())


def _check_compatible(engine, meta: dict, path: Path) -> None:
    strategy, mine = meta.get("strategy", "fsdp"), getattr(engine, "strategy", "fsdp")
    if strategy != mine:
        raise UserError(f"checkpoint {path} was written by the {strategy} engine, this run uses {mine}",
                        fix=f"resume with actor.strategy={strategy} (critic.strategy, sft.strategy alike), "
                            f"or `verl merge-checkpoint {path.parent}` and start from it with model.path")
    if meta["kind"] != engine.kind:
        raise UserError(f"checkpoint {path} holds a {meta['kind']} model, not {engine.kind}",
                        fix="resume the actor from an actor checkpoint and the critic from "
                            "a critic one")
    saved = (meta["lora"] or {}).get("rank", 0)
    current = engine.lora.rank if engine.lora else 0
    if saved != current:
        raise UserError(f"checkpoint {path} was trained with LoRA rank {saved}, this run "
                        f"uses rank {current}",
                        fix=f"set model.lora.rank={saved} to resume it, or start a new run")


def _load_scheduler(engine, path: Path) -> None:
    state = json.loads((path / "scheduler.json").read_text())
    sched = dict(state["scheduler"])
    # Keep this run's base lr (resuming with a new lr takes it) at the saved position.
    sched.pop("base_lrs", None)
    engine.scheduler.load_state_dict(sched)
    step = engine.scheduler.last_epoch
    for group, base, fn in zip(engine.optimizer.param_groups, engine.scheduler.base_lrs,
                               engine.scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
    engine.scheduler._last_lr = [g["lr"] for g in engine.optimizer.param_groups]
    engine.optimizer_steps = int(state["optimizer_steps"])


def load_checkpoint(engine, path: str | os.PathLike) -> dict:
    """Restore model, optimizer, schedule and this rank's RNG; return `extra`."""
    path = Path(path)
    meta = read_meta(path)
    _check_compatible(engine, meta, path)
    msd = get_model_state_dict(engine.model)
    dcp.load(msd, checkpoint_id=str(path / "model"))
    set_model_state_dict(engine.model, msd)
    if engine.optimizer is not None and meta.get("has_optimizer_state"):
        osd = get_optimizer_state_dict(engine.model, engine.optimizer)
        dcp.load(osd, checkpoint_id=str(path / "optim"))
        set_optimizer_state_dict(engine.model, engine.optimizer, osd)
    if engine.scheduler is not None and (path / "scheduler.json").is_file():
        _load_scheduler(engine, path)
    rng_file = path / f"rng_rank{engine.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    dist.barrier()
    return json.loads((path / "extra.json").read_text())


def load_full_state_dict(ckpt_dir: str | os.PathLike, *,
                         merge_lora: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint's model as plain full CPU tensors, with no process group needed.

    merge_lora=True (default): HF names, LoRA merged, tied aliases filled — equal to what
    `FSDPEngine.full_state_dict()` returned when the checkpoint was saved.
    merge_lora=False: the names as stored (peft names with LoRA)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(ckpt_dir)
    meta = read_meta(path)
    if meta.get("strategy", "fsdp") == "deepspeed":
        from verlcli.engine.ds_checkpoint import load_full_state_dict as load_zero

        sd = load_zero(path, meta)
        return sd if not merge_lora else to_hf_state_dict(sd, meta.get("lora_scale"),
                                                            meta.get("tied_aliases", []))
    reader = dcp.FileSystemReader(str(path / "model"))
    sd = {key: torch.empty(md.size, dtype=md.properties.dtype)
          for key, md in reader.read_metadata().state_dict_metadata.items()
          if isinstance(md, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, storage_reader=reader, no_dist=True)
    if not merge_lora:
        return sd
    return to_hf_state_dict(sd, meta.get("lora_scale"), meta.get("tied_aliases", []))
