"""The quickstart on the real SmolLM2-135M-Instruct: a tiny smoke run by default, the full run marked slow."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from deltatune.cli.app import app


def _quickstart(tmp_path, steps: int, examples: int):
    pytest.importorskip("gguf")
    result = CliRunner().invoke(
        app, ["quickstart", "--steps", str(steps), "--eval-examples", str(examples), "--out", str(tmp_path / "qs")]
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_quickstart_smoke(tmp_path):
    out = _quickstart(tmp_path, steps=2, examples=2)
    assert "held-out exact match" in out and "before vs after" in out
    assert (tmp_path / "qs" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_full_quickstart_learns_the_task(tmp_path):
    from deltatune.train import load_train_config, train

    cfg = load_train_config(None, [f"output_dir={tmp_path / 'qs'}", "generate_eval=64", "max_new_tokens=12"])
    result = train(cfg)
    assert result.metric_before <= 0.1 and result.metric_after >= 0.9


def test_tour_checks_merge_and_round_trip(tmp_path):
    pytest.importorskip("gguf")
    result = CliRunner().invoke(app, ["tour", "--steps", "2", "--out", str(tmp_path / "tour")])
    assert result.exit_code == 0, result.output
    assert "921,600 (ok)" in result.output and "save -> load logits" in result.output


@pytest.mark.slow
def test_qlora_quickstart_learns_the_task(tmp_path):
    from deltatune.train import load_train_config, train

    cfg = load_train_config(
        None, [f"output_dir={tmp_path / 'qs'}", "generate_eval=64", "max_new_tokens=12", "quantize=nf4"]
    )
    result = train(cfg)
    assert result.metric_before <= 0.1 and result.metric_after >= 0.9
