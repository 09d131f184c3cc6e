"""A rich progress bar with ETA over RL/SFT steps (quiet when not a terminal or disabled)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "train", console=None):
        """console: the Tracker's, so each step's metrics line prints above the bar."""
        self.bar = None
        if enabled:
            self.bar = RichProgress(
                TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False, console=console,
            )
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def advance(self, metrics: dict | None = None) -> None:
        if self.bar is None:
            return
        m = metrics or {}
        names = {"score/mean": "reward", "train/loss": "loss", "timing/step_s": "s/step"}
        info = " ".join(f"{name}={m[k]:.3g}" for k, name in names.items() if isinstance(m.get(k), (int, float)))
        self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
