"""Side-by-side speed: TRL's GRPOTrainer vs `verl grpo` on the same work (issue 6).

Both sides train the built-in SmolLM2-135M-Instruct on the same arithmetic prompts with the same
reward, samples per prompt, prompts per step, max lengths, temperature, lr, steps and one
optimizer update per step. Each tool runs in its own subprocess (no shared memory or threads,
OMP_NUM_THREADS set for both), one after the other, while this process samples the memory of
the child's whole process tree.

    python bench/grpo_vs_trl.py --steps 12 --out bench/results/grpo_vs_trl.json
    python bench/grpo_vs_trl.py --only verl --steps 2 --max-completion 8      # smoke test

`--side trl` is the inner mode that runs TRL in the subprocess; it is not meant to be typed.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from verlcli.report import series, training_clock

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
N_PARAMS = 134_515_008  # SmolLM2-135M-Instruct (tied embeddings counted once)
VERL = ["verl"] if shutil.which("verl") else [sys.executable, "-m", "verlcli.cli"]


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="RL steps on each side (the first is warm-up).")
    p.add_argument("--only", choices=["trl", "verl"], help="Run one side only.")
    p.add_argument("--out", help="Write the result JSON here (and the table beside it as .md).")
    p.add_argument("--workdir", help="Data, run dirs and logs (default: a fresh temp dir).")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="Samples per prompt (TRL num_generations).")
    p.add_argument("--max-prompt", type=int, default=192, help="verl data.max_prompt_tokens (TRL 1.16 has no prompt limit).")
    p.add_argument("--max-completion", type=int, default=64, help="Max response tokens.")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--micro-batch", type=int, default=8, help="Sequences per forward/backward on both sides.")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both sides.")
    p.add_argument("--trl-generation", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers generate (default); vllm: TRL's colocated vLLM mode, with the "
                        "weight sync patched for vLLM 0.32 (see sync_weights_vllm_032).")
    p.add_argument("--equal-work", action="store_true",
                   help="Every completion is exactly --max-completion tokens on both sides (verl: "
                        "rollout.ignore_eos=true; TRL: generation_kwargs min_new_tokens (hf) / ignore_eos (vllm)).")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="Both sides: bf16 autocast + bf16 vLLM, or fp32 everywhere. auto: bf16 where the CPU "
                        "has bf16 instructions (verl's compute_dtype=auto rule), else fp32.")
    p.add_argument("--eval-every", type=int, default=0,
                   help="Held-out reward (greedy, --eval-prompts test prompts) before training and every K "
                        "steps on both sides, outside the step timers; 0 = off.")
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--verl-launcher", choices=["ray", "local"], default="ray",
                   help="verl's launcher: ray (the default a user gets: driver + Ray daemons + one worker "
                        "process) or local (one process, as TRL runs).")
    p.add_argument("--plot", help="PNG: held-out reward vs training seconds, both sides (needs --eval-every).")
    p.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shared helpers
def median_after_warmup(values: list[float]) -> float | None:
    """Median over steps 2..N: step 1 pays for compilation, allocator growth and cache fills."""
    rest = values[1:] if len(values) > 1 else values
    return statistics.median(rest) if rest else None


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x]),
    })
    return env


MATMUL_CODE = """
import json, sys, time, torch
torch.manual_seed(0)
out = {}
# The model's own shapes: 4096 tokens x hidden 576 -> MLP 1536 (SmolLM2-135M), forward-like.
for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    a = torch.randn(4096, 576, dtype=dtype); b = torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 3.0:
        a @ b; reps += 1
    out[name] = 2 * 4096 * 576 * 1536 * reps / (time.perf_counter() - start) / 1e9
print(json.dumps(out))
"""


def matmul_rate(threads: int) -> dict:
    """This CPU's matmul rate (GFLOP/s) in fp32 and bf16 with the bench's thread count, in a
    fresh process (so OMP_NUM_THREADS applies), measured in the same run as both sides."""
    out = subprocess.run([sys.executable, "-c", MATMUL_CODE], env=child_env(threads), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def update_gflops(r: dict) -> float | None:
    """The actor update's rate: 6 * N * trained tokens / update seconds (forward + backward),
    trained tokens = sequences x (mean prompt tokens) + completion tokens, per step (median)."""
    toks = median_after_warmup(r["completion_tokens"])
    seqs = median_after_warmup(r.get("sequences_per_step") or [])
    if r["tool"] == "verl":
        update = (r.get("phase_median_s") or {}).get("update_actor_s")
    else:  # TRL: everything outside generation is the update (its reward and logging are tiny)
        update = median_after_warmup([s - g for s, g in zip(r["step_s"], r["gen_s"])])
    if not (toks and seqs and update and r.get("prompt_tokens_mean")):
        return None
    return 6 * N_PARAMS * (seqs * r["prompt_tokens_mean"] + toks) / update / 1e9


def prepare_data(workdir: Path) -> Path:
    out = workdir / "data"
    if not (out / "train.parquet").exists():
        subprocess.run([*VERL, "prepare-data", "arithmetic", "--max-operand", "20", "--operators", "+*",
                        "--train-size", "700", "--test-size", "100", "--seed", "0", "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


class TreeMemory:
    """Samples a process and all its descendants: peak of the summed RSS (every 0.5 s) and of the
    summed PSS (every 5 s; PSS splits shared pages such as torch's libraries between processes,
    so it does not count them once per Ray process). Also keeps each process's own peak RSS and
    the wall time at which each new line of `watch_file` appeared."""

    def __init__(self, pid: int, watch_file: Path | None = None):
        import psutil

        self.root = psutil.Process(pid)
        self.watch_file = watch_file
        self.peak_rss = self.peak_pss = 0
        self.per_pid: dict[int, tuple[int, str]] = {}
        self.line_times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _procs(self):
        try:
            return [self.root] + self.root.children(recursive=True)
        except Exception:
            return []

    def _loop(self):
        tick = 0
        while not self._stop.is_set():
            procs = self._procs()
            total = 0
            for q in procs:
                try:
                    rss = q.memory_info().rss
                except Exception:
                    continue
                total += rss
                if rss > self.per_pid.get(q.pid, (0, ""))[0]:
                    self.per_pid[q.pid] = (rss, _name(q))  # Ray renames a worker once it hosts an actor
            self.peak_rss = max(self.peak_rss, total)
            if tick % 10 == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss(q.pid) for q in procs))
            self._watch()
            tick += 1
            self._stop.wait(0.5)

    def _watch(self):
        if self.watch_file is None or not self.watch_file.exists():
            return
        with open(self.watch_file) as f:
            n = sum(1 for _ in f)
        now = time.perf_counter()
        self.line_times.extend([now] * (n - len(self.line_times)))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        top = sorted(self.per_pid.values(), reverse=True)[:4]
        return {"peak_tree_rss_gb": self.peak_rss / 2**30, "peak_tree_pss_gb": self.peak_pss / 2**30,
                "root_peak_rss_gb": self.per_pid.get(self.root.pid, (0, ""))[0] / 2**30,
                "largest_processes": [{"peak_rss_gb": r / 2**30, "name": n} for r, n in top]}


def _name(q) -> str:
    try:
        cmd = q.cmdline()
        return " ".join(cmd[:3])[:120] if cmd else q.name()
    except Exception:
        return "?"


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except Exception:
        return 0


def run_monitored(cmd: list[str], env: dict, log: Path, watch_file: Path | None = None) -> tuple[int, dict, float]:
    """Run `cmd` with stdout+stderr to `log`, sampling its process tree's memory."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        mon = TreeMemory(proc.pid, watch_file)
        rc = proc.wait()
    mem = mon.stop()
    mem["line_times"] = mon.line_times
    return rc, mem, time.perf_counter() - t0


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ----------------------------------------------------------------------------- verl side
def verl_overrides(a, data: Path, run_dir: Path) -> list[str]:
    return [
        f"data.train_files=[{data / 'train.parquet'}]", f"data.val_files=[{data / 'test.parquet'}]",
        f"data.max_prompt_tokens={a.max_prompt}", f"data.max_response_tokens={a.max_completion}",
        f"data.train_prompts_per_step={a.prompts_per_step}",
        f"rollout.n={a.n}", f"rollout.temperature={a.temperature}",
        f"actor.mini_batch_prompts={a.prompts_per_step}", "actor.epochs=1",
        f"actor.micro_batch_sequences_per_device={a.micro_batch}",
        f"actor.optim.lr={a.lr}", "actor.optim.schedule=constant", "actor.optim.warmup_steps=0",
        "actor.use_kl_loss=false", "algorithm.use_kl_in_reward=false",
        f"trainer.total_steps={a.steps}", "trainer.val_every=0", "trainer.val_before_train=false",
        "trainer.save_every=0", f"trainer.run_dir={run_dir}", "trainer.resume=never",
        f"trainer.seed={a.seed}", "logging.progress_bar=false",
        f"resources.compute_dtype={'bfloat16' if a.precision == 'bf16' else 'float32'}",
        f"rollout.ignore_eos={str(a.equal_work).lower()}", f"launcher={a.verl_launcher}",
    ] + ([f"trainer.val_every={a.eval_every}", "trainer.val_before_train=true",
          f"data.val_prompts={a.eval_prompts}"] if a.eval_every else [])


def run_verl(a, data: Path, work: Path) -> dict:
    run_dir = work / "verl_run"
    cmd = [*VERL, "grpo", "--preset", "smollm2-135m-cpu", *verl_overrides(a, data, run_dir)]
    print("verl: " + " ".join(cmd), flush=True)
    metrics_file = run_dir / "metrics.jsonl"
    rc, mem, wall = run_monitored(cmd, child_env(a.threads), work / "verl.log", metrics_file)
    if rc != 0:
        raise SystemExit(f"verl grpo failed (exit {rc}); last lines of {work / 'verl.log'}:\n{tail(work / 'verl.log')}")
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "timing/step_s" in r]
    # The final checkpoint cannot be switched off: it is not part of a training step's work.
    step_s = [r["timing/step_s"] - r.get("timing/checkpoint_s", 0.0) - r.get("timing/validate_s", 0.0) for r in steps]
    gen_s = [r.get("timing/gen_s", 0.0) for r in steps]
    tokens = [r["perf/gen_tokens_per_s"] * r["timing/gen_s"] for r in steps]  # response tokens per step
    phases = sorted({k for r in steps for k in r if k.startswith("timing/") and k not in ("timing/step_s", "timing/checkpoint_s")})
    worker_rss = max((r.get("mem/peak_rss_gb", 0.0) for r in steps), default=0.0)
    # Wall clock between consecutive metrics lines: a cross-check that also counts what the
    # phase timers leave out (prompt tokenization, logging). The last interval holds the checkpoint.
    line_times = mem.pop("line_times")
    t = line_times[-len(steps):] if len(line_times) >= len(steps) else []
    wall_step = [t[i] - t[i - 1] for i in range(1, len(t))]
    if wall_step:
        wall_step[-1] -= steps[-1].get("timing/checkpoint_s", 0.0)
        wall_step = [w - s.get("timing/validate_s", 0.0) for w, s in zip(wall_step, steps[1:])]
    # Held-out reward against training seconds (validation and checkpoint time left out).
    clock = training_clock(rows)
    steps_val, rewards = series(rows, "val/score/mean")
    evals = [{"step": k, "train_s": clock[k], "reward": v} for k, v in zip(steps_val, rewards) if k in clock]
    return {
        "tool": "verl", "command": " ".join(cmd), "total_wall_s": wall, "step_s": step_s, "gen_s": gen_s,
        "completion_tokens": tokens, "wall_step_s_from_2nd": wall_step, "evals": evals,
        "phase_median_s": {p.removeprefix("timing/"): median_after_warmup([r.get(p, 0.0) for r in steps]) for p in phases},
        "prompt_tokens_mean": statistics.mean(r.get("prompt/length_mean", 0.0) for r in steps),
        "sequences_per_step": [a.prompts_per_step * a.n] * len(steps),
        "score_mean": [r.get("score/mean") for r in steps],
        "memory": {**mem, "worker_peak_rss_gb": worker_rss,
                   # what verl itself reports (rank-0 worker) plus the driver, as sampled here
                   "worker_plus_driver_rss_gb": worker_rss + mem["root_peak_rss_gb"]},
    }


# ----------------------------------------------------------------------------- TRL side (outer)
def run_trl(a, data: Path, work: Path) -> dict:
    result = work / "trl_result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "trl", "--data", str(data),
           "--result", str(result), "--workdir", str(work), "--steps", str(a.steps),
           "--prompts-per-step", str(a.prompts_per_step), "--n", str(a.n),
           "--max-completion", str(a.max_completion), "--temperature", str(a.temperature), "--lr", str(a.lr),
           "--micro-batch", str(a.micro_batch), "--seed", str(a.seed), "--trl-generation", a.trl_generation,
           "--max-prompt", str(a.max_prompt), "--precision", a.precision, "--eval-every", str(a.eval_every),
           "--eval-prompts", str(a.eval_prompts)] + (["--equal-work"] if a.equal_work else [])
    print("trl:  " + " ".join(cmd), flush=True)
    rc, mem, wall = run_monitored(cmd, child_env(a.threads), work / "trl.log")
    mem.pop("line_times")
    if rc != 0 or not result.exists():
        raise SystemExit(f"TRL side failed (exit {rc}); last lines of {work / 'trl.log'}:\n{tail(work / 'trl.log')}")
    out = json.loads(result.read_text())
    out["memory"] = {**mem, "self_peak_rss_gb": out.pop("self_peak_rss_gb")}
    out["total_wall_s"] = wall
    return out


# ----------------------------------------------------------------------------- TRL side (inner)
def arithmetic_reward(prompts, completions, data_source, reward_model, **kwargs) -> list[float]:
    """verl's arithmetic scorer as a TRL reward function. TRL passes every extra dataset column
    as a keyword list, one entry per completion (already repeated num_generations times)."""
    from verlcli.rewards.registry import get_scorer

    out = []
    for completion, ds, rm in zip(completions, data_source, reward_model):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        r = get_scorer(ds)(ds, text, rm["ground_truth"], None)
        out.append(float(r["score"] if isinstance(r, dict) else r))
    return out


def trl_config(a, out_dir: Path):
    from trl import GRPOConfig

    seqs = a.prompts_per_step * a.n  # completions per optimizer step
    if seqs % a.micro_batch:
        raise SystemExit(f"--micro-batch {a.micro_batch} must divide prompts-per-step × n = {seqs}")
    # TRL counts completions, not prompts. per_device_train_batch_size × gradient_accumulation_steps
    # = one optimizer update; steps_per_generation defaults to gradient_accumulation_steps, so one
    # generation batch of `seqs` completions (= prompts_per_step unique prompts × n) per update.
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=a.steps, seed=a.seed, use_cpu=True, bf16=a.precision == "bf16",
        per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=seqs // a.micro_batch,
        num_generations=a.n, num_iterations=1, max_completion_length=a.max_completion,
        temperature=a.temperature, top_p=1.0, top_k=0,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.0,
        loss_type="dapo", scale_rewards="group",  # token-mean over the update; group std (verl's grpo)
        gradient_checkpointing=False,  # TRL's default is on; verl's preset has it off
        use_vllm=a.trl_generation == "vllm", vllm_mode="colocate",
        vllm_max_model_length=a.max_prompt + a.max_completion,
        # On-policy (one update per generation), like verl: no extra old-log-prob forward pass
        # to correct for vLLM-vs-trainer drift (verl logs the gap instead of correcting it).
        vllm_importance_sampling_correction=False,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
        generation_kwargs=trl_equal_work_kwargs(a),
    )


def trl_equal_work_kwargs(a) -> dict | None:
    """TRL's way to make every completion --max-completion tokens long. vLLM: `ignore_eos`, as
    verl (EOS is sampled but does not stop). transformers: TRL cuts each completion after its
    first EOS whatever generate did, so EOS must not be sampled: `min_new_tokens` masks it."""
    if not a.equal_work:
        return None
    return {"ignore_eos": True} if a.trl_generation == "vllm" else {"min_new_tokens": a.max_completion}


def patch_trl_vllm_for_cpu(dtype: str):
    """TRL builds `LLM(...)` itself without `enforce_eager` or `dtype`; on CPU vLLM wants eager
    mode, and verl's rollout runs in the training precision, so give TRL's engine the same."""
    import trl.generation.vllm_generation as vg

    real = vg.LLM

    def llm(*args, **kw):
        kw.setdefault("enforce_eager", True)
        kw.setdefault("dtype", dtype)
        kw.pop("gpu_memory_utilization", None)
        return real(*args, **kw)

    vg.LLM = llm


def sync_weights_vllm_032(llm, model) -> None:
    """TRL 1.16's colocated sync calls `model.load_weights` per parameter, which vLLM 0.32 rejects
    ("'Parameter' object has no attribute 'weight_loader'"; TRL supports vLLM <= 0.31). This is
    the in-memory sync verl uses: the full state dict (lm_head.weight included: tied embeddings)
    through `reload_weights`, then a prefix-cache reset."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
    llm.reset_prefix_cache()


def held_out_eval(a, steps: list[dict], evals: list[dict]):
    """TRL side of the held-out curve: greedy completions for the first --eval-prompts test
    prompts (verl's data.val_prompts takes the first N too), scored by the same scorer, before
    training and every --eval-every steps. transformers generate on TRL's model in both TRL
    modes (its vLLM engine holds the weights of the previous step). Not counted in step times."""
    from transformers import TrainerCallback

    class HeldOutEval(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kw):
            self._run(0, model, processing_class)

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kw):
            if state.global_step % a.eval_every == 0:
                self._run(state.global_step, model, processing_class)

        def _run(self, step, model, tok):
            import pandas as pd
            import torch

            t0 = time.perf_counter()
            rows = pd.read_parquet(Path(a.data) / "test.parquet").head(a.eval_prompts)
            texts = [tok.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
                     for p in rows["prompt"]]
            side, tok.padding_side = tok.padding_side, "left"
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            tok.padding_side = side
            was_training = model.training
            model.eval()
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=a.max_completion,
                                     pad_token_id=tok.pad_token_id)
            model.train(was_training)
            done = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            scores = arithmetic_reward(None, done, list(rows["data_source"]), list(rows["reward_model"]))
            train_s = sum(x["step_s"] for x in steps[:step])
            evals.append({"step": step, "train_s": train_s, "reward": statistics.mean(scores),
                          "eval_s": time.perf_counter() - t0})
            print(f"TRL held-out reward at step {step}: {evals[-1]['reward']:.3f}", flush=True)

    return HeldOutEval()


def trl_inner(a) -> None:
    import resource

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from verlcli.models.resolve import resolve_model

    torch.manual_seed(a.seed)
    if a.trl_generation == "vllm":
        patch_trl_vllm_for_cpu("bfloat16" if a.precision == "bf16" else "float32")
    dataset = Dataset.from_parquet(str(Path(a.data) / "train.parquet"))
    gen_log: list[dict] = []
    steps: list[dict] = []

    class TimedGRPOTrainer(GRPOTrainer):
        """Times generation only (what `_generate_single_turn` does, minus vLLM's weight sync)."""

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            sync_before = self._bench_sync_s
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            dt = time.perf_counter() - t0 - (self._bench_sync_s - sync_before)
            gen_log.append({"step": self.state.global_step + 1, "gen_s": dt, "sequences": len(completion_ids),
                            "unique_prompts": len({tuple(p) for p in prompt_ids}),
                            "completion_tokens": sum(len(c) for c in completion_ids),
                            "prompt_tokens_mean": statistics.mean(len(p) for p in prompt_ids)})
            return completion_ids, logprobs

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            steps.append({"step": state.global_step, "step_s": now - self.t0, "end": now})

    evals: list[dict] = []
    trainer = TimedGRPOTrainer(
        model=str(resolve_model(MODEL)), reward_funcs=arithmetic_reward,
        args=trl_config(a, Path(a.workdir) / "trl_out"), train_dataset=dataset,
        # After StepTimer: evaluation happens between on_step_end and the next on_step_begin.
        callbacks=[StepTimer(), held_out_eval(a, steps, evals)] if a.eval_every else [StepTimer()],
    )
    trainer._bench_sync_s = 0.0
    if getattr(trainer, "vllm_generation", None) is not None:
        vgen = trainer.vllm_generation

        def timed_sync():
            t0 = time.perf_counter()
            sync_weights_vllm_032(vgen.llm, trainer.model)
            trainer._bench_sync_s += time.perf_counter() - t0

        vgen.sync_weights = timed_sync
    print(f"TRL: model dtype {next(trainer.model.parameters()).dtype}, bf16 autocast {trainer.args.bf16}, "
          f"generation {a.trl_generation}, threads {torch.get_num_threads()}", flush=True)
    trainer.train()
    write_trl_result(a, steps, gen_log, trainer, evals)
    print(f"TRL peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB", flush=True)


def write_trl_result(a, steps: list[dict], gen_log: list[dict], trainer, evals: list[dict]) -> None:
    import resource

    by_step = {}
    for g in gen_log:
        agg = by_step.setdefault(g["step"], {"gen_s": 0.0, "completion_tokens": 0, "sequences": 0, "unique_prompts": 0})
        for k in agg:
            agg[k] += g[k]
    gens = [by_step.get(s["step"], {}) for s in steps]
    scores = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    out = {
        "tool": "trl", "trl_generation": a.trl_generation, "evals": evals,
        "step_s": [s["step_s"] for s in steps],
        # on_step_end to on_step_end: also counts the data loader and logging between steps.
        "wall_step_s_from_2nd": [steps[i]["end"] - steps[i - 1]["end"] for i in range(1, len(steps))],
        "gen_s": [g.get("gen_s", 0.0) for g in gens],
        "completion_tokens": [g.get("completion_tokens", 0) for g in gens],
        "sequences_per_step": [g.get("sequences", 0) for g in gens],
        "unique_prompts_per_step": [g.get("unique_prompts", 0) for g in gens],
        "optimizer_steps": trainer.state.global_step,
        "prompt_tokens_mean": statistics.mean(g["prompt_tokens_mean"] for g in gen_log) if gen_log else None,
        "score_mean": scores,
        "self_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "config": {k: getattr(trainer.args, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
            "generation_batch_size", "num_generations", "num_iterations", "max_completion_length", "temperature",
            "learning_rate", "lr_scheduler_type", "weight_decay", "beta", "loss_type", "bf16",
            "gradient_checkpointing", "use_vllm")},
    }
    Path(a.result).write_text(json.dumps(out, indent=2))


# ----------------------------------------------------------------------------- summary
def summarize(r: dict) -> dict:
    step = median_after_warmup(r["step_s"])
    gen = median_after_warmup(r["gen_s"])
    toks = median_after_warmup(r["completion_tokens"])
    tps = [t / g for t, g in zip(r["completion_tokens"], r["gen_s"]) if g > 0]
    mem = r["memory"]
    return {
        "median_step_s": step,
        "median_wall_step_s": statistics.median(r["wall_step_s_from_2nd"]) if r.get("wall_step_s_from_2nd") else None,
        "median_gen_s": gen,
        "median_completion_tokens_per_step": toks,
        "gen_tokens_per_s": median_after_warmup(tps) if tps else None,
        "completion_tokens_per_step_s": (toks / step) if step else None,
        "update_gflops": update_gflops(r),
        "peak_tree_rss_gb": mem["peak_tree_rss_gb"],
        "peak_tree_pss_gb": mem["peak_tree_pss_gb"],
        "steps_measured": max(len(r["step_s"]) - 1, 1),
    }


def table(summary: dict) -> str:
    sides = [s for s in ("trl", "verl") if s in summary]
    rows = [
        ("median s/step (steps 2..N)", "median_step_s", "{:.2f}"),
        ("median wall s/step (end to end)", "median_wall_step_s", "{:.2f}"),
        ("median generation s/step", "median_gen_s", "{:.2f}"),
        ("completion tokens/step (median)", "median_completion_tokens_per_step", "{:.0f}"),
        ("generated tokens/s (tokens / gen s)", "gen_tokens_per_s", "{:.0f}"),
        ("completion tokens / step s", "completion_tokens_per_step_s", "{:.1f}"),
        ("update GFLOP/s (6·N·trained tokens / update s)", "update_gflops", "{:.1f}"),
        ("peak RSS, process tree sum (GB)", "peak_tree_rss_gb", "{:.2f}"),
        ("peak PSS, process tree sum (GB)", "peak_tree_pss_gb", "{:.2f}"),
    ]
    lines = ["| | " + " | ".join(sides) + " |", "|---" * (len(sides) + 1) + "|"]
    for label, key, fmt in rows:
        vals = [fmt.format(summary[s][key]) if summary[s].get(key) is not None else "–" for s in sides]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    if "ratio_trl_over_verl" in summary:
        lines.append(f"\n**TRL / verl median s/step: {summary['ratio_trl_over_verl']:.2f}×**")
    rate = summary.get("matmul_gflops")
    if rate:
        lines.append(f"\nThis CPU's matmul rate in the same run (4096×576 @ 576×1536): fp32 {rate['float32']:.1f}, "
                     f"bf16 {rate['bfloat16']:.1f} GFLOP/s.")
        for s in sides:
            if summary[s].get("update_gflops"):
                lines.append(f"{s} update: {summary[s]['update_gflops']:.1f} GFLOP/s = "
                             f"{100 * summary[s]['update_gflops'] / rate['float32']:.0f}% of fp32 matmul, "
                             f"{100 * summary[s]['update_gflops'] / rate['bfloat16']:.0f}% of bf16 matmul.")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.side == "trl":
        return trl_inner(a)
    if a.precision == "auto":  # verl's own rule, so both sides get what `compute_dtype=auto` picks
        from verlcli.engine.fsdp import resolve_compute_dtype
        import torch

        a.precision = "bf16" if resolve_compute_dtype("cpu", "auto") == torch.bfloat16 else "fp32"
        print(f"precision: {a.precision} on both sides (compute_dtype=auto on this CPU)", flush=True)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="grpo_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    print(f"work dir {work}", flush=True)
    rate = matmul_rate(a.threads)
    print(f"matmul GFLOP/s with {a.threads} threads: fp32 {rate['float32']:.1f}, bf16 {rate['bfloat16']:.1f}", flush=True)
    results = {}
    for side in ("trl", "verl"):  # one after the other: they never share the cores
        if a.only in (None, side):
            results[side] = run_trl(a, data, work) if side == "trl" else run_verl(a, data, work)
            print(f"{side}: done in {results[side]['total_wall_s']:.0f} s", flush=True)
    summary = {side: summarize(r) for side, r in results.items()}
    summary["matmul_gflops"] = rate
    if "trl" in summary and "verl" in summary:
        summary["ratio_trl_over_verl"] = summary["trl"]["median_step_s"] / summary["verl"]["median_step_s"]
    settings = {k: getattr(a, k) for k in ("steps", "prompts_per_step", "n", "max_prompt", "max_completion",
                                           "temperature", "lr", "micro_batch", "seed", "threads", "trl_generation",
                                           "equal_work", "precision", "eval_every", "eval_prompts", "verl_launcher")}
    report = {"settings": settings, "summary": summary, "raw": results, "work_dir": str(work),
              "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}}
    md = table(summary)
    print("\n" + md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(md + "\n")
        print(f"\nwrote {out} and {out.with_suffix('.md')}")
    if a.plot and a.eval_every:
        plot_curves(results, a, Path(a.plot))


def plot_curves(results: dict, a, png: Path) -> None:
    """Held-out reward (greedy, same prompts and scorer) against training seconds, both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for side, r in results.items():
        ev = r.get("evals") or []
        label = f"TRL ({a.trl_generation} generation)" if side == "trl" else "verl grpo"
        ax.plot([e["train_s"] for e in ev], [e["reward"] for e in ev], marker="o", label=label)
    work = "equal work (every completion max length)" if a.equal_work else "sampled lengths"
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel=f"held-out reward ({a.eval_prompts} prompts, greedy)",
           title=f"GRPO, SmolLM2-135M, {a.precision}, {a.steps} steps, {work}")
    ax.grid(alpha=0.3)
    ax.legend()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
