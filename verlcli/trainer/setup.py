"""Everything an RL run holds: data, worker groups, reward scorer, KL controller; save/restore."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from verlcli.algorithms import dynamic_sampling_filter, get_kl_controller
from verlcli.data.batch import Batch
from verlcli.io import write_json_atomic

def worker_env(cfg, device: str) -> dict:
    """What this run adds to the environment every worker gets (verlcli.distributed's
    worker_env): threads (via OMP only: in-process vLLM makes torch.set_num_threads a
    no-op) and vLLM's CPU KV-cache size."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.cpu_kvcache_gb)}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(int(cfg.resources.cpus_per_worker), 1))
    return env


def ensure_ray(launcher: str, env: dict) -> bool:
    """Start (or join) Ray for launcher=ray. True when this call started it (so teardown stops it)."""
    if launcher != "ray":
        return False
    import ray

    from verlcli.distributed import ray_init

    started = not ray.is_initialized()
    ray_init(env=env)
    return started


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


def build(cfg, device: str, run: Path) -> RunState:
    from transformers import AutoTokenizer

    from verlcli.data.dataset import PromptLoader, load_rl_dataset
    from verlcli.distributed import make_worker_group
    from verlcli.models.resolve import resolve_model
    from verlcli.rewards.pool import RewardScorer
    from verlcli.workers.hybrid import HybridWorker

    torch.manual_seed(cfg.trainer.seed)
    path = resolve_model(cfg.model.path)  # builds a built-in once, before workers race for it
    tok = AutoTokenizer.from_pretrained(str(path))
    d = cfg.data
    ds_kw = dict(prompt_key=d.prompt_key, max_prompt_tokens=d.max_prompt_tokens, truncation=d.truncation)
    train = load_rl_dataset(d.train_files, tok, **ds_kw)
    loader = PromptLoader(train, d.train_prompts_per_step, seed=cfg.trainer.seed, shuffle=d.shuffle)
    val = None
    if d.val_files:
        val = list(load_rl_dataset(d.val_files, tok, **ds_kw))
        val = val[: d.val_prompts] if d.val_prompts else val
    env = worker_env(cfg, device)
    started_ray = ensure_ray(cfg.launcher, env)
    roles = ["actor", "rollout"] + (["ref"] if cfg.use_reference else [])
    separate = cfg.use_critic and cfg.critic.placement == "separate"
    if cfg.use_critic and not separate:
        roles.append("critic")
    resources = {**cfg.resources.model_dump(), "device": device}
    kw = dict(world_size=cfg.world_size, resources=resources, env=env)
    cfg_dict = cfg.model_dump(mode="json")
    setup_kw = dict(cfg=cfg_dict, total_steps=cfg.trainer.total_steps)
    # Workers build their models in setup(), all ranks at once (process-group and vLLM
    # start-up are collectives).
    actor = make_worker_group(cfg.launcher, HybridWorker, name="actor", init_kwargs={**setup_kw, "roles": roles}, **kw)
    groups = [actor]
    critic = actor if cfg.use_critic and not separate else None
    if separate:
        critic = make_worker_group(cfg.launcher, HybridWorker, name="critic", placement_group="separate",
                                   init_kwargs={**setup_kw, "roles": ["critic"]}, **kw)
        groups.append(critic)
    reward_model = None
    if cfg.reward.model.path:
        from verlcli.workers.reward_model import RewardModelWorker

        reward_model = make_worker_group(cfg.launcher, RewardModelWorker, name="reward_model",
                                         init_kwargs={"cfg": cfg_dict}, **kw)
        groups.append(reward_model)
    scorer = RewardScorer(cfg.reward.fn, timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.workers)
    k = cfg.algorithm.kl_ctrl
    kl_ctrl = get_kl_controller(k.type, k.kl_coef, k.target_kl, k.horizon)
    return RunState(cfg, tok, loader, val, actor, critic, reward_model, scorer, kl_ctrl, started_ray, groups, str(path))


def teardown(w: RunState) -> None:
    w.scorer.close()
    for g in w.groups:
        try:
            g.shutdown()
        except Exception as e:  # noqa: BLE001 - teardown must reach ray.shutdown
            print(f"warning: shutting down {g}: {e}")
    if w.started_ray:
        import ray

        ray.shutdown()
