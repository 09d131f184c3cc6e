"""A rich progress bar with ETA over RL/SFT steps (quiet when not a terminal or disabled)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "train"):
        self.bar = None
        if enabled:
            self.bar = RichProgress(
                TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            )
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def advance(self, metrics: dict | None = None) -> None:
        if self.bar is None:
            return
        m = metrics or {}
        info = " ".join(f"{k.split('/')[-1]}={m[k]:.3g}" for k in ("score/mean", "train/loss", "timing/step_s") if k in m)
        self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
