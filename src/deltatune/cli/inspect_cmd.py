"""`deltatune inspect DIR`: what is in a saved adapter, read without loading any model."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deltatune import io
from deltatune.model import load_config
from deltatune.registry import get_method


def adapter_summary(directory: str | Path) -> tuple[dict, dict[str, int], int]:
    """(config dict, parameters per module path, weights file size in bytes)."""
    config = load_config(directory)
    prefix = get_method(config.peft_type).param_prefix  # the method's tensors are attributes starting with it
    tensors = io.from_peft_keys(io.read_tensors(directory), get_method(config.peft_type).module_key_prefix)
    per_module: dict[str, int] = defaultdict(int)
    for key, tensor in tensors.items():
        if key.startswith(io.SHARED_MARK):
            per_module["(shared by all layers)"] += tensor.numel()
            continue
        if key.startswith(io.ROOT_MARK):
            per_module["(model input)"] += tensor.numel()
            continue
        parts = key.split(".")
        at = next((i for i, part in enumerate(parts) if part.startswith(prefix)), len(parts) - 1)
        per_module[".".join(parts[:at])] += tensor.numel()
    return config.to_dict(), dict(per_module), (Path(directory) / io.WEIGHTS_NAME).stat().st_size


def show_adapter(directory: Path, console: Console) -> None:
    config, per_module, size = adapter_summary(directory)
    head = Table(title=f"{directory} ({config['peft_type']})", show_header=False)
    for key in sorted(config):
        if config[key] not in (None, [], {}, False, ""):
            head.add_row(key, _brief(config[key]))
    console.print(head)
    table = Table(title="parameters per module")
    table.add_column("module")
    table.add_column("params", justify="right")
    for module, count in sorted(per_module.items()):
        table.add_row(module, f"{count:,}")
    table.add_row("[bold]total", f"[bold]{sum(per_module.values()):,}")
    console.print(table)
    console.print(f"{io.WEIGHTS_NAME}: {size / 1e6:.3f} MB")


def _brief(value: object) -> str:
    """A config value on a line or two: long mappings (e.g. AdaLoRA's per-module keep masks) are summarised."""
    if isinstance(value, dict) and len(value) > 6:
        masks = [v for v in value.values() if isinstance(v, list) and all(isinstance(b, bool) for b in v)]
        if len(masks) == len(value):
            kept, total = sum(sum(m) for m in masks), sum(len(m) for m in masks)
            return f"{len(value)} modules; {kept:,} of {total:,} triplets kept (full masks in the config file)"
        return f"{len(value)} entries (see the config file)"
    return str(value)


def show_serving(directory: str | Path, server: str, console: Console) -> None:
    """A table of the server's rules, each passed or failed with the reason."""
    from deltatune.serving import serving_report

    checks = serving_report(directory, server)
    table = Table(title=f"{directory}: can {server} load it?")
    for col in ("rule", "result", "why / what to do"):
        table.add_column(col)
    for check in checks:
        table.add_row(check.rule, "[green]ok[/]" if check.ok else "[red]no[/]", "" if check.ok else check.why)
    console.print(table)
    verdict = all(c.ok for c in checks)
    console.print(f"{server}: {'loads this adapter' if verdict else 'does not load this adapter as saved'}")
