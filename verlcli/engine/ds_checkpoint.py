"""Checkpoints of a `DeepSpeedEngine`: DeepSpeed's own ZeRO checkpoint plus our state.

Layout of a role checkpoint directory (e.g. `step_200/actor/`):

    model/zero/      DeepSpeed's save_checkpoint (tag `zero`): module states and each rank's
                     ZeRO partition of the fp32 weights and Adam moments
    scheduler.json   LR schedule position and optimizer step count          (rank 0)
    rng_rank{r}.pt   torch / cuda / python / numpy RNG (weights_only)
    extra.json       the caller's `extra` dict (trainer step, data position)  (rank 0)
    hf/              config, tokenizer, generation config of the base model   (rank 0)
    meta.json        as the FSDP engine's (engine/checkpoint.py) plus
                     strategy=deepspeed, zero_stage; written last             (rank 0)

Written straight into the directory it is given; meta.json goes last, so a directory without
it is not a checkpoint (the step-level temp-dir/rename is the trainer's business).

DeepSpeed writes its files with `torch.save` of whole Python objects, and its own loaders read
them back with pickle. So that a checkpoint can never run code, every DeepSpeed file is first
read with `torch.load(weights_only=True)` admitting only the few plain DeepSpeed types it holds
(`vet`); only then do DeepSpeed's loaders touch it.

A ZeRO checkpoint resumes at the same world size and stage only (its partitions are per rank);
`load_full_state_dict` (merge-checkpoint) reads any stage and world size with no process group.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from verlcli.engine import checkpoint as ckpt
from verlcli.errors import UserError
from verlcli.io import write_json_atomic

TAG = "zero"


# ---------------------------------------------------------------- vetting DeepSpeed's pickles


def _safe_globals() -> list:
    """The non-tensor types DeepSpeed puts in its checkpoint files (plain data classes)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def vet(ds_dir: Path) -> None:
    """Read every DeepSpeed file with weights_only=True (no code can run); a UserError if one
    holds anything but tensors, numbers, strings and the DeepSpeed types above."""
    files = sorted(ds_dir.glob("*.pt"))
    if not files:
        raise UserError(f"{ds_dir} holds no DeepSpeed checkpoint files",
                        fix="the checkpoint is incomplete (interrupted save?): use another step")
    with torch.serialization.safe_globals(_safe_globals()):
        for f in files:
            try:
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle errors name the offending global
                raise UserError(f"{f} is not a plain DeepSpeed checkpoint file ({str(e)[:200]})",
                                fix="load only checkpoints written by verl; this file holds "
                                    "objects a checkpoint should not") from None


# ---------------------------------------------------------------- save / load


def _meta(engine) -> dict:
    meta = ckpt._meta(engine, has_optim=True)
    meta.update(strategy="deepspeed", zero_stage=engine.zero_stage, ds_tag=TAG,
                param_dtype="bfloat16" if engine.ds_bf16 else "float32")
    return meta


def save(engine, path: Path, extra: dict) -> Path:
    """Collective: every rank writes its ZeRO partition and RNG; rank 0 the rest."""
    if engine.engine is None or engine.optimizer is None:
        raise RuntimeError("only a training engine (built with optim) saves checkpoints")
    if engine.rank == 0:
        (path / "meta.json").unlink(missing_ok=True)  # the directory is not complete until the end
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.engine.save_checkpoint(str(path / "model"), tag=TAG, client_state={}, save_latest=False)
    torch.save(ckpt.rng_state(), path / f"rng_rank{engine.rank}.pt")
    dist.barrier()
    if engine.rank == 0:
        sched = engine.scheduler.state_dict()
        write_json_atomic(path / "scheduler.json",
                          {"scheduler": sched, "optimizer_steps": engine.optimizer_steps})
        write_json_atomic(path / "extra.json", extra)
        ckpt._copy_hf_files(engine, path / "hf")
        write_json_atomic(path / "meta.json", _meta(engine))
    dist.barrier()
    return path


def check_resumable(engine, meta: dict, path: Path) -> None:
    """Same strategy, ZeRO stage and world size: ZeRO partitions do not reshard on load."""
    strategy = meta.get("strategy", "fsdp")
    if strategy != "deepspeed":
        raise UserError(f"checkpoint {path} was written by the {strategy} engine, this run uses deepspeed",
                        fix=f"resume with the strategy it was trained with ({strategy}), or run "
                            f"`verl merge-checkpoint {path.parent}` and start from it with model.path")
    if meta.get("zero_stage") != engine.zero_stage or meta.get("world_size") != engine.world_size:
        raise UserError(
            f"checkpoint {path} is ZeRO stage {meta.get('zero_stage')} on {meta.get('world_size')} "
            f"rank(s); this run is stage {engine.zero_stage} on {engine.world_size}",
            fix="resume with the same zero_stage and number of workers, or run `verl merge-checkpoint` "
                "on it and start a new run from the merged model (model.path)")


def load(engine, path: Path) -> dict:
    """Restore model, optimizer, schedule and this rank's RNG; return `extra`."""
    meta = ckpt.read_meta(path)
    ckpt._check_compatible(engine, meta, path)
    check_resumable(engine, meta, path)
    if engine.engine is None or engine.optimizer is None:
        raise RuntimeError("only a training engine (built with optim) loads checkpoints")
    vet(path / "model" / TAG)
    engine.engine.load_checkpoint(str(path / "model"), tag=TAG, load_optimizer_states=True,
                                  load_lr_scheduler_states=False)
    ckpt._load_scheduler(engine, path)
    rng_file = path / f"rng_rank{engine.rank}.pt"
    if rng_file.is_file():
        ckpt.set_rng_state(torch.load(rng_file, weights_only=True))
    dist.barrier()
    return json.loads((path / "extra.json").read_text())


def load_full_state_dict(path: str | os.PathLike, meta: dict) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint of any stage and world size, as plain CPU
    tensors under the names the model had (peft names with LoRA), tied aliases included.
    No process group needed (DeepSpeed's zero_to_fp32)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = Path(path) / "model"
    tag = meta.get("ds_tag", TAG)
    vet(ds_dir / tag)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints are not ours to show
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}
