"""A toy worker for tests of the worker-group plumbing (and a quick Ray + gloo smoke check).

It lives in the package, not under tests/, so Ray worker processes on any node can import it.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from verlcli.data.batch import Batch
from verlcli.distributed.dispatch import register
from verlcli.distributed.worker import Worker


class ToyWorker(Worker):
    def setup(self, scale: float = 2.0) -> None:
        self.scale = scale
        self.shutdown_calls = 0

    @register(dispatch="dp")
    def double(self, batch: Batch) -> Batch:
        """y = scale * x, plus the all-reduced sum of y over every rank's rows (padding included)."""
        y = batch["x"] * self.scale
        total = y.sum().reshape(1)
        dist.all_reduce(total)  # a real collective across the group's processes
        n = len(batch)
        return Batch(
            {"y": y, "total": total.expand(n).clone(), "rank": torch.full((n,), self.rank)},
            {"tag": batch["tag"]} if "tag" in batch else {},
        )

    @register(dispatch="dp")
    def expand(self, batch: Batch, k: int) -> Batch:
        """k output rows per input row, kept together (like n samples per prompt)."""
        return Batch({"x": batch["x"].repeat_interleave(k, dim=0)})

    @register(dispatch="dp")
    def row_stats(self, batch: Batch) -> dict:
        return {"rank": self.rank, "rows": len(batch)}

    @register(dispatch="all")
    def info(self) -> dict:
        return self._verl_info() | {"omp": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0)}

    @register(dispatch="rank0")
    def rank_sum(self, offset: int) -> int:
        t = torch.tensor([self.rank + offset])
        dist.all_reduce(t)
        return int(t.item())

    @register(dispatch="all")
    def fail_on(self, rank: int, message: str) -> int:
        if self.rank == rank:
            raise ValueError(message)
        return self.rank

    @register(dispatch="all")
    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.rank

    @register(dispatch="all")
    def crash(self, rank: int) -> int:
        if self.rank == rank:
            os._exit(1)  # the process vanishes, as under the OOM killer
        return self.rank

    @register(dispatch="all")
    def say(self, text: str) -> int:
        """A line in this worker's log (stdout), for tests of death reports."""
        print(f"rank {self.rank}: {text}", flush=True)
        return os.getpid()

    @register(dispatch="all")
    def sleep_on(self, rank: int, seconds: float) -> int:
        """Only rank `rank` sleeps (a straggler or a hung rank)."""
        if self.rank == rank:
            time.sleep(seconds)
        return self.rank

    @register(dispatch="all")
    def sleep_then_reduce(self, rank: int, seconds: float) -> int:
        """Rank `rank` sleeps first; the others wait for it inside a gloo all_reduce."""
        if self.rank == rank:
            time.sleep(seconds)
        t = torch.ones(1)
        dist.all_reduce(t)
        return int(t.item())

    def shutdown(self) -> None:
        self.shutdown_calls += 1
