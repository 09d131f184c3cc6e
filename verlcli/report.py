"""`verl report`: PNG curves from one or more runs' metrics.jsonl, overlaid for comparison."""

from __future__ import annotations

import json
from pathlib import Path

from verlcli.errors import UserError
from verlcli.io import atomic_path

# (title, candidate keys — the first one a run has is drawn)
PANELS = [
    ("train reward (score/mean)", ["score/mean"]),
    ("validation reward", ["val/score/mean"]),
    ("response length (tokens)", ["response/length_mean"]),
    ("KL to reference / approx KL", ["actor/kl_loss", "actor/reward_kl_penalty", "actor/ppo_kl"]),
    ("entropy", ["actor/entropy"]),
    ("rollout vs trainer log-prob gap", ["rollout/logprob_gap_mean"]),
    ("SFT loss", ["train/loss", "val/loss"]),
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}", fix="pass a run directory written by verl sft/ppo/grpo")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{i} is not valid JSON", fix="remove the broken line (a crash mid-write?)") from None
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a metric that is 0 at every step (e.g. the PPO KL of
    on-policy updates) counts as absent, so a panel falls back to its next key."""
    pts = {}
    for r in rows:  # later lines win (a resumed run re-logs a step)
        if isinstance(r.get(key), (int, float)):
            pts[int(r["step"])] = float(r[key])
    if not any(pts.values()) and not key.startswith(("score", "val/")):
        return [], []
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def training_clock(rows: list[dict]) -> dict[int, float]:
    """Seconds of training up to the end of each step: the step's time without validation and
    checkpointing (what `val/score/mean` at step k was reached after). Step 0 is 0 s."""
    per_step = {}
    for r in rows:  # later lines win (a resumed run re-logs a step)
        if isinstance(r.get("timing/step_s"), (int, float)):
            per_step[int(r["step"])] = (r["timing/step_s"] - r.get("timing/validate_s", 0.0)
                                        - r.get("timing/checkpoint_s", 0.0))
    clock, total = {0: 0.0}, 0.0
    for step in sorted(per_step):
        total += per_step[step]
        clock[step] = total
    return clock


def heldout_vs_time(rows: list[dict]) -> tuple[list[float], list[float]]:
    """(training seconds, val/score/mean) at every validated step."""
    clock = training_clock(rows)
    steps, values = series(rows, "val/score/mean")
    pts = [(clock[s], v) for s, v in zip(steps, values) if s in clock]
    return [t for t, _ in pts], [v for _, v in pts]


def make_report(run_dirs: list[str], out: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    out_dir = Path(out or Path(run_dirs[0]) / "plots")
    written = []
    panels = [(t, keys) for t, keys in PANELS if any(series(rows, k)[0] for rows in runs.values() for k in keys)]
    if panels:
        cols = 2
        fig, axes = plt.subplots((len(panels) + 1) // cols, cols, figsize=(11, 3.2 * ((len(panels) + 1) // cols)), squeeze=False)
        for ax, (title, keys) in zip(axes.flat, panels):
            for name, rows in runs.items():
                for k in keys:
                    xs, ys = series(rows, k)
                    if xs:
                        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=f"{name}" + (f" {k}" if len(keys) > 1 and "loss" in title else ""))
                        if "loss" not in title:
                            break
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "curves.png"))
        plt.close(fig)
    heldout = {name: heldout_vs_time(rows) for name, rows in runs.items()}
    if any(len(xs) > 1 for xs, _ in heldout.values()):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, (xs, ys) in heldout.items():
            if xs:
                ax.plot([x / 60 for x in xs], ys, marker="o", ms=3, label=name)
        ax.set_xlabel("training minutes (validation and checkpoints excluded)")
        ax.set_ylabel("held-out reward (val/score/mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "heldout_vs_time.png"))
        plt.close(fig)
    timing = _timing_figure(plt, runs)
    if timing is not None:
        written.append(_save(timing, out_dir / "timing.png"))
        plt.close(timing)
    if not written:
        raise UserError(f"no plottable metrics in {', '.join(run_dirs)}", fix="run at least one training step first")
    return written


def _timing_figure(plt, runs: dict):
    """Seconds per phase, mean over steps, one bar group per run."""
    phases = sorted({k for rows in runs.values() for r in rows for k in r
                     if k.startswith("timing/") and k != "timing/step_s"})
    if not phases:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.5))
    width = 0.8 / len(runs)
    for j, (name, rows) in enumerate(runs.items()):
        means = []
        for p in phases:
            ys = series(rows, p)[1]
            means.append(sum(ys) / len(ys) if ys else 0.0)
        ax.bar([i + j * width for i in range(len(phases))], means, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phases))])
    ax.set_xticklabels([p.removeprefix("timing/").removesuffix("_s") for p in phases], rotation=30, fontsize=8)
    ax.set_ylabel("seconds per step (mean)")
    ax.set_title("time per phase")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
