"""Running one tool call in a fresh sandboxed subprocess (the parent side of _runner.py).

One process per call: nothing leaks from one trajectory's code into another's, and a call that
hangs or explodes is simply killed. Limits: CPU time (RLIMIT_CPU, `timeout_s`), wall time
(`timeout_s` + start-up slack, then the whole process group is killed), memory (RLIMIT_AS,
`memory_mb`), output (files capped by RLIMIT_FSIZE, then cut to `max_output` characters),
no network and writes only in a temporary directory (verlcli/rewards/sandbox.py: the same
sandbox user reward functions run in). Start-up costs one Python interpreter (~30 ms).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import verlcli.rewards.sandbox as _sandbox

RUNNER = Path(__file__).with_name("_runner.py")
_START_SLACK_S = 2.0  # interpreter start on a loaded 2-core machine; not the code's time
_MAX_FILE_BYTES = 1 << 20


@dataclass
class Outcome:
    returncode: int | None
    stdout: str
    stderr: str
    result: dict | None  # result.json written by a user tool
    timed_out: bool = False

    def why(self, timeout_s: float) -> str:
        """A one-line reason for a failed run."""
        if self.timed_out or self.returncode == -signal.SIGXCPU:
            return f"timed out after {timeout_s:g} s"
        if self.returncode == -signal.SIGXFSZ:
            return "wrote more output than allowed"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        tail = self.stderr.strip().splitlines()
        return tail[-1][:300] if tail else f"exit code {self.returncode}"


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... [output truncated: {len(text) - limit} more characters]"


def run_sandboxed(request: dict, *, timeout_s: float, memory_mb: int) -> Outcome:
    """Run `request` (see _runner.py) in a sandboxed child; never raises on the child's behalf."""
    request = {**request, "sandbox_py": _sandbox.__file__, "memory_mb": memory_mb, "cpu_s": timeout_s,
               "max_file_bytes": _MAX_FILE_BYTES}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    with tempfile.TemporaryDirectory(prefix="verl-tool-") as work:
        out_path, err_path = Path(work) / ".stdout", Path(work) / ".stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", str(RUNNER)], stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, cwd=work, env=env, start_new_session=True)
            timed_out = False
            try:
                proc.communicate(json.dumps(request).encode(), timeout=timeout_s + _START_SLACK_S)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # also whatever the code forked and left behind
        result = None
        result_path = Path(work) / "result.json"
        if proc.returncode == 0 and result_path.is_file():
            try:
                result = json.loads(result_path.read_text(encoding="utf-8", errors="replace"))
            except ValueError:
                result = None
        read = lambda p: p.read_bytes()[:_MAX_FILE_BYTES].decode("utf-8", errors="replace")  # noqa: E731
        return Outcome(proc.returncode, read(out_path), read(err_path), result, timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
