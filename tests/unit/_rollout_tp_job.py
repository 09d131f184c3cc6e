"""One rank of the rollout TP / streamed-sync job (run by test_rollout_tp.py, not by pytest).

    RANK=r WORLD_SIZE=W MASTER_ADDR=... MASTER_PORT=... python _rollout_tp_job.py OUT TP [WEIGHTS]

Without WEIGHTS: FSDP-train tiny-qwen2 one step, check `weight_buckets` against the full
state dict, stream the weights into a vLLM engine of TP ranks, generate greedily. Rank 0
saves the trained weights (safetensors) and the outputs. With WEIGHTS (one rank, TP 1): load
those weights into a one-rank engine and generate the same prompts, for comparison.
"""

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from verlcli.config.schema import OptimConfig
from verlcli.models.resolve import resolve_model
from verlcli.rollout import SamplingSpec, make_rollout

PROMPTS = [[1, 20, 30, 40], [7, 8, 9], [11, 12, 13, 14, 15], [300, 5]]
SPEC = SamplingSpec(temperature=0, max_tokens=8)


def allreduce_ok() -> bool:
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item() == dist.get_world_size()


def train_one_step(path):
    from verlcli.engine import FSDPEngine

    eng = FSDPEngine(path, optim=OptimConfig(lr=1e-2), total_optimizer_steps=2, device="cpu",
                     compute_dtype="float32")
    g = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(10, 3000, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    pos = torch.arange(12).expand(2, 12)
    lp, _ = eng.log_probs(ids, mask, pos, 6)
    eng.backward(-lp.sum() / (lp.numel() * dist.get_world_size()))
    eng.step()
    return eng


def check_buckets(eng, res):
    full = eng.full_state_dict()  # one bucket: the reference
    limit = 64 * 1024
    buckets = list(eng.weight_buckets(limit, torch.float32))
    res["n_buckets"] = len(buckets)
    seen = {}
    for b in buckets:
        unique = {t.data_ptr(): t for _, t in b}.values()  # a tied tensor counts once
        nbytes = sum(t.numel() * t.element_size() for t in unique)
        res.setdefault("bounded", True)
        res["bounded"] &= nbytes <= limit or len(unique) == 1
        seen.update(b)
    res["same_names"] = set(seen) == set(full)
    res["same_values"] = all(torch.equal(seen[k], full[k]) for k in full)
    res["lm_head_synced"] = "lm_head.weight" in seen
    bf16 = {k: v for b in eng.weight_buckets(1 << 20, torch.bfloat16) for k, v in b}
    res["bf16_cast"] = all(v.dtype == torch.bfloat16 and torch.equal(v, full[k].to(torch.bfloat16))
                           for k, v in bf16.items()) and set(bf16) == set(full)
    return full


def main():
    out, tp = sys.argv[1], int(sys.argv[2])
    weights = sys.argv[3] if len(sys.argv) > 3 else None
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    path = resolve_model("tiny-qwen2")
    res = {"rank": rank}
    eng = full = None
    if weights is None:
        eng = train_one_step(path)
        full = check_buckets(eng, res)
    engine = make_rollout("vllm", path, device="cpu", dtype="float32", max_model_len=128, seed=0,
                          tensor_parallel_size=tp)
    res["allreduce_after_create"] = allreduce_ok()
    if weights is None:
        stats = engine.sync_weight_buckets(eng.weight_buckets(256 * 1024, torch.float32))
        res["sync_buckets"] = stats["sync_buckets"]
    else:
        engine.sync_weights(load_file(weights))
    outs = engine.generate(PROMPTS, SPEC)
    res["outputs"] = [[o.prompt_index, o.response_ids, o.logprobs] for o in outs]
    res["allreduce_after_use"] = allreduce_ok()
    if rank == 0 and full is not None:
        # lm_head.weight shares the embedding's storage: safetensors wants it once.
        save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"},
                  f"{out}.weights.safetensors")
    engine.shutdown()
    res["allreduce_after_shutdown"] = allreduce_ok()
    dist.destroy_process_group()
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
