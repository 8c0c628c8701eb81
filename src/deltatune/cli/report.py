"""Rich summary of a finished training run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from deltatune.train import TrainResult


def print_train_report(result: TrainResult, console: Console, samples: int = 5) -> None:
    """The run summary and before/after samples; printed by rank 0 only (other ranks saved nothing to report)."""
    if result.rank != 0:
        return
    summary = Table(title="run summary", show_header=False)
    summary.add_row(
        "trainable params",
        f"{result.trainable:,} of {result.total:,} ({100 * result.trainable / max(1, result.total):.3f}%)",
    )
    summary.add_row("adapter size", f"{result.adapter_bytes / 1e6:.2f} MB")
    summary.add_row("steps / time", f"{result.steps} steps in {result.seconds:.0f}s")
    if result.phases:
        summary.add_row("time per phase", ", ".join(f"{name} {s:.0f}s" for name, s in result.phases.items()))
    if result.losses:
        summary.add_row("train loss", f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    if result.eval_loss is not None:
        summary.add_row("held-out loss", f"{result.eval_loss:.4f}")
    summary.add_row("adapter", str(result.adapter_dir))
    summary.add_row("metrics / loss curve", f"{result.run_dir / 'metrics.jsonl'}, {result.run_dir / 'loss.png'}")
    console.print(summary)
    if result.scores:
        scores = Table(title=f"scored by {result.scored_by}, before -> after training")
        for col in ("set", "examples", "before", "after"):
            scores.add_column(col, justify="left" if col == "set" else "right")
        for name, (before, after) in result.scores.items():
            count = len(result.set_samples.get(name, result.samples))  # scores of one set share its samples
            scores.add_row(name, str(count), f"{100 * before:.1f}%", f"[bold]{100 * after:.1f}%[/]")
        console.print(scores)
    for name, rows in result.set_samples.items():
        # the misses after training first: what a user would run into
        shown = rows if name == "general questions" else sorted(rows, key=lambda r: r.get("right", True))[:samples]
        if not shown:
            continue
        table = Table(title=f"{name}: before vs after" + ("" if name == "general questions" else " (misses first)"))
        for col in ("input", "expected", "before", "after"):
            table.add_column(col)
        for s in shown:
            table.add_row(s["prompt"].split("\n")[-1], s["reference"], s["before"], s["after"])
        console.print(table)
