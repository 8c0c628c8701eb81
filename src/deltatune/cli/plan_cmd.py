"""`deltatune plan`: the memory plan as a table, the GPUs it fits and the largest batch on a budget."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deltatune.analysis.plan import GIB, GPUS, plan_memory


def plan_command(
    model: str, methods: list[str], rank: int, targets: list[str] | None, batch: int, seq: int, dtype: str,
    gradient_checkpointing: bool, optimizer: str, budget: float | None, console: Console, chunked_loss: bool = False,
) -> None:  # fmt: skip
    plans = [
        plan_memory(
            model,
            m,
            rank=rank,
            targets=targets,
            batch=batch,
            seq=seq,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            optimizer=optimizer,
            chunked_loss=chunked_loss,
        )  # fmt: skip
        for m in methods
    ]
    table = Table(title=f"peak training memory, {model}: batch {batch} x {seq} tokens, {dtype}, {optimizer}"
                  + (", gradient checkpointing" if gradient_checkpointing else "")
                  + (", chunked loss" if chunked_loss else ""))  # fmt: skip
    for col in ("method", "trainable", "base weights", "trainable state", "activations", "logits+loss", "peak",
                "adapter file"):  # fmt: skip
        table.add_column(col, justify="left" if col == "method" else "right")
    for p in plans:
        table.add_row(
            p.method, f"{p.trainable_params:,} ({100 * p.trainable_params / p.total_params:.3f}%)",
            *(f"{b / GIB:.2f} GiB" for b in (p.base_weights, p.trainable_state, p.activations, p.logits_and_loss)),
            f"[bold]{p.peak / GIB:.2f} GiB[/]", _size(p.adapter_file_bytes),
        )  # fmt: skip
    console.print(table)
    fits = Table(title="fits (estimate <= 90% of the GPU's memory; largest batch at this sequence length)")
    fits.add_column("GPU")
    for p in plans:
        fits.add_column(p.method, justify="right")
    sizes = dict(GPUS) | ({f"budget {budget:g} GB": budget} if budget else {})
    for name, gib in sizes.items():
        fits.add_row(name, *(f"{'yes' if p.fits(gib) else 'no'} (batch {p.largest_batch(gib)})" for p in plans))
    console.print(fits)


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GB" if n >= GIB else f"{n / 2**20:.1f} MB"


def recommend_command(examples: int | None, data: str | None, task: str, model: str, budget: float | None,
                      seq: int, console: Console) -> None:  # fmt: skip
    from deltatune.analysis.recommend import recommend
    from deltatune.errors import ConfigError

    if data:
        from deltatune.train.data import read_records

        examples = len(read_records(data, "train"))
    if not examples:
        raise ConfigError("give --examples N or --data FILE.")
    rec = recommend(examples, task, model, budget, seq)
    table = Table(title=f"recommended start: {examples} {task} examples on {model}", show_header=False)
    table.add_row("method", escape(", ".join(f"{k}={v}" for k, v in rec.method.items())))
    table.add_row("learning rate / steps / batch", f"{rec.lr:g} / {rec.steps} / {rec.batch}")
    if rec.plan is not None:
        table.add_row("memory plan", f"peak {rec.plan.peak / GIB:.2f} GiB at {rec.batch} x {seq} tokens")
    for n, reason in enumerate(rec.reasons):
        table.add_row("why" if n == 0 else "", reason)
    console.print(table)
    console.print("run: " + escape(rec.command(task, data)), soft_wrap=True)
    console.print("ranks placed by gradient sensitivity instead of uniform: add --set method.rank_pattern=auto")
