"""Ray start-up and resource pools (placement groups) that worker groups live on.

A resource pool reserves one bundle per device: ``{"GPU": 1, "CPU": c}`` on GPU machines,
``{"CPU": c}`` on CPU. It is one STRICT_PACK placement group per node, so rank r always lands
on node r // devices_per_node and LOCAL_RANK means what it says. With several nodes, a
STRICT_SPREAD probe first picks that many distinct nodes; each node's group is then pinned to
one of them, in node-id order (not IP order: nodes may share an IP, as simulated ones do).

Colocation (verl's hybrid engine + colocated critic): several worker groups share one pool.
Each of their actors asks for 1 / max_colocate of its bundle (fractional GPU and CPU), so
up to `max_colocate` groups fit on the same devices, rank r of every group on bundle r. A group
that gets its own pool (`placement_group="separate"`) asks for whole bundles.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from verlcli.errors import UserError

try:  # the local launcher must work without Ray
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # pragma: no cover
    ray = None

PG_TIMEOUT_ENV = "VERL_PLACEMENT_TIMEOUT_S"
NODE_ID_LABEL = "ray.io/node-id"  # a label Ray gives every node: its hex node id


def require_ray():
    if ray is None:
        raise UserError("launcher=ray needs the 'ray' package", fix="pip install 'ray>=2.40', or use launcher=local")
    return ray


def worker_env(extra: dict | None = None) -> dict[str, str]:
    """Environment variables every worker process needs, on every node.

    Ray worker processes on other nodes do not inherit the driver's environment, so the
    settings that decide threading and vLLM's mode travel with the job, plus a PYTHONPATH
    that makes this checkout's `verlcli` importable.
    """
    keep = ("OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
            "VERL_DIST_TIMEOUT_S", "VERL_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    # Which network interface gloo / NCCL use (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, NCCL_IB_*,
    # NCCL_DEBUG ...): set where `verl` runs, they must reach the workers on every node too.
    env.update({k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "GLOO_"))})
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parents[2])
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _ray_temp_dir() -> Path:
    """Where Ray keeps its state on this machine ($RAY_TMPDIR/ray, else /tmp/ray)."""
    try:
        from ray._common.utils import get_default_ray_temp_dir

        return Path(get_default_ray_temp_dir())
    except Exception:  # private API moved: Ray's documented default
        return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"


def _remembered_address() -> str | None:
    """The cluster `ray start --head` left on this machine: a live GCS process, or the
    address Ray wrote to its temp dir (which outlives a killed cluster)."""
    try:
        from ray._private.services import get_ray_address_from_environment

        saved = os.environ.pop("RAY_ADDRESS", None)  # only what Ray remembered, not the env
        try:
            return get_ray_address_from_environment(None, str(_ray_temp_dir()))
        finally:
            if saved is not None:
                os.environ["RAY_ADDRESS"] = saved
    except Exception:  # private API moved: fall back to the file `ray start` writes
        marker = _ray_temp_dir() / "ray_current_cluster"
        if not marker.exists():
            return None
        return marker.read_text().strip() or None


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _answers(address: str, timeout_s: float = 3.0) -> bool:
    """Whether a gRPC server (Ray's GCS or client server) answers at host:port / ray://host:port.

    Ray itself retries a dead GCS address for minutes; this takes at most ~2 × `timeout_s`.
    A bare TCP connect is not enough (proxies and firewalls accept connections to dead
    hosts): the HTTP/2 preface must get an HTTP/2 SETTINGS frame back, as gRPC servers send."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    return False
                head += chunk
            if head[3] != 0x04:  # frame type SETTINGS
                return False
    except (OSError, ValueError):
        return False
    return address.startswith("ray://") or _gcs_answers(hostport, timeout_s)


def _gcs_answers(hostport: str, timeout_s: float) -> bool:
    """Ask the GCS for a key with Ray's own client, in a thread we can stop waiting for."""
    import threading

    answer = []

    def ask():
        try:
            from ray._raylet import GcsClient

            GcsClient(address=hostport).internal_kv_get(b"verl-probe", None, timeout=timeout_s)
            answer.append(True)
        except Exception:  # noqa: BLE001 - any failure means "not a live GCS"
            answer.append(False)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(2 * timeout_s)
    return bool(answer and answer[0])


def _cluster_address(address: str | None) -> str | None:
    """The address to join, or None to start a local instance. A dead address given by the
    user (argument or RAY_ADDRESS) is an error; a dead one Ray remembered is skipped."""
    given = address or os.environ.get("RAY_ADDRESS")
    if given and given != "auto":
        if not _answers(given):
            where = "RAY_ADDRESS" if not address else "the Ray address"
            raise UserError(
                f"{where}={given} does not answer: no Ray cluster is listening there",
                fix="start the cluster (`ray start --head` on that node, `ray start --address "
                f"{given}` on the others), correct the address, or unset RAY_ADDRESS to run on a "
                "private local Ray instance",
            )
        return given
    found = _remembered_address()
    if found and not _answers(found):
        print(f"warning: ignoring Ray cluster address {found} remembered in {_ray_temp_dir()}: "
              "nothing answers there (the cluster is gone); starting a local Ray instance", flush=True)
        return None
    return found


# A private local Ray starts its workers on demand: by default it prestarts one idle Python
# worker per CPU for the first driver, and on a small machine the ones no actor takes stay idle
# for the whole run (~0.2 GB each, measured: BENCHMARKS.md, Memory).
_LOCAL_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}


def ray_init(num_cpus: int | None = None, env: dict | None = None, address: str | None = None,
             log_to_driver: bool = True) -> None:
    """Connect to a running Ray cluster, or start a private one on this machine.

    address None: RAY_ADDRESS or a cluster from `ray start --head` if there is one (multi-node
    is Ray's job), else a new local instance with `num_cpus`. address "local": always a new
    local instance (tests, and not stepping on someone else's cluster). log_to_driver=False:
    workers' output stays in their log files (verlcli.distributed.logs), and Ray's own
    start-up notes are not printed either.
    """
    require_ray()
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env(env)}
    quiet = {} if log_to_driver else {"logging_level": logging.ERROR}
    found = None if address == "local" else _cluster_address(address)
    if found:
        # An existing cluster has its own resource counts; num_cpus is not allowed here.
        ray.init(address=found, runtime_env=runtime_env, log_to_driver=log_to_driver, **quiet)
    else:
        # Ray starts workers at nice 15 (to keep its own daemons responsive); here the workers do
        # all the compute, so beside any other busy process they would get a sliver of the cores
        # (CFS weight 36 at nice 15 vs 1024 at nice 0). They run at the driver's niceness instead.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env=runtime_env, _system_config=_LOCAL_SYSTEM_CONFIG | {"worker_niceness": os.nice(0)},
                 **quiet)


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when the Ray cluster (or this process) has a GPU, else 'cpu'."""
    if device != "auto":
        return device
    if ray is not None and ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ResourcePool:
    """Bundles for `world_size` ranks on `len(pgs)` nodes; share it to colocate groups."""

    pgs: list
    devices_per_node: int
    device: str
    cpus_per_worker: float
    max_colocate: int
    world_size: int
    users: list[str] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)  # node of each placement group, in order

    def scheduling(self, rank: int) -> dict:
        """Ray actor options that put rank `rank` on its bundle with a 1/max_colocate share."""
        if rank >= self.world_size:
            raise UserError(
                f"a worker group wants rank {rank}, but the resource pool has only {self.world_size} bundles",
                fix="build the pool with nodes × devices_per_node >= the group's world size",
            )
        share = 1.0 / self.max_colocate
        pg = self.pgs[rank // self.devices_per_node]
        opts = {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank % self.devices_per_node
            ),
            "num_cpus": self.cpus_per_worker * share,
            "num_gpus": share if self.device == "cuda" else 0,
        }
        return opts

    def remove(self) -> None:
        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with the cluster
                pass
        self.pgs = []


def resource_pool(
    nodes: int = 1,
    devices_per_node: int = 1,
    device: str = "cpu",
    cpus_per_worker: float = 1.0,
    max_colocate: int = 3,
    world_size: int | None = None,
) -> ResourcePool:
    """Reserve one bundle per device, one STRICT_PACK placement group per node, and wait for it.

    max_colocate: how many groups share each bundle (each takes 1/max_colocate of it).
    world_size: fewer ranks than nodes × devices_per_node (the last node partly used).
    """
    require_ray()
    device = resolve_device(device)
    world = nodes * devices_per_node if world_size is None else world_size
    bundle = {"CPU": float(cpus_per_worker)} | ({"GPU": 1.0} if device == "cuda" else {})
    counts = [min(devices_per_node, world - i) for i in range(0, world, devices_per_node)]
    check_fits(world, device, cpus_per_worker, len(counts))
    timeout = float(os.environ.get(PG_TIMEOUT_ENV, "120"))
    if len(counts) == 1:
        pgs = [placement_group([dict(bundle) for _ in range(counts[0])], strategy="STRICT_PACK")]
    else:
        pins = _distinct_nodes(counts, bundle, timeout)
        pgs = [placement_group([dict(bundle) for _ in range(n)], strategy="STRICT_PACK",
                               bundle_label_selector=[{NODE_ID_LABEL: node}] * n) for node, n in pins]
        counts = [n for _, n in pins]
    for i, pg in enumerate(pgs):
        if not pg.wait(timeout_seconds=timeout):
            for p in pgs:
                remove_placement_group(p)
            _not_reserved(f"node {i}'s {counts[i]} × {bundle}", timeout)
    node_ids = [placement_group_table(pg)["bundles_to_node_id"][0] for pg in pgs]
    return ResourcePool(pgs, devices_per_node, device, float(cpus_per_worker), max_colocate, world, node_ids=node_ids)


def _distinct_nodes(counts: list[int], bundle: dict, timeout: float) -> list[tuple[str, int]]:
    """(node id, bundles) for each node's group: distinct nodes (a STRICT_SPREAD probe of
    one whole-node bundle each), full nodes in node-id order, a partly used one last."""
    probe = placement_group([{k: v * n for k, v in bundle.items()} for n in counts], strategy="STRICT_SPREAD")
    try:
        if not probe.wait(timeout_seconds=timeout):
            _not_reserved(f"{len(counts)} distinct nodes with {counts[0]} × {bundle} each", timeout)
        where = placement_group_table(probe)["bundles_to_node_id"]
        pins = [(where[i], n) for i, n in enumerate(counts)]
    finally:
        remove_placement_group(probe)  # its resources go to the pinned groups below
    return sorted(pins, key=lambda p: (p[1] != counts[0], p[0]))


def _not_reserved(what: str, timeout: float):
    raise UserError(
        f"Ray could not reserve {what} within {timeout:g} s (cluster free: {_fmt(ray.available_resources())})",
        fix="lower resources.devices_per_node / nodes / cpus_per_worker, add nodes with "
        f"`ray start --address ...`, or stop other Ray jobs (wait longer: {PG_TIMEOUT_ENV})",
    )


def check_fits(world: int, device: str, cpus_per_worker: float, nodes: int = 1, why: str = "") -> None:
    """Fail now, with the numbers, when the cluster can never hold `world` bundles on `nodes`
    distinct nodes (not just busy). `why` names the config keys behind `world`."""
    total = ray.cluster_resources()
    need = {"CPU": world * cpus_per_worker} | ({"GPU": float(world)} if device == "cuda" else {})
    short = {k: v for k, v in need.items() if total.get(k, 0) + 1e-9 < v}
    if short:
        have = {k: total.get(k, 0) for k in short}
        raise UserError(
            f"{world} workers{why} need {_fmt(short)} but the Ray cluster has {_fmt(have)}",
            fix="lower resources.nodes × devices_per_node or resources.cpus_per_worker, or start "
            "Ray with more resources (num_cpus / more nodes)",
        )
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > alive:
        raise UserError(
            f"resources.nodes={nodes} but the Ray cluster has {alive} node(s)",
            fix="join more nodes (`ray start --address HEAD_IP:6379` on each) and point RAY_ADDRESS "
            "at the head, or lower resources.nodes",
        )


def _fmt(res: dict) -> str:
    keep = {k: (int(v) if float(v).is_integer() else round(v, 2)) for k, v in res.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v} {k}" for k, v in sorted(keep.items())) or "nothing"


def nodes_for(world_size: int, devices_per_node: int) -> int:
    return max(1, math.ceil(world_size / devices_per_node))
