"""WorkerError: a failed or hung worker call, described by its real cause.

Ray's own messages ("The actor died unexpectedly before finishing this task") hide what
happened: which role, which rank, which method, and whether the process ran out of memory.
`WorkerError` says all four and the fix, in a few lines the driver can print as-is.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

OOM_FIX = (
    "lower actor.micro_batch_sequences_per_device / critic.micro_batch_sequences_per_device, "
    "set actor.offload_params=true actor.offload_optimizer=true, or use fewer workers per node "
    "(resources.devices_per_node); `verl plan` shows the memory a config needs"
)


class WorkerError(RuntimeError):
    """A worker-group call failed on a rank, a worker process died, or the call hung."""

    def __init__(self, group: str, method: str, rank: int | None, cause: str, fix: str | None = None):
        self.group = group
        self.method = method
        self.rank = rank
        self.cause = cause
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"rank {self.rank}" if self.rank is not None else "all ranks"
        text = f"worker group '{self.group}', {where}, method '{self.method}': {self.cause}"
        return f"{text}\n  fix: {self.fix}" if self.fix else text


def last_lines(text: str, n: int = 12) -> str:
    """The last n meaningful lines: no colour codes, no `^^^^` marker lines, no Ray banner."""
    lines = []
    for ln in _ANSI.sub("", str(text)).strip().splitlines():
        bare = ln.strip()
        if not bare or set(bare) <= set("^~ ") or bare.startswith("ray::"):
            continue
        lines.append(ln)
    return "\n".join(lines[-n:])


def from_task_error(group: str, method: str, rank: int, err) -> WorkerError:
    """The worker's method raised: show the tail of the remote traceback (it ends in the message)."""
    tb = getattr(err, "traceback_str", None) or str(err)
    cause = getattr(err, "cause", None)
    head = f"{type(cause).__name__}: {cause}" if cause is not None else "the method raised"
    return WorkerError(group, method, rank, f"{head}\n  remote traceback (last lines):\n{_indent(last_lines(tb))}")


def from_actor_died(group: str, method: str, rank: int, err) -> WorkerError:
    """The worker process is gone. Say whether memory looks like the reason, and what to do."""
    text = str(err)
    low = text.lower()
    # The first two phrases are the raylet's memory-monitor kill note.
    if "low on memory" in low or "memory on the node" in low or type(err).__name__ == "OutOfMemoryError":
        verdict = "the worker process was killed by Ray's memory monitor (out of host memory)"
        fix = OOM_FIX
    elif "sigkill" in low or "oom" in low or "memory" in low:
        # Ray adds "may have been killed by SIGKILL by OOM killer" to every unexplained exit.
        verdict = ("the worker process died without a Python traceback; this usually means the "
                   "kernel OOM killer (check `dmesg | grep -i oom`) or a crash in native code")
        fix = OOM_FIX + "; if memory was fine, look for a segfault in the worker's log above"
    else:
        verdict = "the worker process died"
        fix = "see the worker's log above (Ray forwards it to the driver)"
    return WorkerError(group, method, rank, f"{verdict}\n  Ray says: {_death_detail(text)}", fix)


def oom_kill_count() -> int | None:
    """The kernel's count of OOM kills in this machine's (container's) memory cgroup."""
    for path, key in (("/sys/fs/cgroup/memory.events", "oom_kill"),
                      ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill")):
        try:
            for line in open(path):
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def kernel_oom_record(pid: int | None) -> str | None:
    """The kernel log's line about OOM-killing `pid`, when the log is readable here."""
    import subprocess

    if not pid:
        return None
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=3).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in reversed(out.splitlines()):
        if re.search(rf"[Kk]illed process {pid}\b", line):
            return line.strip()
    return None


def worker_died(group: str, method: str, rank: int, err, where: dict | None = None,
                log_tail: str | None = None, oom_before: int | None = None) -> WorkerError:
    """A dead worker, said in full: role, rank, node, pid, exit signal, the kernel's OOM
    record when there is one, and the last lines of the worker's own log."""
    base = from_actor_died(group, method, rank, err)
    where = where or {}
    text = _ANSI.sub("", str(err))
    sig = exit_signal(text, log_tail or "")
    oom = kernel_oom_record(where.get("pid"))
    now = oom_kill_count()
    oom_grew = oom_before is not None and now is not None and now > oom_before
    lines = [f"worker process died: role '{group}', rank {rank}, node {where.get('host', '?')} "
             f"({where.get('ip', '?')}), pid {where.get('pid', '?')}, exit: {sig}"]
    fix = base.fix
    if oom or oom_grew:
        lines.append("  the kernel OOM killer ended it (out of host memory)" + (f": {oom}" if oom else
                     f" (this machine's oom_kill count went {oom_before} → {now})"))
        fix = OOM_FIX
    else:
        lines.append("  " + base.cause.split("\n")[0])
        if "SIGKILL" in sig and "memory monitor" not in base.cause:
            fix = "if nobody killed it, memory is the usual cause: " + OOM_FIX
    if log_tail:
        lines.append("  last lines of its log:\n" + _indent(log_tail))
    return WorkerError(group, method, rank, "\n".join(lines), fix)


_SIGNALS = {"SIGKILL": 9, "SIGSEGV": 11, "SIGABRT": 6, "SIGBUS": 7, "SIGTERM": 15, "SIGILL": 4}


def exit_signal(text: str, log_tail: str = "") -> str:
    """How the process ended. Ray does not say (its raylet reaps the worker and logs no
    status), so: a crash report in the worker's own log (faulthandler is on in every
    worker), else an exit code/signal in Ray's note, else SIGKILL — the only way a Python
    process ends with neither a traceback nor a crash report (kill -9, the OOM killer)."""
    m = re.search(r"Fatal Python error: (Segmentation fault|Aborted|Bus error|Illegal instruction)", log_tail)
    if m:
        name = {"Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT", "Bus error": "SIGBUS",
                "Illegal instruction": "SIGILL"}[m.group(1)]
        return f"{name} (signal {_SIGNALS[name]}: {m.group(1).lower()}, see the log below)"
    m = re.search(r"(?:killed by|terminated by|received) (?:signal )?(SIG[A-Z]+)", text)
    if m and m.group(1) in _SIGNALS:
        return f"{m.group(1)} (signal {_SIGNALS[m.group(1)]})"
    m = re.search(r"exit(?:ed with)? code[: ]+(-?\d+)", text, flags=re.I)
    if m and "connection error code" not in m.group(0):
        code = int(m.group(1))
        for name, num in _SIGNALS.items():
            if code in (-num, 128 + num):
                return f"{name} (exit code {code})"
        return f"exit code {code}"
    return ("SIGKILL (signal 9: it ended with no Python traceback and no crash report — "
            "`kill -9` or the kernel OOM killer)")


def _death_detail(text: str) -> str:
    """Ray's death note without its boilerplate: pid, ip and the exit detail."""
    text = _ANSI.sub("", text)
    where = dict(re.findall(r"^\s*(pid|ip): (\S+)", text, flags=re.M))
    start = text.find("The actor is dead because")
    body = text[start:] if start >= 0 else last_lines(text, 3)
    body = " ".join(body.split("Some common causes")[0].split())
    place = f" (pid {where['pid']} on {where.get('ip', '?')})" if "pid" in where else ""
    return body[:600] + place


def hang_error(group: str, method: str, timeout_s: float, pending: list[int], done: list[int]) -> WorkerError:
    cause = (
        f"no answer within {timeout_s:g} s from ranks {pending} (ranks {done or 'none'} finished): "
        "possible collective hang — ranks that disagree on the number of collectives (e.g. "
        "different micro-batch counts), or a rank stuck after another rank failed"
    )
    fix = ("raise trainer.call_timeout_s (VERL_WORKER_TIMEOUT_S outside the trainer) if the step is "
           "just slow; otherwise look at the stuck ranks' logs (a rank waiting in a collective "
           "fails by itself after trainer.collective_timeout_s)")
    return WorkerError(group, method, None, cause, fix)


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + ln for ln in text.splitlines())
