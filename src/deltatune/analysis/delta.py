"""`analyze_adapter`: per adapted module, what the adapter changed (its ΔW; math in `functional.subspace`).

Works for every method whose layers have a delta weight (`AdapterLayer.get_delta_weight`: the LoRA family, IA3,
LN tuning, selective methods); methods that cannot be expressed as a weight change (bottleneck adapters, ReFT) are
listed as skipped, with the reason. Weights are read as (d_out, d_in): GPT-2's Conv1D layout is transposed and a
convolution's kernel is flattened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.errors import DeltatuneError
from deltatune.functional.subspace import (
    amplification,
    effective_rank,
    input_subspace,
    numerical_rank,
    similarity_grid,
)
from deltatune.layers import AdapterLayer
from deltatune.models import linear_features, linear_types


@dataclass
class ModuleDelta:
    """ΔW of one adapted module."""

    module: str
    shape: tuple[int, int]
    rank: int
    effective_rank: float
    delta_norm: float
    relative_norm: float
    """‖ΔW‖_F / ‖W‖_F."""
    amplification: float
    singular_values: list[float] = field(repr=False)


@dataclass
class AdapterAnalysis:
    adapter: str
    modules: list[ModuleDelta]
    skipped: dict[str, str]
    """Module -> why it has no ΔW (e.g. a non-linear adapter)."""


def _as_out_in(layer: AdapterLayer, tensor: Tensor) -> Tensor:
    base = layer.get_base_layer()
    if isinstance(base, linear_types()) and linear_features(base)[2]:
        tensor = tensor.T  # Conv1D stores (d_in, d_out)
    return tensor.reshape(tensor.shape[0], -1).float()


def _base_weight(layer: AdapterLayer) -> Tensor:
    base = layer.get_base_layer()
    weight = base.weight
    if not weight.is_floating_point() and hasattr(base, "dequantize"):
        weight = base.dequantize()  # a 4-bit base: compare against what the layer computes with
    return weight.detach()


@torch.no_grad()
def analyze_adapter(model: nn.Module, adapter: str | None = None) -> AdapterAnalysis:
    """ΔW statistics of `adapter` (default: the active one) in every module of a PeftModel that has one."""
    adapter = adapter or model.active_adapter
    modules, skipped = [], {}
    for path, layer in model.get_base_model().named_modules():
        if not isinstance(layer, AdapterLayer) or adapter not in layer.adapter_names:
            continue
        try:
            delta = _as_out_in(layer, layer.get_delta_weight(adapter))
            weight = _as_out_in(layer, _base_weight(layer))
        except DeltatuneError as exc:
            skipped[path] = str(exc)
            continue
        except AttributeError:
            skipped[path] = f"{type(layer).__name__} has no weight to compare a change against"
            continue
        s = torch.linalg.svdvals(delta.double())
        norm, base_norm = float(torch.linalg.matrix_norm(delta)), float(torch.linalg.matrix_norm(weight))
        modules.append(
            ModuleDelta(
                module=path,
                shape=tuple(delta.shape),
                rank=numerical_rank(s),
                effective_rank=effective_rank(s),
                delta_norm=norm,
                relative_norm=norm / base_norm if base_norm > 0 else float("nan"),
                amplification=amplification(delta, weight) if norm > 0 else float("nan"),
                singular_values=s.tolist(),
            )
        )
    return AdapterAnalysis(adapter, modules, skipped)


@torch.no_grad()
def compare_subspaces(model_a: nn.Module, model_b: nn.Module, adapter_a: str | None = None,
                      adapter_b: str | None = None) -> dict[str, Tensor]:  # fmt: skip
    """Per module both adapters change: the grid φ(i, j) between their ΔW input subspaces (top-i vs top-j right
    singular vectors; `functional.subspace.similarity_grid`)."""
    adapter_a, adapter_b = adapter_a or model_a.active_adapter, adapter_b or model_b.active_adapter
    layers_b = dict(model_b.get_base_model().named_modules())
    grids = {}
    for path, layer in model_a.get_base_model().named_modules():
        other = layers_b.get(path)
        if not isinstance(layer, AdapterLayer) or not isinstance(other, AdapterLayer):
            continue
        try:
            delta_a = _as_out_in(layer, layer.get_delta_weight(adapter_a))
            delta_b = _as_out_in(other, other.get_delta_weight(adapter_b))
        except DeltatuneError:
            continue
        grids[path] = similarity_grid(input_subspace(delta_a), input_subspace(delta_b))
    return grids


def plot_analysis(analysis: AdapterAnalysis, out: Path, grids: dict[str, Tensor] | None = None) -> list[Path]:
    """PNGs: the normalized singular value spectra per module kind, the relative norm per block and module kind,
    and (with `grids`) subspace similarity heatmaps for up to 4 modules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    kinds: dict[str, list[ModuleDelta]] = {}
    for m in analysis.modules:
        kinds.setdefault(m.module.rsplit(".", 1)[-1], []).append(m)
    if kinds:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for kind, items in kinds.items():
            spectra = [torch.tensor(m.singular_values[:32]) for m in items]
            mean = torch.stack([s / s[0] if s[0] > 0 else s for s in spectra]).mean(0)
            axes[0].plot(range(1, len(mean) + 1), mean.tolist(), marker=".", label=kind)
            axes[1].plot(range(len(items)), [m.relative_norm for m in items], marker=".", label=kind)
        axes[0].set(title="ΔW singular values (normalized, mean over blocks)", xlabel="index", ylabel="σ_i / σ_1")
        axes[1].set(title="‖ΔW‖ / ‖W‖ per block", xlabel="block (in order)", ylabel="relative norm")
        for ax in axes:
            ax.legend()
        fig.tight_layout()
        written.append(out / "delta_spectra.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if grids:
        chosen = list(grids)[:: max(1, len(grids) // 4)][:4]
        fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.8), squeeze=False)
        for ax, path in zip(axes[0], chosen, strict=True):
            rows, cols = grids[path].shape  # ticks 1..k: φ(i, j) is 1-based
            image = ax.imshow(grids[path].numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto",
                              extent=(0.5, cols + 0.5, 0.5, rows + 0.5))  # fmt: skip
            ax.set(title=path.split("model.", 1)[-1], xlabel="j (other)", ylabel="i (this)")
        fig.colorbar(image, ax=axes[0].tolist(), label="φ(i, j)")
        written.append(out / "subspace_similarity.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
