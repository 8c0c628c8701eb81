"""Progress bar (rich) and the loss curve (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """A rich progress bar showing loss, lr, tokens/s and ETA; silent on ranks other than 0."""

    def __init__(self, console: Console, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def note(self, train_seconds_left: float, after_seconds: float) -> None:
        """One line with the time the run still needs, from its first timed steps."""
        if self.enabled:
            then = f" + ~{after_seconds:.0f}s of scoring after" if after_seconds >= 1 else ""
            self.progress.console.print(
                f"estimate from the first steps: ~{train_seconds_left:.0f}s of training left{then}"
            )

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        self.progress.update(self.task, completed=step, stats=stats)


def plot_losses(losses: list[float], path: Path) -> None:
    """Training loss per step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
