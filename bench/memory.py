"""Where the memory of a `verl grpo` run goes: the process tree, and the worker per phase.

    python bench/memory.py tree [--steps 4] [--timeout S] [--out bench/results/memory_tree.json] [KEY=VALUE ...]

`tree`: runs `verl grpo --preset smollm2-135m-cpu` (Ray launcher, as users run it) and samples
every process of its tree: RSS every 0.25 s, PSS every second (PSS splits the shared library
pages between the Ray processes instead of counting them once per process). Reports the peak of
the summed RSS and PSS, each process's peak RSS by role, and the worker's RSS at the end of
each step and at the end of each phase (`mem/*` in metrics.jsonl: the creep, and what
trimming the allocator released per phase: workers/malloc.py).

Writes `--out` (JSON) and prints it. KEY=VALUE overrides go to `verl grpo` as given.
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["tree"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--preset", default="smollm2-135m-cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/verl-memory-bench")
    p.add_argument("--timeout", type=float, default=540, help="Stop the run (Ctrl-C) after this many seconds.")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)  # KEY=VALUE overrides after the options
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result = run_tree(a, work)
    result["settings"] = {"mode": a.mode, "steps": a.steps, "preset": a.preset, "overrides": a.overrides,
                          "threads": a.threads}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        from verlcli.io import write_text_atomic

        write_text_atomic(Path(a.out), text + "\n")


if __name__ == "__main__":
    main()
