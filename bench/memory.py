"""Where the memory of a `verl grpo` run goes: the process tree, and the worker per phase.

    python bench/memory.py tree   [--steps 4] [--out bench/results/memory_tree.json] [KEY=VALUE ...]
    python bench/memory.py phases [--steps 4] [--out bench/results/memory_phases.json] [KEY=VALUE ...]

`tree`: runs `verl grpo --preset smollm2-135m-cpu` (Ray launcher, as users run it) and samples
every process of its tree: RSS every 0.25 s, PSS every second (PSS splits the shared library
pages between the Ray processes instead of counting them once per process). Reports the peak of
the summed RSS and PSS, each process's peak RSS by role, and the worker's RSS at the end of
each step (`mem/rss_gb` in metrics.jsonl: the creep).

`phases`: the same run with `launcher=local` (driver and worker in this one process), every
HybridWorker method wrapped to record VmRSS and VmHWM (/proc/self/status) after it returns, and
the RSS growth of each call: which phase raises the peak, which one keeps memory.

Both write `--out` (JSON) and print a table. KEY=VALUE overrides go to `verl grpo` as given.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GB = 2**30


def status_kb(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(x.split()[1]) * 1024 for x in f if x.startswith("Pss:"))
    except OSError:
        return 0


def role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    for key, name in (("_WorkerHost", "ray worker (HybridWorker)"), ("raylet", "raylet"),
                      ("gcs_server", "gcs_server"), ("dashboard", "ray dashboard/agent"),
                      ("log_monitor", "ray log_monitor"), ("runtime_env", "ray runtime_env agent"),
                      ("verl grpo", "driver (verl grpo)"), ("verlcli.cli", "driver (verl grpo)"),
                      ("ray::IDLE", "ray idle worker"), ("default_worker", "ray idle worker"),
                      ("multiprocessing", "reward pool / helper")):
        if key in text:
            return name
    return (cmdline[0] if cmdline else "?")[-40:]


class TreeSampler:
    """Peak summed RSS/PSS of a process and its descendants; peak RSS per role."""

    def __init__(self, pid: int, period: float = 0.25):
        import psutil

        self.root = psutil.Process(pid)
        self.period = period
        self.peak_rss = self.peak_pss = 0
        self.per_role: dict[str, int] = {}
        self.per_role_pss: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        tick = 0
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except Exception:
                break
            total, pss_total, by_role, pss_role = 0, 0, {}, {}
            for q in procs:
                try:
                    rss, name = q.memory_info().rss, role(q.cmdline())
                except Exception:
                    continue
                total += rss
                by_role[name] = by_role.get(name, 0) + rss
                if tick % round(1 / self.period) == 0:
                    p = pss_bytes(q.pid)
                    pss_total += p
                    pss_role[name] = pss_role.get(name, 0) + p
            self.peak_rss = max(self.peak_rss, total)
            self.peak_pss = max(self.peak_pss, pss_total)
            for k, v in by_role.items():
                self.per_role[k] = max(self.per_role.get(k, 0), v)
            for k, v in pss_role.items():
                self.per_role_pss[k] = max(self.per_role_pss.get(k, 0), v)
            tick += 1
            self._stop.wait(self.period)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_tree_rss_gb": self.peak_rss / GB, "peak_tree_pss_gb": self.peak_pss / GB,
                "peak_rss_gb_by_role": {k: v / GB for k, v in sorted(self.per_role.items(), key=lambda x: -x[1])},
                "peak_pss_gb_by_role": {k: v / GB for k, v in sorted(self.per_role_pss.items(), key=lambda x: -x[1])}}


def prepare_data(work: Path) -> Path:
    out = work / "data"
    if not (out / "train.parquet").exists():
        subprocess.run([sys.executable, "-m", "verlcli.cli", "prepare-data", "arithmetic", "--max-operand", "20",
                        "--operators", "+*", "--train-size", "700", "--test-size", "100", "--seed", "0",
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return out


def grpo_args(a, data: Path, run_dir: Path) -> list[str]:
    return ["grpo", "--preset", a.preset, f"data.train_files=[{data / 'train.parquet'}]",
            f"data.val_files=[{data / 'test.parquet'}]", f"trainer.total_steps={a.steps}",
            "trainer.val_every=0", "trainer.val_before_train=false", "trainer.save_every=0",
            f"trainer.run_dir={run_dir}", "trainer.resume=never", "logging.progress_bar=false",
            *a.overrides]


def env_for(a) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def steps_of(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []
    return [r for r in rows if "timing/step_s" in r]


def run_tree(a, work: Path) -> dict:
    data = prepare_data(work)
    run_dir = work / "run_tree"
    cmd = [sys.executable, "-m", "verlcli.cli", *grpo_args(a, data, run_dir)]
    t0 = time.perf_counter()
    with open(work / "tree.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env_for(a), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        sampler = TreeSampler(proc.pid)
        try:
            rc = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:  # stop it the way Ctrl-C does: teardown stops Ray
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
            rc = "timeout"
    mem = sampler.stop()
    if rc and rc != "timeout":
        raise SystemExit(f"verl grpo failed ({rc}): see {work / 'tree.log'}")
    steps = steps_of(run_dir)  # a run stopped by --timeout still reports the steps it finished
    return {"command": " ".join(cmd), "wall_s": time.perf_counter() - t0, "exit": rc, **mem,
            "worker_mem_per_step": {k: [r.get(k) for r in steps] for k in sorted({k for r in steps for k in r
                                                                                  if k.startswith("mem/")})},
            "step_s": [r.get("timing/step_s") for r in steps],
            "log_lines": [x for f in [work / "tree.log", *run_dir.glob("logs/*")] if f.is_file()
                          for x in f.read_text(errors="replace").splitlines() if "KV cache" in x]}


def run_phases(a, work: Path) -> dict:
    """In this process (launcher=local): record VmRSS/VmHWM around every worker method."""
    data = prepare_data(work)
    os.environ.update({k: v for k, v in env_for(a).items() if k != "PYTHONPATH"})
    from verlcli.workers.hybrid import HybridWorker

    records: list[dict] = []
    names = ["setup", "sync_weights", "generate", "compute_log_probs", "compute_ref_log_probs",
             "update_actor"]

    def wrap(name):
        fn = getattr(HybridWorker, name)

        def traced(self, *args, **kw):
            before = status_kb()
            out = fn(self, *args, **kw)
            after = status_kb()
            records.append({"call": name, "rss_before_gb": before["VmRSS"] / 2**20,
                            "rss_after_gb": after["VmRSS"] / 2**20, "hwm_after_gb": after["VmHWM"] / 2**20})
            return out
        traced.__dict__.update(fn.__dict__)  # keeps the @register mark
        return traced

    for name in names:
        setattr(HybridWorker, name, wrap(name))
    from verlcli.cli import main as cli_main

    run_dir = work / "run_phases"
    argv = grpo_args(a, data, run_dir) + ["launcher=local"]
    sys.argv = ["verl", *argv]
    try:
        cli_main()
    except SystemExit as e:
        if e.code:
            raise
    return {"argv": argv, "calls": records, "final": {k: v / 2**20 for k, v in status_kb().items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["tree", "phases"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--preset", default="smollm2-135m-cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/verl-memory-bench")
    p.add_argument("--timeout", type=float, default=540, help="Stop the run (Ctrl-C) after this many seconds.")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result = run_tree(a, work) if a.mode == "tree" else run_phases(a, work)
    result["settings"] = {"mode": a.mode, "steps": a.steps, "preset": a.preset, "overrides": a.overrides,
                          "threads": a.threads}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        from verlcli.io import write_text_atomic

        write_text_atomic(Path(a.out), text + "\n")


if __name__ == "__main__":
    main()
