"""Summarize the tool-use demo's evaluations (issue 13): accuracy with and without the
calculator, tool-call format rate, as a markdown table and a PNG bar chart.

    python bench/tool_demo.py evals/tools --out docs/tools_demo.png
    python bench/tool_demo.py evals/tools --runs runs/tools-grpo-s1 runs/tools-grpo-s2 --out docs/tools_demo.png

Reads every DIR/*/generations.jsonl written by `verl eval` (agent rows carry `tool_calls`).
With --runs, the PNG also plots each GRPO run's held-out reward (val/score/mean, greedy, with the
calculator) against its step, next to the evaluations without tools as horizontal lines.
Columns: accuracy (correct number after ####, or as the last number: the arithmetic scorer's
acc), format (the response has "####"), called (>= 1 tool call), call ok (>= 1 call that
ran without error), turns per trajectory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from verlcli.report import read_metrics, series


def summarize(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    n = len(rows)
    acc = sum(float(r.get("correct") or r.get("acc") or 0.0) for r in rows) / n
    fmt = sum("####" in (r.get("response") or "") for r in rows) / n
    called = sum(bool(r.get("tool_calls")) for r in rows) / n
    call_ok = sum(any(c["ok"] for c in r.get("tool_calls") or []) for r in rows) / n
    turns = sum(r.get("turns", 1) for r in rows) / n
    return {"n": n, "accuracy": acc, "format": fmt, "called": called, "call_ok": call_ok, "turns": turns,
            "tools": "tool_calls" in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("evals", help="directory holding one verl eval output directory per condition")
    ap.add_argument("--out", default=None, help="PNG bar chart of accuracy per condition")
    ap.add_argument("--runs", nargs="*", default=[], help="GRPO run directories: held-out curves in the PNG")
    ap.add_argument("--step0", type=float, default=None,
                    help="held-out reward of the starting model, drawn at step 0 for runs that did not "
                         "validate before training (trainer.val_before_train=false)")
    args = ap.parse_args()
    results = {d.name: summarize(d / "generations.jsonl") for d in sorted(Path(args.evals).iterdir())
               if (d / "generations.jsonl").is_file()}
    print("| condition | n | accuracy | `####` format | made a call | call ran ok | turns |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        tool_cols = f"{r['called']:.2f} | {r['call_ok']:.2f}" if r["tools"] else "– | –"
        print(f"| {name} | {r['n']} | **{r['accuracy']:.2f}** | {r['format']:.2f} | {tool_cols} | {r['turns']:.2f} |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2 if args.runs else 1, figsize=(11 if args.runs else 6, 3.6), squeeze=False)
        ax = axes[0][0]
        names = list(results)
        bars = ax.bar(names, [results[k]["accuracy"] for k in names], color=["C0" if results[k]["tools"] else "C7" for k in names])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.set_ylim(0, 1)
        ax.set_title("SmolLM2-135M, 3-4 digit a*b")
        ax.tick_params(axis="x", labelrotation=20)
        if args.runs:
            ax = axes[0][1]
            for run in args.runs:
                curve = list(zip(*series(read_metrics(run), "val/score/mean")))
                if args.step0 is not None and (not curve or curve[0][0] != 0):
                    curve = [(0, args.step0)] + curve
                ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=f"GRPO + calculator: {Path(run).name}")
            baselines: dict[float, list[str]] = {}
            for name, r in results.items():
                if not r["tools"]:
                    baselines.setdefault(round(r["accuracy"], 2), []).append(name)
            for acc, names_at in baselines.items():
                ax.axhline(acc, color="C7", linestyle="--", linewidth=1)
                ax.annotate(f"without tools: {', '.join(names_at)}", (0, acc), textcoords="offset points",
                            xytext=(2, 3), fontsize=8)
            ax.set_xlabel("GRPO step")
            ax.set_ylabel("held-out reward (greedy)")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8, loc="lower right")
            ax.set_title("held-out reward during GRPO")
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
