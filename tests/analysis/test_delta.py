"""analyze_adapter and `deltatune analyze` on tiny models: values against the adapter's own tensors."""

from __future__ import annotations

import torch

import deltatune as dt
from deltatune.analysis.delta import analyze_adapter, compare_subspaces, plot_analysis
from tests.conftest import perturb_trainable, tiny_gpt2, tiny_llama


def test_lora_delta_statistics_equal_the_adapter_tensors():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model)
    analysis = analyze_adapter(model)
    assert len(analysis.modules) == 4 and not analysis.skipped
    q = next(m for m in analysis.modules if m.module == "model.layers.0.self_attn.q_proj")
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = (2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()  # (alpha/r) BA
    w = layer.base_layer.weight.detach().double()
    assert q.rank == 2 and q.shape == (32, 32)
    assert abs(q.delta_norm - float(torch.linalg.matrix_norm(delta))) < 1e-5
    assert abs(q.relative_norm - float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(w))) < 1e-6
    assert torch.allclose(
        torch.tensor(q.singular_values[:2], dtype=torch.float64), torch.linalg.svdvals(delta)[:2], atol=1e-5
    )


def test_conv1d_is_read_as_out_in_and_non_linear_adapters_are_skipped(tmp_path):
    gpt2 = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2, target_modules=["c_attn"]))
    perturb_trainable(gpt2)
    shapes = {m.shape for m in analyze_adapter(gpt2).modules}
    assert shapes == {(96, 32)}  # c_attn maps 32 -> 3 x 32
    bottleneck = dt.get_peft_model(tiny_llama(), dt.BottleneckConfig())
    analysis = analyze_adapter(bottleneck)
    assert not analysis.modules and all("non-linear" in why for why in analysis.skipped.values())


def test_subspace_grid_between_two_adapters_and_plots(tmp_path):
    torch.manual_seed(0)
    a = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_trainable(a)
    grids = compare_subspaces(a, a)  # an adapter against itself: the same directions
    grid = grids["model.layers.0.self_attn.q_proj"]
    assert grid.shape == (4, 4) and torch.allclose(torch.diagonal(grid), torch.ones(4, dtype=torch.float64))
    written = plot_analysis(analyze_adapter(a), tmp_path, grids)
    assert [p.name for p in written] == ["delta_spectra.png", "subspace_similarity.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_analyze_command_prints_and_writes(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from deltatune.cli.app import app
    from deltatune.pretrained import load_causal_lm

    base, _ = load_causal_lm(tiny_model_dir)
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "a")
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "a"), "--base", str(tiny_model_dir),
                                      "--other", str(tmp_path / "a"), "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.output and "amplification" in result.output and "1.000" in result.output
    assert (tmp_path / "out" / "analysis.json").is_file() and (tmp_path / "out" / "delta_spectra.png").is_file()
