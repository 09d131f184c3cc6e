"""Token-budget micro-batches (workers/micro.py) and the balanced data-parallel split
(distributed/balance.py, dispatch.py).

The gradient test runs the real HybridWorker (actor only, FSDP2 engine on tiny-qwen2, fp32,
one gloo rank in this process): budgets that cut the same mini-batch differently must give the
same loss, gradient norm and parameters after one optimizer step, and the no-grad forward
under a budget must return the same log-probs, in the batch's row order. A 2-rank run (gloo,
spawned) whose ranks need different numbers of forwards gives the same step again.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from verlcli.config.arithmetic import rl_plan
from verlcli.config.loader import load_config
from verlcli.data.batch import Batch
from verlcli.distributed.balance import balanced_partition, dp_order, imbalance
from verlcli.distributed.dispatch import DispatchSpec, collect_results, split_call
from verlcli.errors import UserError
from verlcli.workers import micro

P, R = 12, 10  # prompt and response slots of the test rows
LENGTHS = [(3, 10), (12, 2), (5, 1), (7, 9), (2, 4), (9, 10), (4, 3), (11, 6)]  # (prompt, response)


# ---------------------------------------------------------------- planning (pure)


def test_budget_fills_micro_batches_and_never_exceeds_it():
    prompts, responses = zip(*LENGTHS)
    for packed in (False, True):
        for budget in (22, 40, 64, 1000):
            micros = micro.by_budget(prompts, responses, budget, packed)
            assert sorted(i for m in micros for i in m) == list(range(len(LENGTHS)))
            assert all(micro.cost(m, prompts, responses, packed) <= budget for m in micros)
            # filled: no two neighbours would have fit together
            for a, b in zip(micros, micros[1:]):
                assert micro.cost(a + b[:1], prompts, responses, packed) > budget
    # packed rows pay only their real tokens, so the same budget takes fewer forwards
    assert len(micro.by_budget(prompts, responses, 40, True)) < len(micro.by_budget(prompts, responses, 40, False))
    assert len(micro.by_budget(prompts, responses, 1000, False)) == 1


def test_split_to_reaches_the_count_other_ranks_need():
    prompts, responses = zip(*LENGTHS)
    micros = micro.by_budget(prompts, responses, 64, packed=False)
    more = micro.split_to(micros, len(micros) + 3, prompts, responses, packed=False)
    assert len(more) == len(micros) + 3 and all(more)
    assert sorted(i for m in more for i in m) == list(range(len(LENGTHS)))
    with pytest.raises(ValueError):
        micro.split_to(micros, len(LENGTHS) + 1, prompts, responses, packed=False)


def test_balanced_partition_on_skewed_lengths():
    rng = random.Random(0)
    # 8 long rows among 56 short ones (an equal split of them exists for 2 and 4 ranks)
    costs = sorted([600 + rng.randint(0, 40) for _ in range(8)] + [30 + rng.randint(0, 40) for _ in range(56)])
    # sorted: the worst case for contiguous chunks, every long row on the last rank
    for parts in (2, 4):
        order = dp_order(costs, parts)
        assert sorted(order) == list(range(len(costs)))
        assert imbalance(costs, parts) > 1.5  # contiguous chunks
        assert imbalance(costs, parts, order) < 1.05
        sizes = {len(p) for p in balanced_partition(costs, parts)}
        assert sizes == {len(costs) // parts}  # equal row counts: same forwards on every rank
    # blocks (mini-batches) are balanced one by one and stay in their block
    order = dp_order(costs, 2, blocks=4)
    size = len(costs) // 2
    for r in range(2):
        chunk = order[r * size:(r + 1) * size]
        assert [i // 16 for i in chunk] == sorted(i // 16 for i in chunk)  # block 0 first, then 1...
    for b in range(4):
        block = list(range(b * 16, (b + 1) * 16))
        loads = [sum(costs[i] for i in order[r * size:(r + 1) * size] if i in block) for r in range(2)]
        assert max(loads) / (sum(loads) / 2) < 1.1


def test_dp_call_is_balanced_and_results_come_back_in_row_order():
    """The driver's split (with padding: 7 rows over 2 ranks) sends token-balanced chunks;
    per-rank answers (here: each row's token count and its rank) come back in input order."""
    lengths = [1, 2, 3, 30, 31, 32, 33]
    mask = torch.zeros(len(lengths), 40, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    batch = Batch({"attention_mask": mask, "x": torch.arange(len(lengths))})
    per_rank, plan = split_call(DispatchSpec("dp"), 2, (batch,), {}, "test")
    loads = [float(args[0]["attention_mask"].sum()) for args, _ in per_rank]
    assert max(loads) / (sum(loads) / 2) < 1.1  # contiguous chunks would be 37 vs 127 (+pad)
    results = [Batch({"x": a[0]["x"] * 10, "rank": torch.full((len(a[0]),), r)}) for r, (a, _) in enumerate(per_rank)]
    out = collect_results(DispatchSpec("dp"), plan, results, "test")
    assert out["x"].tolist() == [10 * i for i in range(len(lengths))]
    assert set(out["rank"].tolist()) == {0, 1}
    # k output rows per input row are kept together and put back too
    expanded = [Batch({"x": a[0]["x"].repeat_interleave(2)}) for a, _ in per_rank]
    assert collect_results(DispatchSpec("dp"), plan, expanded, "t")["x"].tolist() == [i for i in range(7) for _ in range(2)]


# ---------------------------------------------------------------- config


def test_budget_below_the_longest_sequence_names_the_key_and_a_value():
    base = ["data.max_prompt_tokens=100", "data.max_response_tokens=28"]
    with pytest.raises(UserError) as e:
        rl_plan(load_config(preset="tiny-cpu", overrides=base + ["actor.micro_batch_tokens_per_device=100"]))
    assert "actor.micro_batch_tokens_per_device=100" in e.value.message and "128" in e.value.fix
    with pytest.raises(UserError) as e:
        rl_plan(load_config(preset="tiny-cpu", overrides=base + ["actor.forward_micro_batch_tokens_per_device=64"]))
    assert "actor.forward_micro_batch_tokens_per_device" in e.value.message
    # a budget replaces the sequence count (and its divisibility rule); the plan says which rule holds
    plan = rl_plan(load_config(preset="tiny-cpu", overrides=base + ["actor.micro_batch_tokens_per_device=300",
                                                                     "actor.micro_batch_sequences_per_device=3"]))
    assert plan.actor_micro_batch.startswith("≤ 300 tokens") and plan.actor_forward_micro_batch.startswith("≤ 600 tokens")
    assert plan.grad_accum_steps == 2  # worst case: 4 sequences per device of 128 tokens, 2 per forward
    plan = rl_plan(load_config(preset="tiny-cpu", overrides=base))
    assert plan.actor_micro_batch.startswith("2 sequences") and plan.actor_forward_micro_batch.startswith("4 sequences")


# ---------------------------------------------------------------- the real worker


def _rows(seed: int = 0) -> Batch:
    from verlcli.workers import seq

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 3000, (p,), generator=g).tolist() for p, _ in LENGTHS]
    responses = [torch.randint(10, 3000, (r,), generator=g).tolist() for _, r in LENGTHS]
    rows = seq.build_rows(prompts, responses, [[-1.0] * len(r) for r in responses], 0, P, R)
    rows["advantages"] = torch.randn(len(LENGTHS), R, generator=g) * rows["response_mask"]
    return Batch(rows, meta={"temperature": 1.0})


RULES = {"sequences": [], "tight": ["actor.micro_batch_tokens_per_device=22"],
         "loose": ["actor.micro_batch_tokens_per_device=64"]}


def stepped_cfg(rule: str) -> dict:
    return load_config(preset="tiny-cpu", overrides=[
        f"data.max_prompt_tokens={P}", f"data.max_response_tokens={R}", "data.train_prompts_per_step=8",
        "rollout.n=1", "actor.mini_batch_prompts=8", "actor.micro_batch_sequences_per_device=2",
        "actor.optim.lr=1e-3", "actor.optim.eps=1e-4", "algorithm.adv_estimator=reinforce_plus_plus",
        "launcher=local", "resources.devices_per_node=1", *RULES[rule]]).model_dump(mode="json")


@pytest.fixture(scope="module")
def workers():
    """One actor worker per micro-batch rule, same initial weights (world size 1)."""
    from verlcli.workers.hybrid import HybridWorker

    made = {name: HybridWorker(rank=0, world_size=1, cfg=stepped_cfg(name), roles=["actor"], total_steps=1)
            for name in RULES}
    yield made
    owner = next(iter(made.values()))
    if owner.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def stepped(workers):
    """Old log-probs, then one update of every worker on the same rows."""
    batch = _rows()
    # (padding positions hold whatever the forward computed there: compared on real tokens)
    lp = {n: w.compute_log_probs(batch)["old_log_probs"] * batch["response_mask"] for n, w in workers.items()}
    before = workers["sequences"].actor.full_state_dict()
    stats = {n: w.update_actor(batch) for n, w in workers.items()}
    sd = {n: w.actor.full_state_dict() for n, w in workers.items()}
    return {"batch": batch, "lp": lp, "before": before, "stats": stats, "sd": sd}


def test_budgets_that_cut_differently_give_the_same_step(stepped):
    am = stepped["batch"]["attention_mask"]
    cuts = {n: micro.token_micro_batches(am, R, b, packed=False) for n, b in (("tight", 22), ("loose", 64))}
    assert len(cuts["tight"]) > len(cuts["loose"]) > 1  # really different cuts (and not 4 × 2 rows)
    lp, stats, sd = stepped["lp"], stepped["stats"], stepped["sd"]
    for n in ("tight", "loose"):  # the no-grad pass under a budget, rows back in order
        torch.testing.assert_close(lp[n], lp["sequences"], atol=1e-5, rtol=0)
    assert any(not torch.equal(v, stepped["before"][k]) for k, v in sd["sequences"].items())  # weights moved
    for n in ("tight", "loose"):
        assert stats[n]["actor/pg_loss"] == pytest.approx(stats["sequences"]["actor/pg_loss"], rel=1e-5, abs=1e-7)
        assert stats[n]["actor/grad_norm"] == pytest.approx(stats["sequences"]["actor/grad_norm"], rel=1e-5)
        for k, v in sd["sequences"].items():
            torch.testing.assert_close(sd[n][k], v, atol=1e-6, rtol=0, msg=lambda m: f"{n} {k}: {m}")


def _two_ranks(rank: int, port: int, out: str, cfg: dict) -> None:
    """Rank 0 gets the long rows, rank 1 the short ones: under a tight budget rank 0 needs more
    forwards, rank 1 splits its micro-batches to match (else FSDP's gathers would hang)."""
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    from verlcli.workers.hybrid import HybridWorker

    worker = HybridWorker(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port, cfg=cfg,
                          roles=["actor"], total_steps=1)
    batch = _rows()
    mine = batch.index(torch.argsort(batch["attention_mask"].sum(-1), descending=True)[rank::2].sort().values)
    n_local = len(micro.by_budget(*micro.row_lengths(mine["attention_mask"], R), 22, packed=False))
    stats = worker.update_actor(mine)
    sd = worker.actor.full_state_dict()
    if rank == 0:
        torch.save({"sd": sd, "stats": stats}, f"{out}/rank0.pt")
    torch.save({"n_local": n_local}, f"{out}/n{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch + transformers (~30 s on 2 idle cores)
def test_two_ranks_with_unequal_forward_counts_give_the_same_step(stepped, tmp_path):
    from verlcli.distributed.worker import free_port

    cfg = stepped_cfg("tight")
    torch.multiprocessing.spawn(_two_ranks, args=(free_port(), str(tmp_path), cfg), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    counts = [torch.load(tmp_path / f"n{r}.pt", weights_only=True)["n_local"] for r in range(2)]
    assert counts[0] != counts[1]  # the ranks really needed different numbers of forwards
    want = stepped["stats"]["sequences"]
    assert got["stats"]["actor/grad_norm"] == pytest.approx(want["actor/grad_norm"], rel=1e-5)
    for k, v in stepped["sd"]["sequences"].items():
        torch.testing.assert_close(got["sd"][k], v, atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")


def test_verl_dynamic_bsz_keys_translate():
    from verlcli.config.verl_compat import translate

    A, R = "actor_rollout_ref.actor.", "actor_rollout_ref.rollout."
    t = translate([A + "use_dynamic_bsz=True", A + "ppo_max_token_len_per_gpu=8192",
                   R + "log_prob_max_token_len_per_gpu=16384", "critic.forward_max_token_len_per_gpu=30000"])
    assert t.overrides == ["actor.micro_batch_tokens_per_device=8192",
                           "actor.forward_micro_batch_tokens_per_device=16384",
                           "critic.forward_micro_batch_tokens_per_device=30000"]  # the critic follows the actor's flag
    t = translate([A + "use_dynamic_bsz=True"])  # verl's defaults: 16384, log-prob passes the same
    assert sorted(t.overrides) == ["actor.forward_micro_batch_tokens_per_device=16384",
                                   "actor.micro_batch_tokens_per_device=16384"]
    t = translate([A + "ppo_max_token_len_per_gpu=8192"])  # flag off: verl ignores the budget too
    assert t.overrides == [] and t.ignored[0][0] == A + "ppo_max_token_len_per_gpu"


def test_update_batch_blocks_are_the_optimizer_steps():
    """The trainer marks the update batch with its mini-batches; each is balanced on its own and
    lands, per rank, where the worker's contiguous mini-batch cut expects it."""
    from verlcli.distributed.dispatch import balance_metrics, with_blocks

    lengths = [40, 1, 1, 1, 1, 1, 1, 40] * 2  # two mini-batches of 8 rows
    mask = torch.zeros(len(lengths), 41, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    batch = with_blocks(Batch({"attention_mask": mask, "row": torch.arange(16)}), 2)
    per_rank, _ = split_call(DispatchSpec("dp"), 2, (batch,), {}, "test")
    for args, _ in per_rank:
        rows = args[0]["row"].tolist()
        assert all(r < 8 for r in rows[:4]) and all(r >= 8 for r in rows[4:])  # mini-batch 0, then 1
        assert sum(lengths[r] for r in rows[:4]) == 43  # one long row per rank in each mini-batch
    m = balance_metrics(batch, 2)
    assert m["perf/dp_token_imbalance"] == 1.0 and m["perf/dp_token_imbalance_contiguous"] == 1.0
    m = balance_metrics(Batch({"attention_mask": mask[torch.tensor(lengths).argsort()]}), 2)
    assert m["perf/dp_token_imbalance"] == 1.0 and m["perf/dp_token_imbalance_contiguous"] > 1.8
