"""Preflight of the rewards: every data_source in the data has a scorer, and a user function
(reward.fn) exists, accepts (data_source, response, ground_truth, extra_info) and returns a
number or a dict with a numeric 'score' on a sample row of each data source.

The probe runs the user's function in this process under an alarm of reward.timeout_s
(the reward pool imports it here too, to fail fast). A probe that raises is only a warning
(the empty response it gets may be unusual input); a non-number is an error, because it
would score every response of the run 0.
"""

from __future__ import annotations

import contextlib
import inspect
import signal
import threading

from verlcli.errors import UserError


def check_rewards(cfg, out) -> None:
    from verlcli.rewards.registry import REWARDS

    items = list(out.train or []) + list(out.val or [])
    sources = sorted({it["data_source"] for it in items})
    if cfg.reward.fn:
        _check_user_fn(cfg.reward.fn, cfg.reward.timeout_s, items, out)
        return
    missing = [s for s in sources if s not in REWARDS]
    if missing and cfg.reward.model.path:
        out.warnings.append(f"no rule reward for data_source {', '.join(map(repr, missing))}: "
                            "only the reward model scores them")
    elif missing:
        rows = sum(1 for it in items if it["data_source"] in missing)
        raise UserError(
            f"no reward for data_source {', '.join(map(repr, missing))} ({rows} rows); built in: {', '.join(sorted(REWARDS))}",
            fix="set data_source to one of those in the parquet, or pass reward.fn=path/to/file.py:function",
        )
    elif sources:
        out.lines.append(f"rewards: built-in scorer for {', '.join(sources)}")


def _check_user_fn(spec: str, timeout_s: float, items: list[dict], out) -> None:
    from verlcli.rewards.pool import normalize
    from verlcli.rewards.user import load_user_fn

    fn = load_user_fn(spec)  # file and function exist, the module imports
    try:
        inspect.signature(fn).bind("data_source", "response", "ground_truth", {})
    except TypeError:
        raise UserError(
            f"reward function {spec} has the signature {_sig(fn)}, but it is called as "
            "fn(data_source, response, ground_truth, extra_info)",
            fix="give it those four parameters (verl's (data_source, solution_str, ground_truth, extra_info) works)",
        ) from None
    except ValueError:  # builtins without a signature: nothing to check
        pass
    first: dict[str, dict] = {}
    for it in items:
        first.setdefault(it["data_source"], it)
    for ds, it in first.items():
        try:
            with _alarm(timeout_s):
                result = fn(ds, "", it.get("ground_truth"), it.get("extra_info") or {})
        except _Timeout:
            out.warnings.append(f"reward function {spec} took over reward.timeout_s={timeout_s:g} s on a sample row "
                                f"of data_source {ds!r} (such calls score 0)")
            continue
        except (Exception, SystemExit) as e:  # noqa: BLE001 - user code; the run counts these too
            out.warnings.append(f"reward function {spec} raised on a sample row of data_source {ds!r} with an "
                                f"empty response: {type(e).__name__}: {e}"[:300])
            continue
        try:
            normalize(result, ds)
        except (TypeError, ValueError) as e:
            raise UserError(f"reward function {spec} {e} (data_source {ds!r}, empty response)",
                            fix="return a float, or a dict with a float 'score' (and any extra fields)") from None
    out.lines.append(f"rewards: {spec} (signature and return type checked on {len(first)} data source(s))")


def _sig(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(?)"


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float):
    """SIGALRM after `seconds` (main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
