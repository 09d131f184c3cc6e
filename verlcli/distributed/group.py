"""Worker groups: N workers that the driver calls like one object.

`group.compute_log_probs(batch)` splits the batch over the ranks (see dispatch.py), runs the
method on every worker at once, and gathers the answers, so the driver reads like
single-process code. `RayWorkerGroup` runs one Ray actor per device; `LocalWorkerGroup` runs
the same worker class in this process (world size 1) for a normal debugger.

Failures come back as `WorkerError` naming the group, rank, method and real cause; with
VERL_WORKER_TIMEOUT_S set, a call that never returns (a collective hang) does too.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from typing import Any

import torch.distributed as dist

from verlcli.distributed.dispatch import collect_results, dp_group_size, registered_methods, split_call
from verlcli.distributed.errors import (
    WorkerError,
    from_task_error,
    hang_error,
    last_lines,
    oom_kill_count,
    worker_died,
)
from verlcli.distributed.placement import (
    ResourcePool,
    nodes_for,
    ray,
    ray_init,
    require_ray,
    resolve_device,
    resource_pool,
    worker_env,
)
from verlcli.distributed.logs import GROUP_ENV, log_path, output_to, redirect_process_output, route_library_logs
from verlcli.distributed.worker import free_port, node_ip

TIMEOUT_ENV = "VERL_WORKER_TIMEOUT_S"


class WorkerGroup:
    """What both launchers share: binding `@register`-ed methods to dispatch + collect."""

    def __init__(self, worker_cls: type, name: str, world_size: int):
        self.worker_cls = worker_cls
        self.name = name
        self.world_size = world_size
        # Ranks per rollout replica (rollout.tensor_parallel_size): how `replica` methods split.
        self.replica_size = 1
        # Consecutive ranks that share one data-parallel slice (the training engine's tensor-
        # parallel size): how `dp` methods split. Learned from the workers: use_worker_dp_layout.
        self.dp_group_size = 1
        self._bind_methods()

    def _bind_methods(self) -> None:
        for method, spec in registered_methods(self.worker_cls).items():
            if hasattr(type(self), method) or method in vars(self):
                raise TypeError(
                    f"{self.worker_cls.__name__}.{method} is registered for dispatch, but the "
                    f"worker group already has an attribute '{method}'; rename the method"
                )
            setattr(self, method, self._dispatching(method, spec))

    def _dispatching(self, method: str, spec):
        @functools.wraps(getattr(self.worker_cls, method))
        def call(*args, **kwargs):
            label = f"{self.name}.{method}"
            share = self.replica_size if spec.mode == "replica" else self.dp_group_size
            per_rank, plan = split_call(spec, self.world_size, args, kwargs, label, share)
            return collect_results(spec, plan, self._run(method, per_rank), label)

        return call

    def use_worker_dp_layout(self) -> int:
        """Ask every worker for its (dp_rank, dp_size) and split `dp` calls by them. Only
        layouts of consecutive blocks are valid (rank r → slice r // k): megatron's order."""
        self.dp_group_size = dp_group_size(self.execute_all("dp_coords"), self.name)
        return self.dp_group_size

    def execute_all(self, method: str, *args, **kwargs) -> list:
        """Call any worker method (registered or not) with the same arguments on every rank."""
        return self._run(method, [(args, kwargs)] * self.world_size)

    def _run(self, method: str, per_rank: list[tuple[tuple, dict]]) -> list:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.worker_cls.__name__}, name={self.name!r}, world_size={self.world_size})"


# ---------------------------------------------------------------------------- Ray


class _WorkerHost:
    """The Ray actor around one Worker.

    It exists before the Worker does, so the group can ask rank 0's node for its address and
    a free port, then have every rank build its Worker (and join the world) at the same time.
    """

    def __init__(self):
        self.worker = None
        self.log = None  # RUN_DIR/logs/<group>_rank<r>.log once start() redirected this process

    def address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def where(self) -> dict:
        """pid, node and Ray's log files of this process: what a death report needs."""
        import glob
        import socket as _socket

        pid, logs = os.getpid(), []
        try:
            logs_dir = ray._private.worker.global_worker.node.get_logs_dir_path()
            logs = sorted(glob.glob(os.path.join(logs_dir, f"worker-*-{pid}.*")))
        except Exception:  # private API moved: the report just has no log lines
            pass
        if self.log is not None:  # stdout/stderr go there, not to Ray's worker-*.out/.err
            logs = [str(self.log)] + logs
        return {"pid": pid, "ip": node_ip(), "host": _socket.gethostname(), "logs": logs}

    def start(self, worker_cls: type, kwargs: dict) -> bool:
        # Before anything is built: vLLM, torch and gloo write to this worker's own log file.
        self.log = log_path(os.environ.get(GROUP_ENV, "worker"), kwargs.get("rank", 0))
        redirect_process_output(self.log)
        self.worker = worker_cls(**kwargs)
        return True

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()


_remote_host = None


def _host_cls():
    global _remote_host
    if _remote_host is None:
        # max_restarts=0: a dead worker must surface as an error, never as a silent fresh rank.
        _remote_host = require_ray().remote(max_restarts=0)(_WorkerHost)
    return _remote_host


class RayWorkerGroup(WorkerGroup):
    """One Ray actor per rank on a resource pool; torch.distributed between them."""

    def __init__(
        self,
        worker_cls: type,
        world_size: int | None = None,
        resources: Any = None,
        init_kwargs: dict | None = None,
        name: str = "workers",
        placement_group: ResourcePool | str | None = None,
        env: dict | None = None,
        timeout_s: float | None = None,
    ):
        require_ray()
        ray_init()  # no-op when Ray is up; otherwise the auto choice (cluster or local)
        nodes, dpn, device, cpus = _resources(resources)
        shared = isinstance(placement_group, ResourcePool)
        if not shared and placement_group not in (None, "separate"):
            raise ValueError(f"placement_group={placement_group!r}: pass a ResourcePool to share, or 'separate'")
        world = world_size or (placement_group.world_size if shared else nodes * dpn)
        super().__init__(worker_cls, name, world)
        self.timeout_s = timeout_s
        self._hosts: list = []
        self._where: list = []
        self._oom_kills = None
        self._broken = False  # a rank died or hung: shutdown kills instead of asking
        self._owns_pool = not shared
        if self._owns_pool:  # "separate" or None: whole bundles of our own
            self.pool = resource_pool(nodes_for(world, dpn), min(dpn, world), device, cpus, 1, world)
        else:
            self.pool = placement_group
        self.pool.users.append(name)
        try:
            self._start(init_kwargs or {}, env or {})
        except BaseException:
            self.shutdown()
            raise

    def _start(self, init_kwargs: dict, env: dict) -> None:
        pool = self.pool
        actor_env = worker_env()
        actor_env.setdefault("OMP_NUM_THREADS", str(max(1, int(pool.cpus_per_worker))))
        actor_env.update({k: str(v) for k, v in env.items()})
        actor_env[GROUP_ENV] = self.name  # names its log file (RUN_DIR/logs/<group>_rank<r>.log)
        host = _host_cls()
        self._hosts = [
            host.options(**pool.scheduling(r), runtime_env={"env_vars": actor_env}).remote()
            for r in range(self.world_size)
        ]
        self._where = self._gather([h.where.remote() for h in self._hosts], "find the workers")
        self._oom_kills = oom_kill_count()
        [(addr, port)] = self._gather([self._hosts[0].address.remote()], "find rank 0's address")
        self.master = (addr, port)
        starts = [
            h.start.remote(self.worker_cls, dict(
                rank=r, world_size=self.world_size, master_addr=addr, master_port=port,
                device=pool.device, local_rank=r % pool.devices_per_node, **init_kwargs,
            ))
            for r, h in enumerate(self._hosts)
        ]
        # All ranks start together: joining the process group is a collective.
        self._gather(starts, "__init__")
        # Again now that each worker writes to its own log file (start() redirects its output
        # there): a death report must read that file, not Ray's, which no longer grows.
        self._where = self._gather([h.where.remote() for h in self._hosts], "find the workers")

    def _run(self, method: str, per_rank: list) -> list:
        if not self._hosts:
            raise WorkerError(self.name, method, None, "the group was shut down")
        per_rank = _share_identical_args(per_rank)
        refs = [h.call.remote(method, a, k) for h, (a, k) in zip(self._hosts, per_rank)]
        return self._gather(refs, method)

    def _timeout(self) -> float | None:
        if self.timeout_s is not None:
            return self.timeout_s
        value = os.environ.get(TIMEOUT_ENV)
        return float(value) if value else None

    def _gather(self, refs: list, method: str) -> list:
        """Results in rank order; the first failure raises at once (others may be stuck on it)."""
        timeout = self._timeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                done = [r for r in range(len(refs)) if r not in pending.values()]
                self._broken = True
                raise hang_error(self.name, method, timeout, sorted(pending.values()), done)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = self._get(ref, rank, method)
                except WorkerError as e:
                    self._broken = True  # peers may be stuck in a collective with this rank
                    others = sorted(pending.values())
                    if others:  # a hung rank makes its peers' collectives time out: name it too
                        e.cause += (f"\n  ranks {others} had not answered yet: if the error above is a "
                                    "collective timeout, look at those ranks first")
                    raise
        return results

    def _get(self, ref, rank: int, method: str):
        exc = ray.exceptions
        try:
            return ray.get(ref)
        except exc.RayTaskError as e:
            raise from_task_error(self.name, method, rank, e) from None
        except (exc.RayActorError, exc.OutOfMemoryError, exc.WorkerCrashedError) as e:
            self._broken = True  # the other ranks may be stuck in a collective with the dead one
            where = self._where[rank] if rank < len(self._where) else None
            raise worker_died(self.name, method, rank, e, where, _log_tail(where), self._oom_kills) from None
        except exc.RayError as e:
            raise WorkerError(self.name, method, rank, f"{type(e).__name__}: {last_lines(str(e), 8)}") from None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Workers' shutdown() (bounded: a stuck rank must not block), then kill the actors."""
        hosts, self._hosts = self._hosts, []
        if hosts and self._broken:
            # Surviving ranks are likely blocked in a collective with the dead or hung one;
            # stop() would queue behind that call for timeout_s. The error is already out.
            for h in hosts:
                ray.kill(h)
            hosts = []
        if hosts:
            refs = [h.stop.remote() for h in hosts]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            for rank, ref in enumerate(refs):
                if ref not in ready:
                    warnings.warn(f"group '{self.name}' rank {rank}: shutdown() did not finish; killing it")
                    continue
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    pass  # already dead: its death was reported when it happened
                except Exception as e:  # a failed worker still gets killed below
                    warnings.warn(f"group '{self.name}' rank {rank}: shutdown() failed: {last_lines(str(e), 3)}")
            for h in hosts:
                ray.kill(h)
        if self._owns_pool and getattr(self, "pool", None) is not None:
            self.pool.remove()


def _log_tail(where: dict | None, n: int = 12) -> str | None:
    """The last lines of a worker's Ray log files (.err first: tracebacks land there)."""
    if not where:
        return None
    tails = []
    for path in sorted(where.get("logs", []), key=lambda p: not p.endswith(".err")):
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 16384))
                raw = f.read().decode("utf-8", "replace").splitlines()
                # Ray's own header lines (:job_id:, :actor_name:, :task_name:) say nothing.
                text = last_lines("\n".join(ln for ln in raw if not ln.startswith(":")), n)
        except OSError:
            tails.append(f"(log {path} is on node {where.get('host')}, not readable here)")
            continue
        if text:
            tails.append(f"{os.path.basename(path)}:\n{text}")
    return "\n".join(tails) or None


def _resources(resources: Any) -> tuple[int, int, str, float]:
    """(nodes, devices_per_node, device, cpus_per_worker) from a ResourcesConfig, dict or None."""
    def get(key, default):
        if resources is None:
            return default
        if isinstance(resources, dict):
            return resources.get(key, default)
        return getattr(resources, key, default)

    device = resolve_device(get("device", "auto"))
    return int(get("nodes", 1)), int(get("devices_per_node", 1)), device, float(get("cpus_per_worker", 1.0))


def _share_identical_args(per_rank: list[tuple[tuple, dict]]) -> list[tuple]:
    """Arguments that every rank gets (one object, `all`/`rank0`) go into Ray's store once.

    They are passed as top-level ObjectRefs, which Ray resolves before the method runs.
    """
    if len(per_rank) < 2 or any(p is not per_rank[0] for p in per_rank):
        return per_rank
    args, kwargs = per_rank[0]
    if not args and not kwargs:
        return per_rank
    return [(ray.put(args), ray.put(kwargs))] * len(per_rank)


# ---------------------------------------------------------------------------- local


class LocalWorkerGroup(WorkerGroup):
    """The same worker class in this process, world size 1, no Ray: debug with a debugger."""

    def __init__(self, worker_cls: type, init_kwargs: dict | None = None, name: str = "workers",
                 device: str = "cpu", env: dict | None = None):
        super().__init__(worker_cls, name, 1)
        for key, value in (env or {}).items():  # what a Ray worker would get, unless set here
            os.environ.setdefault(key, str(value))
        # This process's stdout is the console: route vLLM's logger and warnings to a file instead.
        self._log = log = log_path(name, "local", env or {})
        route_library_logs(log)
        had_world = dist.is_initialized()
        try:
            with output_to(log):
                self.worker = worker_cls(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                                         device=resolve_device(device), local_rank=0, **(init_kwargs or {}))
        except Exception as e:
            if not had_world and dist.is_initialized():
                dist.destroy_process_group()
            raise WorkerError(name, "__init__", 0, f"{type(e).__name__}: {e}") from e

    def _run(self, method: str, per_rank: list[tuple[tuple, dict]]) -> list:
        if self.worker is None:
            raise WorkerError(self.name, method, None, "the group was shut down")
        [(args, kwargs)] = per_rank
        try:
            # A late set-up (SFT's) loads models like the constructor does: its output to the log.
            with output_to(self._log if method == "setup" else None):
                return [getattr(self.worker, method)(*args, **kwargs)]
        except Exception as e:  # the original traceback stays attached as __cause__
            raise WorkerError(self.name, method, 0, f"{type(e).__name__}: {e}") from e

    def shutdown(self) -> None:
        worker, self.worker = self.worker, None
        if worker is None:
            return
        worker.shutdown()
        # Only after the worker's shutdown (its rollout engine is gone by then), and only the
        # world this group made: a world shared with another local group stays up.
        if worker.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- factory


def make_worker_group(
    launcher: str,
    worker_cls: type,
    *,
    name: str,
    init_kwargs: dict | None = None,
    world_size: int | None = None,
    resources: Any = None,
    placement_group: ResourcePool | str | None = None,
    env: dict | None = None,
    timeout_s: float | None = None,
) -> WorkerGroup:
    """launcher 'ray': a RayWorkerGroup; 'local': a LocalWorkerGroup (world size 1)."""
    if launcher == "ray":
        return RayWorkerGroup(worker_cls, world_size, resources, init_kwargs, name, placement_group, env, timeout_s)
    if launcher == "local":
        device = _resources(resources)[2]
        return LocalWorkerGroup(worker_cls, init_kwargs, name, device=device, env=env)
    from verlcli.errors import UserError

    raise UserError(f"launcher={launcher!r} is not known", fix="use launcher=ray or launcher=local")
