"""Worker groups: the single-controller plumbing between the driver and SPMD workers."""

from verlcli.distributed.dispatch import register
from verlcli.distributed.errors import WorkerError
from verlcli.distributed.group import LocalWorkerGroup, RayWorkerGroup, WorkerGroup, make_worker_group
from verlcli.distributed.placement import ResourcePool, ray_init, resource_pool
from verlcli.distributed.worker import Worker

__all__ = [
    "register",
    "Worker",
    "WorkerGroup",
    "RayWorkerGroup",
    "LocalWorkerGroup",
    "make_worker_group",
    "ray_init",
    "resource_pool",
    "ResourcePool",
    "WorkerError",
]
