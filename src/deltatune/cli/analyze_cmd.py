"""`deltatune analyze ADAPTER [--base DIR] [--other ADAPTER2]`: what an adapter changed, per module (ΔW)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError


def load_adapted(adapter: Path, base: str | None) -> object:
    """The adapter on its base: `base`, else the config's base_model_name_or_path when it exists here, else the
    bundled model of its task (smollm2; minilm for SEQ_CLS, with the run's labels.json)."""
    from deltatune.model import PeftModel
    from deltatune.pretrained import load_causal_lm, load_sequence_classifier

    config = AdapterConfig.from_pretrained(adapter)
    recorded = config.base_model_name_or_path
    classifier = str(config.task_type or "").upper().endswith("SEQ_CLS")
    source = base or (recorded if recorded and Path(recorded).exists() else ("minilm" if classifier else "smollm2"))
    if classifier:
        labels_file = adapter / "labels.json"
        if not labels_file.is_file():
            raise ConfigError(f"{adapter} is a classification adapter without labels.json (written by train).")
        model, _ = load_sequence_classifier(source, json.loads(labels_file.read_text()))
    else:
        model, _ = load_causal_lm(source)
    return PeftModel.from_pretrained(model, adapter)


def analyze_command(adapter: Path, base: str | None, other: Path | None, out: Path, console: Console) -> None:
    from deltatune.analysis.delta import analyze_adapter, compare_subspaces, plot_analysis

    model = load_adapted(adapter, base)
    analysis = analyze_adapter(model)
    if not analysis.modules:
        reasons = sorted(set(analysis.skipped.values())) or ["the adapter adapts no module"]
        raise ConfigError(f"{adapter}: no module has a weight change to analyze ({reasons[0]}).")
    grids = compare_subspaces(model, load_adapted(other, base)) if other else None
    kinds: dict[str, list] = {}
    for m in analysis.modules:
        kinds.setdefault(m.module.rsplit(".", 1)[-1], []).append(m)
    table = Table(title=f"ΔW of {adapter} per module kind (mean over {len(analysis.modules)} modules)")
    for col in ("module", "count", "shape", "rank", "effective rank", "‖ΔW‖/‖W‖", "amplification"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for kind, items in kinds.items():
        table.add_row(
            kind, str(len(items)), "x".join(map(str, items[0].shape)),
            f"{statistics.mean(m.rank for m in items):.1f}",
            f"{statistics.mean(m.effective_rank for m in items):.2f}",
            f"{statistics.mean(m.relative_norm for m in items):.4f}",
            f"{statistics.mean(m.amplification for m in items):.1f}",
        )  # fmt: skip
    console.print(table)
    if grids:
        sims = Table(
            title=f"subspace similarity with {other}: φ(1, 1) and φ(r, r) (1 = same directions, 0 = orthogonal)"
        )
        for col in ("module", "φ(1,1)", "φ(r,r)"):
            sims.add_column(col)
        for path, grid in list(grids.items())[:: max(1, len(grids) // 8)]:
            k = min(grid.shape)
            sims.add_row(path, f"{grid[0, 0]:.3f}", f"{grid[k - 1, k - 1]:.3f}")
        console.print(sims)
    out.mkdir(parents=True, exist_ok=True)
    record = {"adapter": str(adapter), "modules": [asdict(m) for m in analysis.modules], "skipped": analysis.skipped}
    if grids:
        record["subspace_similarity"] = {k: v.tolist() for k, v in grids.items()}
    (out / "analysis.json").write_text(json.dumps(record, indent=1))
    pictures = plot_analysis(analysis, out, grids)
    console.print(f"written: {out / 'analysis.json'}, " + ", ".join(str(p) for p in pictures))
    if analysis.skipped:
        console.print(f"{len(analysis.skipped)} modules have no ΔW: {next(iter(analysis.skipped.values()))}")
