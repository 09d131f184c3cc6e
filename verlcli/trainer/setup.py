"""Everything an RL run holds: data, worker groups, reward scorer, KL controller; save/restore."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from verlcli.algorithms import dynamic_sampling_filter, get_kl_controller
from verlcli.config.arithmetic import placement_plan
from verlcli.data.batch import Batch
from verlcli.distributed.logs import LOG_DIR_ENV
from verlcli.io import write_json_atomic

def worker_env(cfg, device: str) -> dict:
    """What this run adds to the environment every worker gets (verlcli.distributed's
    worker_env): threads (via OMP only: in-process vLLM makes torch.set_num_threads a
    no-op). vLLM's CPU KV-cache size is not here: the worker passes it to the engine in bytes."""
    env = {"VERL_DIST_TIMEOUT_S": str(cfg.trainer.collective_timeout_s)}  # init_process_group's timeout
    if cfg.trainer.deterministic:  # cuBLAS needs a fixed workspace to be deterministic
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(int(cfg.resources.cpus_per_worker), 1))
        # Few malloc arenas: freed memory is reused across phases (workers/malloc.py).
        env["MALLOC_ARENA_MAX"] = os.environ.get("MALLOC_ARENA_MAX", "2")
    if not cfg.logging.verbose:  # workers' output to RUN_DIR/logs/ (verlcli.distributed.logs)
        env[LOG_DIR_ENV] = str((Path(cfg.run_dir) / "logs").resolve())
    return env


def ensure_ray(launcher: str, env: dict, verbose: bool = False) -> bool:
    """Start (or join) Ray for launcher=ray. True when this call started it (so teardown stops it)."""
    if launcher != "ray":
        return False
    import ray

    from verlcli.distributed import ray_init

    started = not ray.is_initialized()
    ray_init(env=env, log_to_driver=verbose)
    return started


def shared_pool(cfg, plan, device: str):
    """launcher=ray: the one resource pool every colocated group shares (None for local).

    Each colocated group takes 1/len(plan.colocated) of every bundle, so e.g. the hybrid
    actor and a reward model fit on one 8-GPU node together. Separate groups reserve their
    own pools later; the cluster is checked for all of them first, so a run that can never
    fit fails at once, naming the keys, instead of waiting out the placement timeout.
    """
    if cfg.launcher != "ray":
        return None
    from verlcli.distributed.placement import check_fits, resource_pool

    r = cfg.resources
    keys = [("critic" if g == "critic" else "reward.model") + ".placement=separate" for g in plan.separate]
    why = f" (resources.nodes × devices_per_node for the actor, again for {', '.join(keys)})" if keys else ""
    check_fits(plan.devices_needed, device, r.cpus_per_worker, r.nodes, why)
    return resource_pool(r.nodes, r.devices_per_node, device, r.cpus_per_worker,
                         max_colocate=len(plan.colocated), world_size=cfg.world_size)


def record_placement(run: Path, groups: list) -> None:
    """Where every rank of every group runs (node id, host, pid) → run_dir/placement.json,
    so multi-node placement can be checked after the fact; one summary line on the console."""
    where = {g.name: g.execute_all("_verl_info") for g in groups}
    write_json_atomic(run / "placement.json", where)
    nodes = {i.get("node_id") for infos in where.values() for i in infos}
    print(f"placement: {', '.join(f'{k} × {len(v)}' for k, v in where.items())} on {len(nodes)} node(s)", flush=True)


@dataclass
class RunState:
    cfg: object
    tokenizer: object
    loader: object
    val_data: list | None
    actor: object
    critic: object
    reward_model: object
    scorer: object
    kl_ctrl: object
    started_ray: bool = False
    groups: list = field(default_factory=list)
    model_path: str = ""
    pools: list = field(default_factory=list)
    _warned: set = field(default_factory=set)

    def warn_once(self, msg: str) -> None:
        key = msg.split(":")[0]
        if key not in self._warned:
            self._warned.add(key)
            print(f"warning: {msg}", flush=True)

    def filter_groups(self, batch: Batch):
        """DAPO dynamic sampling: drop groups whose rewards are all equal (off by default)."""
        if not self.cfg.algorithm.dynamic_sampling:
            return batch, {}
        keep, dropped = dynamic_sampling_filter(batch["scores"], list(batch["uid"]))
        kept = batch.index(keep)
        n, dp = self.cfg.rollout.n, self.cfg.world_size
        groups = len(kept) // n
        while groups and (groups * n) % dp:  # every rank must get the same number of rows
            groups -= 1
        metrics = {"dapo/groups_dropped": float(dropped), "dapo/groups_kept": float(groups)}
        return (kept.index(slice(0, groups * n)) if groups else None), metrics

    def save(self, step_dir: Path, step: int) -> None:
        extra = {"step": step, "loader": self.loader.state_dict(), "kl_coef": float(self.kl_ctrl.value)}
        self.actor.save_checkpoint(str(step_dir), extra)
        if self.critic is not None and self.critic is not self.actor:
            self.critic.save_checkpoint(str(step_dir), extra)
        write_json_atomic(step_dir / "trainer.json", extra)  # the manifest (run_dir.save_step) marks it complete

    def restore(self, step_dir: Path) -> int:
        extra = json.loads((step_dir / "trainer.json").read_text())
        self.actor.load_checkpoint(str(step_dir))
        if self.critic is not None and self.critic is not self.actor:
            self.critic.load_checkpoint(str(step_dir))
        self.loader.load_state_dict(extra["loader"])
        self.kl_ctrl.value = extra.get("kl_coef", self.kl_ctrl.value)
        return int(extra["step"])


def build(cfg, device: str, run: Path, checked) -> RunState:
    """`checked`: what preflight loaded (model path, tokenizer, tokenized datasets)."""
    from verlcli.data.dataset import PromptLoader
    from verlcli.distributed import make_worker_group
    from verlcli.rewards.pool import RewardScorer
    from verlcli.workers.hybrid import HybridWorker

    torch.manual_seed(cfg.trainer.seed)
    path, tok = checked.model_path, checked.tokenizer  # a built-in is built once, before workers race for it
    d = cfg.data
    loader = PromptLoader(checked.train, d.train_prompts_per_step, seed=cfg.trainer.seed, shuffle=d.shuffle)
    val = None
    if checked.val is not None:
        val = list(checked.val)
        val = val[: d.val_prompts] if d.val_prompts else val
    env = worker_env(cfg, device)
    started_ray = ensure_ray(cfg.launcher, env, cfg.logging.verbose)
    roles = ["actor", "rollout"] + (["ref"] if cfg.use_reference else [])
    separate = cfg.use_critic and cfg.critic.placement == "separate"
    if cfg.use_critic and not separate:
        roles.append("critic")
    resources = {**cfg.resources.model_dump(), "device": device}
    plan = placement_plan(cfg)
    pool = shared_pool(cfg, plan, device)  # every colocated group's ranks on the same bundles
    kw = dict(world_size=cfg.world_size, resources=resources, env=env, timeout_s=cfg.trainer.call_timeout_s)
    cfg_dict = cfg.model_dump(mode="json")
    setup_kw = dict(cfg=cfg_dict, total_steps=cfg.trainer.total_steps)
    # Workers build their models in setup(), all ranks at once (process-group and vLLM
    # start-up are collectives).
    actor = make_worker_group(cfg.launcher, HybridWorker, name="actor", init_kwargs={**setup_kw, "roles": roles},
                              placement_group=pool, **kw)
    actor.replica_size = cfg.rollout.tensor_parallel_size  # generate: one prompt chunk per TP engine
    actor.use_worker_dp_layout()  # dp calls: one chunk per training data-parallel slice
    groups = [actor]
    critic = actor if cfg.use_critic and not separate else None
    if separate:
        critic = make_worker_group(cfg.launcher, HybridWorker, name="critic", placement_group="separate",
                                   init_kwargs={**setup_kw, "roles": ["critic"]}, **kw)
        critic.use_worker_dp_layout()
        groups.append(critic)
    reward_model = None
    if cfg.reward.model.path:
        from verlcli.workers.reward_model import RewardModelWorker

        rm_pool = "separate" if "reward_model" in plan.separate else pool
        reward_model = make_worker_group(cfg.launcher, RewardModelWorker, name="reward_model",
                                         init_kwargs={"cfg": cfg_dict}, placement_group=rm_pool, **kw)
        groups.append(reward_model)
    record_placement(run, groups)
    r = cfg.reward  # user functions run sandboxed: limits, no network, no access to the run dir
    sandbox = {"run_dir": str(run.resolve()), "memory_gb": r.memory_gb, "cpu_s": r.timeout_s} if r.sandbox else None
    scorer = RewardScorer(r.fn, timeout_s=r.timeout_s, num_workers=r.workers, sandbox=sandbox)
    k = cfg.algorithm.kl_ctrl
    kl_ctrl = get_kl_controller(k.type, k.kl_coef, k.target_kl, k.horizon)
    return RunState(cfg, tok, loader, val, actor, critic, reward_model, scorer, kl_ctrl, started_ray, groups, str(path),
                    pools=[pool] if pool is not None else [])


def teardown(w: RunState) -> None:
    w.scorer.close()
    for g in w.groups:
        try:
            g.shutdown()
        except Exception as e:  # noqa: BLE001 - teardown must reach ray.shutdown
            print(f"warning: shutting down {g}: {e}")
    for pool in w.pools:  # shared pools outlive their groups; separate ones went with theirs
        pool.remove()
    if w.started_ray:
        import ray

        ray.shutdown()
