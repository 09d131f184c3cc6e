"""Training engines behind one interface (`base.TrainEngine`, built by `make_engine`),
optimizer/schedules, checkpoints."""

from verlcli.engine.base import TrainEngine, make_engine
from verlcli.engine.checkpoint import load_full_state_dict, read_meta
from verlcli.engine.fsdp import FSDPEngine, resolve_compute_dtype
from verlcli.engine.optim import build_optimizer, build_scheduler, lr_multiplier

__all__ = ["FSDPEngine", "TrainEngine", "make_engine", "build_optimizer", "build_scheduler", "load_full_state_dict",
           "lr_multiplier", "read_meta", "resolve_compute_dtype"]
