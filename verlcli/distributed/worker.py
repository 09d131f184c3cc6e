"""Worker: what runs on one device (a GPU, or one CPU rank) inside a worker group.

The constructor joins the group's torch.distributed world (gloo on CPU, NCCL on GPU), then
calls `setup(**kwargs)`, where a role builds its model, optimizer and rollout engine. Methods
marked with `@register` are what the driver calls through the group.

The process group is never destroyed here: an in-process vLLM engine shares the default
process group, and shutting that engine down tears the group down too (DESIGN.md facts), so a
second `destroy_process_group()` would fail or hang. Subclasses release their own resources in
`shutdown()`, the engine last.
"""

from __future__ import annotations

import faulthandler
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from verlcli.distributed.dispatch import register


def free_port() -> int:
    """A TCP port that is free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This host's address as other nodes see it (Ray's view when Ray is up)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def node_id() -> str | None:
    """Ray's id of the node this process runs on (None outside Ray). Simulated nodes on one
    machine share host name and IP; the node id tells them apart."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, ValueError):
        return 0


class Worker:
    """Base class of every role. Subclasses put their set-up in `setup(**kwargs)`."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        device: str = "cpu",
        local_rank: int | None = None,
        **kwargs,
    ):
        # A native crash (segfault, abort) then leaves a report in the worker's log, which
        # the death report quotes; without it such a death looks like a kill -9.
        faulthandler.enable()
        if device not in ("cpu", "cuda"):
            raise ValueError(f"Worker(device={device!r}): must be 'cpu' or 'cuda'")
        self.rank = rank
        self.world_size = world_size
        self.device_type = device
        self.local_rank = rank if local_rank is None else local_rank
        self.owns_process_group = self._init_distributed(master_addr, master_port or free_port())
        self.setup(**kwargs)

    # ------------------------------------------------------------ for subclasses
    def setup(self, **kwargs) -> None:
        """Build the role (model, optimizer, engine). Runs on every rank at the same time."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.setup() got unexpected arguments {sorted(kwargs)}")

    def shutdown(self) -> None:
        """Release what setup() made (an in-process rollout engine last). Default: nothing."""

    def dp_coords(self) -> tuple[int, int]:
        """(data-parallel rank, size) of this worker: which `dp` chunk it gets. Roles whose
        engine shares a chunk over several ranks (tensor parallel) override this."""
        return self.rank, self.world_size

    @register(dispatch="rank0")
    def memory(self) -> dict:
        """Peak memory of rank 0's process: RSS, and allocated GPU memory on CUDA."""
        import resource

        out = {"mem/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        out["mem/rss_gb"] = rss_bytes() / 2**30  # RSS now: a creep across steps shows here, not in the peak
        if self.device_type == "cuda":
            out["mem/peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------ plumbing
    def _init_distributed(self, master_addr: str, master_port: int) -> bool:
        """Join the world; False when this process already has one (e.g. a 2nd local group)."""
        os.environ.update(
            MASTER_ADDR=str(master_addr),
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
        )
        if self.device_type == "cuda":
            # Ray gives each actor one visible GPU (index 0); torchrun-style launches see all.
            torch.cuda.set_device(self.local_rank % max(torch.cuda.device_count(), 1))
        if dist.is_initialized():
            if dist.get_world_size() != self.world_size:
                raise RuntimeError(
                    f"this process already has a torch.distributed world of size "
                    f"{dist.get_world_size()}, but the worker needs {self.world_size}"
                )
            return False
        # On GPU, NCCL carries CUDA tensors and gloo carries CPU ones (offloaded state,
        # object collectives), so code can use either without building a second group.
        backend = "cpu:gloo,cuda:nccl" if self.device_type == "cuda" else "gloo"
        timeout = os.environ.get("VERL_DIST_TIMEOUT_S")
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{_url_host(master_addr)}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=float(timeout)) if timeout else None,
        )
        return True

    def _verl_info(self) -> dict:
        """Where this worker lives; the group uses it for error messages and tests."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": node_id(),
            "node_ip": node_ip(),
            "device": str(self.device),
            "backend": dist.get_backend() if dist.is_initialized() else None,
        }


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
