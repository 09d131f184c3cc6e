"""Scoring responses in worker processes so that no reward function can break a run.

`RewardScorer.score(items)` never raises and always returns one result per item, in order:
`{"score": float, "error": str | None, **extra fields the scorer returned}`. A scorer that
raises, returns NaN/inf or a non-number, or an unknown data_source scores 0.0 with `error` set
(naming the data source and what went wrong). A scorer that hangs is killed after `timeout_s`:
only its worker process is killed and replaced; the other workers keep going.

Design: a few `spawn`ed processes, each with a duplex pipe. The driver sends a worker a chunk of
items; the worker streams back one result per item. Each received result restarts that worker's
per-item clock, so the timeout applies to every single item, however large the chunk. A killed
or crashed worker's current item gets the error; the rest of its chunk is re-queued.
Workers announce "ready" after importing the user function (and math-verify), so start-up time
never counts against an item's timeout.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import numbers
import shutil
import signal
import tempfile
import time
from collections import deque
from multiprocessing.connection import wait

from verlcli.errors import UserError
from verlcli.rewards.registry import canonical_name, get_scorer
from verlcli.rewards.user import load_user_fn

_STARTUP_TIMEOUT_S = 120.0
_MAX_START_FAILURES = 3
_FIELDS = ("data_source", "response", "ground_truth", "extra_info")


def _failure(data_source, why: str) -> dict:
    return {"score": 0.0, "error": f"reward for data_source {data_source!r}: {why}"}


def _as_float(x, data_source) -> float:
    if hasattr(x, "item") and not isinstance(x, (int, float)):
        x = x.item()  # numpy / torch scalars
    if isinstance(x, str) or not isinstance(x, numbers.Real):
        raise TypeError(f"returned {type(x).__name__} {x!r:.60}, expected a number or a dict with 'score'")
    f = float(x)
    if not math.isfinite(f):
        raise ValueError(f"returned a non-finite score ({f})")
    return f


def _plain(v):
    """Extra fields travel between processes and into metrics: keep them plain."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item"):
        try:
            return v.item()
        except (ValueError, TypeError):
            pass
    return str(v)[:200]


def normalize(out, data_source) -> dict:
    """A scorer's float or dict -> {'score': float, 'error': None, **extras}; raises on bad values."""
    if isinstance(out, dict):
        if "score" not in out:
            raise TypeError(f"returned a dict without 'score' (keys: {sorted(out)})")
        extras = {str(k): _plain(v) for k, v in out.items() if k not in ("score", "error")}
        return {**extras, "score": _as_float(out["score"], data_source), "error": None}
    return {"score": _as_float(out, data_source), "error": None}


def score_item(item: dict, user_fn=None, scorer_kwargs: dict | None = None) -> dict:
    """Score one item in this process. Never raises (except KeyboardInterrupt)."""
    ds = item.get("data_source")
    try:
        args = (ds, item.get("response"), item.get("ground_truth"), item.get("extra_info"))
        if user_fn is not None:
            out = user_fn(*args)
        else:
            out = get_scorer(ds)(*args, **(scorer_kwargs or {}).get(canonical_name(ds), {}))
        return normalize(out, ds)
    except UserError as e:
        return {"score": 0.0, "error": f"{e.message} (fix: {e.fix})" if e.fix else e.message}
    except (Exception, SystemExit) as e:  # a user function calling sys.exit() must not end the run
        return _failure(ds, f"{type(e).__name__}: {e}")


def _worker_main(conn, fn_spec, scorer_kwargs, sandbox=None) -> None:
    """Entry point of a worker process (module level: picklable under spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the driver, which kills us
    user_fn, load_error, load_fix = None, None, None
    try:
        if sandbox:  # before the user's file runs a single line
            from verlcli.rewards import sandbox as sb

            sb.enter(sandbox["workdir"], sandbox.get("run_dir"), sandbox.get("memory_gb", 0))
        if fn_spec:
            user_fn = load_user_fn(fn_spec)
        else:
            import math_verify  # noqa: F401  (slow first import: pay it before the clock starts)
    except UserError as e:
        load_error, load_fix = f"loading reward function failed: {e.message}", e.fix
    except BaseException as e:  # noqa: BLE001
        load_error = f"loading reward function failed: {type(e).__name__}: {e}"
    conn.send(("ready", load_error, load_fix))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for item in chunk:
            if load_error:
                conn.send(_failure(item.get("data_source"), load_error))
                continue
            if sandbox:
                sb.arm_cpu_limit(sandbox.get("cpu_s", 0))
            conn.send(score_item(item, user_fn, scorer_kwargs))


def _exit_why(code) -> str:
    if code == -signal.SIGXCPU:
        return "SIGXCPU: it used more CPU time than reward.timeout_s allows per response"
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class _Worker:
    def __init__(self, ctx, fn_spec, scorer_kwargs, sandbox=None):
        self.workdir = None
        if sandbox:  # a private, temporary working directory per worker process
            self.workdir = tempfile.mkdtemp(prefix="verl-reward-")
            sandbox = {**sandbox, "workdir": self.workdir}
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child, fn_spec, scorer_kwargs, sandbox), daemon=True,
            name="verl-reward-worker"
        )
        self.proc.start()
        child.close()
        self.state = "starting"  # starting -> idle <-> busy
        self.since = time.monotonic()  # start-up began / current item began
        self.assigned: deque[int] = deque()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RewardScorer:
    """Score responses with the data_source registry or a user function, under a timeout.

    fn_spec: 'path.py:function' — when given it scores every item, whatever its data_source
      (verl's custom_reward_function behaves the same). Checked here: UserError if missing.
    timeout_s: per item; a hung scorer is killed and the item scores 0.0 with an error.
    num_workers: worker processes; 0 scores in this process (no timeout — for debugging).
    scorer_kwargs: options for built-in scorers keyed by canonical name, e.g.
      {"gsm8k": {"method": "flexible", "format_score": 0.1}}.
    """

    def __init__(self, fn_spec: str | None = None, timeout_s: float = 10.0, num_workers: int = 2,
                 scorer_kwargs: dict | None = None, sandbox: dict | None = None):
        self.fn_spec = fn_spec or None
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers)
        self.scorer_kwargs = dict(scorer_kwargs or {})
        # sandbox (user functions in worker processes): {"run_dir", "memory_gb", "cpu_s"};
        # see rewards/sandbox.py. The user's file is then never imported in this process.
        self.sandbox = dict(sandbox) if sandbox and self.fn_spec and self.num_workers > 0 else None
        self.stats = {"timeouts": 0, "worker_restarts": 0}
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._inline_fn = None
        if self.sandbox:
            self._first_worker_loads()  # fail fast, from inside the sandbox
        elif fn_spec:
            self._inline_fn = load_user_fn(fn_spec)  # fail fast, in the driver

    # -- public ---------------------------------------------------------------------------
    def score(self, items: list[dict]) -> list[dict]:
        if self.num_workers <= 0:
            return [score_item(it, self._inline_fn, self.scorer_kwargs) for it in items]
        results: list[dict | None] = [None] * len(items)
        try:
            self._run(items, results)
        except Exception as e:  # noqa: BLE001 (a bug here must not end a training run either)
            self.close()
            for i, r in enumerate(results):
                if r is None:
                    results[i] = _failure(items[i].get("data_source"), f"reward pool failed: {type(e).__name__}: {e}")
        return results  # type: ignore[return-value]

    def _run(self, items: list[dict], results: list) -> None:
        pending = deque(range(len(items)))
        payload = [{k: it.get(k) for k in _FIELDS} for it in items]
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        while pending or any(w.assigned for w in self._workers):
            self._dispatch(pending, payload, results)
            wait([w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers], self._next_wait())
            for w in list(self._workers):
                self._drain(w, results, pending, items)
            self._enforce_deadlines(results, pending, items)
            if self._start_failures >= _MAX_START_FAILURES:
                for i in pending:
                    results[i] = _failure(items[i].get("data_source"), "reward worker processes could not start")
                pending.clear()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.proc.join(timeout=2)
            w.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    # -- internals ------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.fn_spec, self.scorer_kwargs, self.sandbox)

    def _first_worker_loads(self) -> None:
        """Start one worker and wait until it imported the user function: a missing file or
        name is a UserError now, not a zero reward for every response later."""
        w = self._spawn()
        msg = w.conn.recv() if w.conn.poll(_STARTUP_TIMEOUT_S) else None
        if msg is None or msg[1]:
            w.kill()
            if msg is None:
                raise UserError(f"the reward worker for {self.fn_spec} did not start within {_STARTUP_TIMEOUT_S:g} s",
                                fix="check that the reward file imports quickly (no work at import time)")
            if "MemoryError" in msg[1]:  # RLIMIT_AS counts virtual memory: CUDA libraries reserve a lot
                raise UserError(msg[1], fix="raise reward.memory_gb (an address-space limit), or 0 for none")
            raise UserError(msg[1], fix=msg[2] or f"run `python {self.fn_spec.rpartition(':')[0] or self.fn_spec}` to see the error")
        w.state = "idle"
        self._workers.append(w)

    def _dispatch(self, pending: deque, payload: list[dict], results: list) -> None:
        for w in self._workers:
            if w.state != "idle" or not pending:
                continue
            # Chunks amortize the pipe round trip; small enough to keep all workers busy.
            k = max(1, min(64, math.ceil(len(pending) / (2 * self.num_workers))))
            chunk = [pending.popleft() for _ in range(min(k, len(pending)))]
            try:
                w.conn.send([payload[i] for i in chunk])
            except OSError:  # the worker is gone: put the chunk back; _drain replaces the worker
                pending.extendleft(reversed(chunk))
                continue
            except Exception as e:  # noqa: BLE001 (e.g. an unpicklable extra_info; nothing was sent)
                for i in chunk:
                    results[i] = _failure(payload[i]["data_source"], f"cannot send to a reward worker: {e}")
                continue
            w.assigned = deque(chunk)
            w.state, w.since = "busy", time.monotonic()

    def _next_wait(self) -> float:
        now, deadlines = time.monotonic(), []
        for w in self._workers:
            if w.state == "busy":
                deadlines.append(w.since + self.timeout_s)
            elif w.state == "starting":
                deadlines.append(w.since + max(_STARTUP_TIMEOUT_S, self.timeout_s))
        return max(0.0, min(deadlines) - now) + 0.01 if deadlines else 0.05

    def _drain(self, w: _Worker, results, pending, items) -> None:
        dead = False
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if w.state == "starting":
                    w.state, self._start_failures = "idle", 0
                    continue
                results[w.assigned.popleft()] = msg
                w.since = time.monotonic()  # the next item starts now
                if not w.assigned:
                    w.state = "idle"
        except (EOFError, OSError):
            dead = True  # everything it sent has been read; the pipe is closed
        if dead or not w.proc.is_alive():
            w.proc.join(timeout=1)
            why = f"reward worker died ({_exit_why(w.proc.exitcode)}) while scoring this response"
            self._replace(w, results, pending, items, why)

    def _enforce_deadlines(self, results, pending, items) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.state == "busy" and now - w.since > self.timeout_s:
                self.stats["timeouts"] += 1
                self._replace(w, results, pending, items, f"timed out after {self.timeout_s:g}s (worker killed)")
            elif w.state == "starting" and now - w.since > max(_STARTUP_TIMEOUT_S, self.timeout_s):
                self._replace(w, results, pending, items, "reward worker did not start")

    def _replace(self, w: _Worker, results, pending, items, why: str) -> None:
        """Kill `w`; its current item fails with `why`, the rest of its chunk goes back in line."""
        if w.state == "starting":
            self._start_failures += 1
        if w.assigned:
            i = w.assigned.popleft()
            results[i] = _failure(items[i].get("data_source"), why)
            pending.extendleft(reversed(w.assigned))
        w.kill()
        self.stats["worker_restarts"] += 1
        self._workers[self._workers.index(w)] = self._spawn()
