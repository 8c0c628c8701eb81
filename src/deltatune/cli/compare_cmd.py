"""`deltatune compare`: run the method comparison and print its summary."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def compare_command(
    preset: str,
    methods: str | None,
    model: str | None,
    data: str | None,
    out: Path,
    force: bool,
    tasks: list[str] | None,
    overrides: list[str],
    console: Console,
) -> None:
    from deltatune.analysis.compare import best_per_column, compare

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    rows = compare(preset, names, out, model, data, force, lambda what: console.print(f"[dim]running[/] {what}"),
                   tasks, overrides)  # fmt: skip
    table = Table(title=f"deltatune compare ({preset})")
    for header in ("task", "method", "family", "status", "trainable %", "peak MiB", "step s", "metric", "lr"):
        table.add_column(header)
    for r in rows:
        ok = r.status == "ok"
        metric = "—" if r.metric is None else f"{r.metric:.3f}"
        cells = [f"{r.trainable_pct:.3f}", f"{r.peak_mb:.0f}", f"{r.step_s:.2f}", metric, f"{r.lr:g}"] if ok else []
        table.add_row(r.task, r.method, r.family, r.status if ok else f"[yellow]{r.status}[/]: {r.reason}", *cells)
    console.print(table)
    for task, winners in best_per_column(rows).items():
        console.print(f"[bold]{task}[/] best: " + "; ".join(f"{h}: {m}" for h, m in winners.items()))
    console.print(f"table: {out / 'compare.md'}, chart: {out / 'compare.png'}, rows: {out / 'results.json'}")
