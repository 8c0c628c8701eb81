"""Commands. Each parses, calls one library function and prints; errors print one line and exit non-zero."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deltatune.errors import DeltatuneError

app = typer.Typer(
    help="deltatune: parameter-efficient fine-tuning (LoRA and friends).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


def _friendly(fn):
    """Turn deltatune's typed errors into one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeltatuneError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_friendly
def quickstart(
    out: Annotated[Path, typer.Option(help="where the adapter is saved")] = Path("runs/quickstart"),
    steps: Annotated[int, typer.Option(help="training steps of the demo")] = 6,
) -> None:
    """LoRA on the bundled SmolLM2-135M-Instruct: counts, training steps, merge check, save/load round trip."""
    from deltatune.demo import run_demo

    run_demo(out, steps=steps, console=console)


@app.command()
@_friendly
def inspect(adapter: Annotated[Path, typer.Argument(help="adapter directory (adapter_config.json + weights)")]) -> None:
    """Show an adapter's config, targeted modules, parameters per module and file size."""
    from deltatune.cli.inspect_cmd import show_adapter

    show_adapter(adapter, console)


@app.command()
@_friendly
def merge(
    model: Annotated[str, typer.Option(help="base model: HF dir, .gguf file or 'smollm2'")] = "smollm2",
    adapter: Annotated[Path, typer.Option(help="adapter directory")] = ...,
    out: Annotated[Path, typer.Option(help="output directory for the merged model")] = ...,
) -> None:
    """Merge an adapter into its base and write a standalone HF model directory (safetensors)."""
    from deltatune.cli.merge_cmd import merge_to_dir

    merge_to_dir(model, adapter, out)
    console.print(f"merged model written to {out}")
