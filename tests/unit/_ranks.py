"""The multi-rank gloo harness of the engine tests (FSDP, DeepSpeed, Megatron): a module fixture
runs ONE job on 2 ranks in spawned processes and the tests read back what each rank returned."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world, port, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(fn(rank, out_dir, *args), f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn, out_dir, *args, world: int = 2) -> list:
    """fn(rank, out_dir, *args) on `world` gloo ranks; fn must live at module level (spawn
    pickles it by name) and return tensors/plain data. Returns each rank's result in order."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(_rank_main, args=(fn, world, free_port(), str(out_dir), args), nprocs=world,
                                join=True)
    return [torch.load(f"{out_dir}/rank{r}.pt", weights_only=True) for r in range(world)]


@contextlib.contextmanager
def one_rank_group(store_dir):
    """A 1-rank gloo group in this process (engines need one even at world size 1); left
    alone when the process already has a group."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
