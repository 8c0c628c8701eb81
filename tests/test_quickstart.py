"""The quickstart on the real SmolLM2-135M-Instruct: a tiny smoke run by default, the full run marked slow."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deltatune.cli.app import app
from tests.conftest import perturb_trainable


def _quickstart(tmp_path, steps: int, examples: int, *overrides: str):
    pytest.importorskip("gguf")
    args = ["quickstart", "--steps", str(steps), "--eval-examples", str(examples), "--out", str(tmp_path / "qs")]
    result = CliRunner().invoke(app, [*args, *(arg for o in overrides for arg in ("--set", o))])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.timeout(300)  # ~10 s on one thread of the fast machine; about 3x that on the slow one
def test_quickstart_smoke(tmp_path):
    """The quickstart command end to end on the real weights, every phase kept but each small (the run's length,
    the held-out loss and the generation budgets come from `--set`, which the smoke checks too)."""
    small = ["optim.batch_size=2", "data.eval_limit=4", "max_new_tokens=4", "general_max_new_tokens=4"]
    out = _quickstart(tmp_path, 2, 2, *small)
    assert "quickstart: LoRA on SmolLM2-135M-Instruct, 2 steps" in out
    assert "scored by generation" in out and "held-out: before vs after (misses first)" in out
    assert "unseen phrasings" in out and "general questions" in out
    assert (tmp_path / "qs" / "adapter" / "adapter_model.safetensors").exists()
    metrics = [json.loads(line) for line in (tmp_path / "qs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2
    assert any("eval_loss" in m for m in metrics)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole quickstart: ~4 min on the fast machine, up to 10 on a slow one
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
@pytest.mark.timeout(1800)
def test_qlora_quickstart_learns_the_task(tmp_path):
    from deltatune.train import load_train_config, train

    cfg = load_train_config(
        None, [f"output_dir={tmp_path / 'qs'}", "generate_eval=64", "max_new_tokens=12", "quantize=nf4"]
    )
    result = train(cfg)
    assert result.metric_before <= 0.1 and result.metric_after >= 0.9


def test_readme_merge_command_writes_a_model_that_answers_like_the_adapter(tmp_path):
    """Regression: `deltatune merge --model smollm2 ...` (as the README shows it) failed, since the cached model's
    config kept the GGUF quantization_config of its source."""
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.pretrained import load_causal_lm

    adapter = tmp_path / "adapter"  # the quickstart's kind of adapter, moved off zero (no run needed for a merge)
    trained = dt.get_peft_model(load_causal_lm("smollm2")[0], dt.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(trained, scale=0.02)
    trained.save_pretrained(adapter)
    result = CliRunner().invoke(
        app, ["merge", "--model", "smollm2", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]
    )
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in merged.config.to_dict()
    base, tokenizer = load_causal_lm("smollm2")
    with_adapter = dt.PeftModel.from_pretrained(base, adapter)
    ids = tokenizer("Rewrite as ISO date: the 3rd of March 1999", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        want = with_adapter.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(merged.generate(ids, max_new_tokens=8, do_sample=False), want)
