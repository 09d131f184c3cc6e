"""The sandbox a user reward function runs in (inside its reward worker process).

A reward function is user code, and code-executing rewards run model output: it must not be
able to hang the machine, reach the network or damage the run. Entered once, at worker
start, before the user's file is imported:

- memory: RLIMIT_AS (a MemoryError in the function, not the OOM killer on the run);
- CPU: RLIMIT_CPU re-armed before every item (`arm_cpu_limit`): a busy loop gets SIGXCPU;
- network: a new, empty network namespace (unshare; kernel-enforced, children included),
  else Landlock's TCP rules; and an audit hook refusing socket connect/bind either way;
- files: a private temporary working directory (also TMPDIR); with Landlock (Linux ≥ 5.13)
  writes anywhere else are refused by the kernel, and an audit hook refuses any access to
  the run directory.
What was enforced is returned as a list of words, so tests and logs can say so.
"""

from __future__ import annotations

import ctypes
import os
import resource
import struct
import sys

_NEWNET, _NEWUSER = 0x40000000, 0x10000000
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # x86_64 and arm64 alike
_PR_SET_NO_NEW_PRIVS = 38
# Landlock filesystem rights that change things (reads stay unrestricted).
_FS_WRITE = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make*
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
_PATH_EVENTS = {"open", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                "os.truncate", "os.utime", "os.link", "os.symlink", "shutil.rmtree", "shutil.move",
                "shutil.copyfile", "shutil.copytree", "os.listdir", "os.scandir", "os.chdir"}
_NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}


def enter(workdir: str, run_dir: str | None, memory_gb: float) -> list[str]:
    """Confine this process (once, before loading user code). Returns what is enforced."""
    done = []
    os.chdir(workdir)
    os.environ.update(TMPDIR=workdir, TMP=workdir, TEMP=workdir, HOME=workdir)
    if memory_gb > 0:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        done.append("memory")
    libc = ctypes.CDLL(None, use_errno=True)
    if _unshare_net(libc):
        done.append("netns")
    abi = _landlock_abi(libc)
    if abi > 0 and _landlock(libc, abi, [workdir, "/dev"]):
        done.append("landlock")
    sys.addaudithook(_audit_hook(os.path.realpath(run_dir) if run_dir else None))
    done.append("audit")
    return done


def arm_cpu_limit(seconds: float) -> None:
    """Allow `seconds` more CPU time from now (SIGXCPU ends the worker past it)."""
    if seconds <= 0:
        return
    ru = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(ru.ru_utime + ru.ru_stime + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _unshare_net(libc) -> bool:
    """A network namespace of our own (only a down loopback): root, or a user namespace."""
    for flags in (_NEWNET, _NEWUSER | _NEWNET):
        if libc.unshare(flags) == 0:
            return True
    return False


def _landlock_abi(libc) -> int:
    try:
        return int(libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    except (AttributeError, OSError):
        return -1


def _landlock(libc, abi: int, writable: list[str]) -> bool:
    """Writes only under `writable`; TCP bind/connect nowhere (ABI ≥ 4)."""
    fs = _FS_WRITE | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    net = _NET_TCP if abi >= 4 else 0
    attr = struct.pack("QQ", fs, net) if abi >= 4 else struct.pack("Q", fs)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        for path in writable:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", fs, fd)  # landlock_path_beneath_attr is packed
                if libc.syscall(_SYS_ADD_RULE, ruleset, 1, ctypes.c_char_p(rule), ctypes.c_uint32(0)) != 0:
                    return False
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return False
        return libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def _audit_hook(run_dir: str | None):
    """Refuse network calls, and any file access under the run directory."""
    def inside(arg) -> bool:
        if isinstance(arg, int) or arg is None:
            return False
        try:
            path = os.path.realpath(os.fsdecode(arg))
        except (TypeError, ValueError):
            return False
        return path == run_dir or path.startswith(run_dir + os.sep)

    def hook(event, args):
        if event in _NET_EVENTS:
            raise PermissionError(f"reward sandbox: no network ({event})")
        if run_dir and event in _PATH_EVENTS and any(inside(a) for a in args[:2]):
            raise PermissionError(f"reward sandbox: the run directory is off limits ({event} {args[0]!r})")

    return hook
