"""What to turn when `verl plan` says a run does not fit: knob settings, each checked by
planning again, that make it fit (single changes first, nearest the current value)."""

from __future__ import annotations

import math

from verlcli.config.kv_cache import cpu_kv_cache
from verlcli.config.plan import Plan, memory_plan, rollout_bytes
from verlcli.config.schema import Config
from verlcli.models.shape import ModelShape, divides_heads


def with_overrides(cfg: Config, sets: dict[str, object]) -> Config:
    """A copy of cfg with dotted keys set (validated like any override)."""
    tree = cfg.model_dump()
    for key, value in sets.items():
        node = tree
        *head, last = key.split(".")
        for part in head:
            node = node[part]
        node[last] = value
    return Config.model_validate(tree)


def _candidates(cfg: Config, kind: str, shape: ModelShape, gpu: bool) -> list[dict[str, object]]:
    """Single-knob changes, each toward less memory (or a bigger KV cache)."""
    out: list[dict[str, object]] = []
    roles = ["sft"] if kind == "sft" else ["actor"] + (["critic"] if cfg.use_critic else [])
    if not cfg.model.gradient_checkpointing:
        out.append({"model.gradient_checkpointing": True})
    if gpu and kind != "sft":
        if not cfg.actor.offload_optimizer and not cfg.actor.offload_params:
            out.append({f"{r}.offload_optimizer": True for r in roles})
        if not cfg.actor.offload_params:
            out.append({f"{r}.offload_params": True for r in roles})
    for r in roles:
        micro = getattr(cfg, r).micro_batch_sequences_per_device
        out += [{f"{r}.micro_batch_sequences_per_device": m} for m in range(micro - 1, 0, -1)]
    if kind != "sft" and cfg.rollout.engine == "vllm":
        r = cfg.rollout
        if gpu:
            utils = sorted((round(u / 20, 2) for u in range(2, 20)),
                           key=lambda u: abs(u - r.gpu_memory_utilization))
            out += [{"rollout.gpu_memory_utilization": u} for u in utils if u != r.gpu_memory_utilization]
            out += [{"rollout.tensor_parallel_size": t} for t in (2, 4, 8)
                    if t > r.tensor_parallel_size and t <= cfg.resources.devices_per_node
                    and cfg.world_size % t == 0 and divides_heads(shape, t)]
        elif r.cpu_kvcache_gb is not None:  # an explicit size: what the job itself needs
            auto = cpu_kv_cache(with_overrides(cfg, {"rollout.cpu_kvcache_gb": None}), shape,
                                rollout_bytes(cfg, "cpu"))
            need = math.ceil(auto.gib * 100) / 100
            if need < r.cpu_kvcache_gb:
                out.append({"rollout.cpu_kvcache_gb": need})
    out += [{"resources.nodes": cfg.resources.nodes * k} for k in (2, 4, 8)]
    return out


def _score(plan: Plan) -> float:
    """How far from fitting (0 = fits): the worst overshoot, problems count as large."""
    over = max(plan.peaks.values()) - plan.device_memory
    if plan.host_memory is not None:
        over = max(over, plan.host_per_node - plan.host_memory)
    return max(over, 0.0) + 1e15 * len(plan.problems)


def fixes(cfg: Config, kind: str, shape: ModelShape, device: str, max_fixes: int = 3,
          **shapes) -> list[dict[str, object]]:
    """Knob settings that make a failing plan fit: single changes first (the one nearest the
    current value per knob), else a greedy combination of up to three changes."""
    gpu = device == "cuda"

    def evaluate(sets):
        try:
            return memory_plan(with_overrides(cfg, sets), kind, shape, device, **shapes)
        except Exception:  # a change that breaks the batch arithmetic is not a fix
            return None

    found, seen_keys = [], set()
    for sets in _candidates(cfg, kind, shape, gpu):
        key = tuple(sorted(sets))
        if key in seen_keys:
            continue
        p = evaluate(sets)
        if p is not None and p.fits:
            found.append(sets)
            seen_keys.add(key)
        if len(found) >= max_fixes:
            return found
    if found:
        return found
    combo: dict[str, object] = {}
    for _ in range(3):  # greedy: take the change that brings it closest, then look again
        best, best_score = None, _score(memory_plan(with_overrides(cfg, combo), kind, shape, device, **shapes))
        for sets in _candidates(with_overrides(cfg, combo), kind, shape, gpu):
            p = evaluate({**combo, **sets})
            if p is not None and _score(p) < best_score:
                best, best_score = sets, _score(p)
        if best is None:
            return []
        combo.update(best)
        if best_score == 0:
            return [combo]
    return []
