"""Commands. Each parses, calls one library function and prints; errors print one line and exit non-zero."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deltatune.analysis import plan as plan_help
from deltatune.errors import DeltatuneError
from deltatune.serving import SERVERS

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


def host_tuning(cfg):
    """The CLI owns its process: it may tune the CPU allocator around the training steps (restored after)."""
    import torch

    from deltatune.train.host import freed_memory_kept, wants_kept_memory

    on_cpu = not torch.cuda.is_available()
    return freed_memory_kept if wants_kept_memory(cfg.cpu_allocator, bool(cfg.quantize), on_cpu) else None


@app.command()
@_friendly
def quickstart(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/quickstart"),
    steps: Annotated[int, typer.Option(help="training steps")] = 80,
    eval_examples: Annotated[int, typer.Option(help="held-out examples scored before/after")] = 64,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any run-config override, as in `deltatune train`")
    ] = None,
) -> None:
    """Fine-tune the bundled SmolLM2-135M-Instruct with LoRA on the bundled date task; report before/after."""
    from deltatune.cli.report import print_train_report
    from deltatune.train import load_train_config, train

    cfg = load_train_config(
        None,
        [
            f"output_dir={out}",
            f"optim.steps={steps}",
            f"generate_eval={eval_examples}",
            "max_new_tokens=12",
            *(set_ or []),  # last: a --set wins over the quickstart's own settings
        ],
    )
    console.print(f"[bold]quickstart[/]: LoRA on SmolLM2-135M-Instruct, {cfg.optim.steps} steps, run dir {out}")
    print_train_report(train(cfg, console=console, around_loop=host_tuning(cfg)), console)


@app.command()
@_friendly
def tour(
    out: Annotated[Path, typer.Option(help="where the adapter is saved")] = Path("runs/tour"),
    steps: Annotated[int, typer.Option(help="training steps")] = 6,
) -> None:
    """A 10-second LoRA tour on SmolLM2: parameter counts, merged == unmerged, save/load round trip."""
    from deltatune.demo import run_demo

    run_demo(out, steps=steps, console=console)


@app.command(name="train")
@_friendly
def train_cmd(
    config: Annotated[Path | None, typer.Argument(help="YAML run config")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. optim.lr=1e-4")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's latest checkpoint")] = False,
    quantize: Annotated[str | None, typer.Option(help="load the base in 4 bits: nf4 or fp4 (QLoRA)")] = None,
) -> None:
    """Fine-tune a model with any registered method, from a YAML config (see docs/training.md)."""
    from deltatune.cli.report import print_train_report
    from deltatune.train import load_train_config, train

    overrides = [*(set_ or []), *([f"quantize={quantize}"] if quantize else [])]
    cfg = load_train_config(config, overrides)
    print_train_report(train(cfg, resume=resume, console=console, around_loop=host_tuning(cfg)), console)


@app.command()
@_friendly
def generate(
    prompt: Annotated[str, typer.Option(help="user message")],
    model: Annotated[str, typer.Option(help="HF dir, .gguf or 'smollm2'")] = "smollm2",
    adapter: Annotated[Path | None, typer.Option(help="adapter directory")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    stream: Annotated[bool, typer.Option(help="print tokens as they come")] = True,
    system: Annotated[str, typer.Option(help="system message; empty: none (as in training: no template default)")] = "",
) -> None:
    """Chat-format a prompt and generate (greedy or sampled), optionally with an adapter."""
    from deltatune.cli.generate_cmd import generate_text

    text = generate_text(model, adapter, prompt, max_new_tokens, temperature, stream, system)
    if not stream:
        console.print(text)


@app.command()
@_friendly
def inspect(
    adapter: Annotated[Path, typer.Argument(help="adapter directory (adapter_config.json + weights)")],
    serving: Annotated[str | None, typer.Option(help=f"{' | '.join(SERVERS)}: can that server load it?")] = None,
) -> None:
    """Show an adapter's config, targeted modules, parameters per module and file size; with --serving, whether a
    server can load it and why not."""
    from deltatune.cli.inspect_cmd import show_adapter, show_serving

    if serving:
        show_serving(adapter, serving, console)
        return
    show_adapter(adapter, console)


@app.command()
@_friendly
def merge(
    model: Annotated[str, typer.Option(help="base model: HF dir, .gguf file or 'smollm2'")] = "smollm2",
    adapter: Annotated[list[Path], typer.Option(help="adapter directory; repeat with --weights to combine")] = ...,
    out: Annotated[Path, typer.Option(help="output directory")] = ...,
    weights: Annotated[
        str | None, typer.Option(help="comma-separated, one per adapter: write a combined adapter")
    ] = None,
    combination: Annotated[
        str, typer.Option(help="svd | cat | linear | ties | dare_linear | dare_ties | magnitude_prune | *_svd")
    ] = "svd",
    density: Annotated[float | None, typer.Option(help="ties / dare / magnitude_prune: fraction kept")] = None,
    svd_rank: Annotated[int | None, typer.Option(help="rank of svd results (default: the largest input rank)")] = None,
    merged: Annotated[
        bool, typer.Option("--merged", help="with --weights: write the merged model, not an adapter")
    ] = False,
) -> None:
    """Merge an adapter into its base (a standalone HF model directory), or combine several adapters with weights."""
    from deltatune.cli.merge_cmd import combine_to_dir, merge_to_dir

    if weights is None and len(adapter) == 1:
        merge_to_dir(model, adapter[0], out)
        console.print(f"merged model written to {out}")
        return
    values = [float(w) for w in (weights or "").split(",") if w.strip()]
    options = {"combination_type": combination, "density": density, "svd_rank": svd_rank}
    combine_to_dir(model, adapter, values, out, merged, **options)
    console.print(f"{'merged model' if merged else 'combined adapter'} ({combination}) written to {out}")


@app.command()
@_friendly
def analyze(
    adapter: Annotated[Path, typer.Argument(help="adapter directory")],
    base: Annotated[str | None, typer.Option(help="base model (default: the adapter's, else the bundled one)")] = None,
    other: Annotated[Path | None, typer.Option(help="a second adapter: subspace similarity per module")] = None,
    out: Annotated[Path | None, typer.Option(help="where analysis.json and the PNGs go")] = None,
) -> None:
    """What an adapter learned: per module the rank, effective rank, relative norm and amplification of its ΔW."""
    from deltatune.cli.analyze_cmd import analyze_command

    analyze_command(adapter, base, other, out or adapter / "analysis", console)


@app.command()
@_friendly
def plan(
    model: Annotated[str, typer.Option(help=plan_help.MODEL_HELP)] = "smollm2",
    method: Annotated[list[str] | None, typer.Option(help=plan_help.METHOD_HELP)] = None,
    rank: Annotated[int, typer.Option("--rank", "--r", help="rank, for methods that have one")] = 8,
    targets: Annotated[str | None, typer.Option(help="comma-separated target modules (default: the method's)")] = None,
    batch: Annotated[int, typer.Option()] = 1,
    seq: Annotated[int, typer.Option(help="tokens per example")] = 512,
    dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32")] = "bf16",
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing")] = False,
    optimizer: Annotated[str, typer.Option(help="adamw | adamw_8bit | paged | offload")] = "adamw",
    budget: Annotated[float | None, typer.Option(help="GPU memory in GB: the largest batch that fits")] = None,
    chunked_loss: Annotated[bool, typer.Option("--chunked-loss", help="head + loss in chunks")] = False,
) -> None:
    """Peak training memory from the model's config alone (meta device): weights, trainable state, activations."""
    from deltatune.cli.plan_cmd import plan_command

    chosen = method or list(plan_help.DEFAULT_METHODS)
    target_list = targets.split(",") if targets else None
    options = (grad_checkpointing, optimizer, budget, console, chunked_loss)
    plan_command(model, chosen, rank, target_list, batch, seq, dtype, *options)


@app.command()
@_friendly
def recommend(
    examples: Annotated[int | None, typer.Option(help="number of training examples")] = None,
    data: Annotated[str | None, typer.Option(help="or a data file (its records are counted)")] = None,
    task: Annotated[str, typer.Option(help="chat | classification")] = "chat",
    model: Annotated[str, typer.Option(help="smollm2 | minilm | preset | model dir")] = "smollm2",
    budget: Annotated[float | None, typer.Option(help="GPU memory in GB the plan must fit")] = None,
    seq: Annotated[int, typer.Option(help="tokens per example for the memory plan")] = 512,
) -> None:
    """Method, rank, targets, learning rate and steps for a dataset, with the reasons and a memory plan."""
    from deltatune.cli.plan_cmd import recommend_command

    recommend_command(examples, data, task, model, budget, seq, console)


@app.command()
@_friendly
def compare(
    preset: Annotated[str, typer.Option(help="quick (2-core CPU) | full (3 seeds, lr sweep)")] = "quick",
    methods: Annotated[str | None, typer.Option(help="comma-separated (default: all); see docs/compare.md")] = None,
    model: Annotated[str | None, typer.Option(help="replace the tasks' model (HF dir, .gguf)")] = None,
    data: Annotated[str | None, typer.Option(help="replace the tasks' training data (file or bundled:NAME)")] = None,
    out: Annotated[Path, typer.Option(help="one folder per task and method, plus the table")] = Path("runs/compare"),
    force: Annotated[bool, typer.Option("--force", help="redo finished runs (default: read them back)")] = False,
    task: Annotated[list[str] | None, typer.Option(help="only these tasks: date, classification")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="run-config override for every run")] = None,
) -> None:
    """Train every method family and the baselines on the same task and budget; one table of trainable share, size,
    memory, speed, quality, forgetting and merge cost (docs/compare.md)."""
    from deltatune.cli.compare_cmd import compare_command

    compare_command(preset, methods, model, data, out, force, task, list(set_ or []), console)


export_app = typer.Typer(help="Export adapters and models to other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("gguf")
@_friendly
def export_gguf(
    adapter: Annotated[Path, typer.Option(help="adapter directory")] = ...,
    out: Annotated[Path, typer.Option(help="the .gguf file to write")] = ...,
    outtype: Annotated[
        str | None, typer.Option(help="f32 | f16 | bf16 | q8_0, merged also source (default f32, merged f16)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="base: HF dir, .gguf or smollm2 (default: the adapter's; merged: smollm2)")
    ] = None,
    merged: Annotated[bool, typer.Option("--merged", help="write the GGUF base with the adapter merged in")] = False,
) -> None:
    """A LoRA adapter as a llama.cpp adapter GGUF (llama.cpp's --lora, llama-cpp-python's lora_path), or with --merged
    the base GGUF with the adapter merged in, plus an Ollama Modelfile."""
    from deltatune.export import export_gguf_adapter, export_gguf_merged

    if merged:
        from deltatune.export import export_gguf_from_hf
        from deltatune.pretrained import bundled_gguf_path

        source = bundled_gguf_path() if model in (None, "smollm2") else Path(model)
        if source.is_dir():  # a transformers directory: a full conversion, tokenizer included
            export_gguf_from_hf(source, out, adapter, outtype or "f16")
        else:
            export_gguf_merged(source, adapter, out, outtype or "f16")
        console.print(
            f"merged model written to {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.parent / 'Modelfile'}"
        )
        return
    export_gguf_adapter(adapter, out, outtype or "f32", model)
    console.print(f"GGUF adapter written to {out} ({out.stat().st_size / 1e6:.2f} MB)")


@export_app.command("peft")
@_friendly
def export_peft(
    adapter: Annotated[Path, typer.Option(help="adapter directory")] = ...,
    out: Annotated[Path, typer.Option(help="output directory")] = ...,
    for_server: Annotated[
        str, typer.Option("--for", help="vllm | sglang: rewrite what the server reads otherwise")
    ] = "vllm",
) -> None:
    """A copy of the adapter a server loads exactly (per-module scales folded: servers apply one alpha / r)."""
    from deltatune.serving import export_for_vllm

    export_for_vllm(adapter, out)
    console.print(f"adapter for {for_server} written to {out}")


@export_app.command("bnb4")
@_friendly
def export_bnb4(
    out: Annotated[Path, typer.Option(help="output directory")] = ...,
    model: Annotated[str, typer.Option(help="HF dir, .gguf or smollm2")] = "smollm2",
    quant_type: Annotated[str, typer.Option(help="nf4 | fp4")] = "nf4",
    double_quant: Annotated[bool, typer.Option(help="quantize the absmax constants too")] = True,
) -> None:
    """The model with its linear layers in 4 bits, written as transformers + bitsandbytes write a 4-bit model
    (loadable by AutoModelForCausalLM.from_pretrained with bitsandbytes, and by deltatune train --set model=OUT)."""
    from deltatune.pretrained import export_bnb_4bit

    export_bnb_4bit(model, out, quant_type, double_quant)
    console.print(f"4-bit model written to {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")
