"""The memory planner and `recommend` on configs built on the meta device (no weights)."""

from __future__ import annotations

import shlex

import pytest
from typer.testing import CliRunner

from deltatune.analysis.plan import GIB, plan_memory
from deltatune.analysis.recommend import recommend

LLAMA_7B = 6_738_415_616
LLAMA_7B_LINEARS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o and gate, up, down in 32 blocks


def test_llama_7b_table_full_lora_qlora():
    """The seeds' table to the right order (full ~120 GB, LoRA ~18 GB, QLoRA ~12 GB; 26 GB vs MBs of storage)."""
    full, lora, qlora = (plan_memory("llama-7b", m, targets=["q_proj", "v_proj"]) for m in ("full", "lora", "qlora"))
    assert full.total_params == LLAMA_7B and full.trainable_params == LLAMA_7B
    assert full.trainable_state == LLAMA_7B * (2 + 4 + 8)  # bf16 grads, fp32 master copy, two fp32 moments
    assert lora.trainable_params == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    assert lora.trainable_state == lora.trainable_params * 16  # fp32 value, grad and two moments
    assert lora.base_weights == LLAMA_7B * 2
    quant_bytes = LLAMA_7B_LINEARS * (0.5 + 1 / 64 + 4 / (64 * 256)) + (LLAMA_7B - LLAMA_7B_LINEARS) * 2
    assert abs(qlora.base_weights - quant_bytes) < 1e3
    assert 90 * GIB < full.peak < 130 * GIB and 12 * GIB < lora.peak < 20 * GIB and 5 * GIB < qlora.peak < 12 * GIB
    assert full.adapter_file_bytes == LLAMA_7B * 2 and lora.adapter_file_bytes == 4_194_304 * 4  # 13.5 GB vs 16.8 MB
    assert not full.fits(80) and lora.fits(24) and not lora.fits(16) and qlora.fits(16)


def test_activations_scale_with_the_batch_and_checkpointing_cuts_them():
    one, four = (plan_memory("llama-7b", "lora", batch=b, seq=256) for b in (1, 4))
    assert abs(four.activations / one.activations - 4) < 0.05
    checkpointed = plan_memory("llama-7b", "lora", batch=4, seq=256, gradient_checkpointing=True)
    assert checkpointed.activations < four.activations / 4
    largest = four.largest_batch(40)
    assert plan_memory("llama-7b", "lora", batch=largest, seq=256).fits(40)
    assert not plan_memory("llama-7b", "lora", batch=largest + 1, seq=256).fits(40)


def test_the_chunked_loss_holds_one_chunk_and_the_hidden_gradient():
    """llama-3-8b (vocabulary 128,256, hidden 4096), batch 2 x 1024, bf16: the full loss holds several copies of the
    (2048 x 128,256) logits; the chunked one a 32 MiB-of-fp32 chunk (fp32 + bf16), the hidden states' bf16 gradient
    and, for full fine-tuning, the head's fp32 gradient."""
    vocab, hidden, positions = 128_256, 4096, 2 * 1024
    rows = max(16, 32 * 2**20 // (4 * vocab))
    lora, full = (plan_memory("llama-3-8b", m, batch=2, seq=1024, chunked_loss=True) for m in ("lora", "full"))
    assert lora.logits_and_loss == rows * vocab * (4 + 2) + positions * hidden * 2
    assert full.logits_and_loss == lora.logits_and_loss + vocab * hidden * 4
    plain = plan_memory("llama-3-8b", "lora", batch=2, seq=1024)
    assert plain.logits_and_loss > 3 * positions * vocab * 2  # bf16 logits, their fp32 copy, gradient, log-softmax
    assert plain.peak - lora.peak == plain.logits_and_loss - lora.logits_and_loss


def test_any_registered_method_and_bad_input():
    ia3 = plan_memory("llama-7b", "ia3")
    assert ia3.trainable_params == 32 * (4096 + 4096 + 11008)  # k and v outputs, down_proj's input
    with pytest.raises(Exception, match="not a preset"):
        plan_memory("no-such-model")


def test_recommend_rules_and_its_command_is_a_valid_run_config():
    from deltatune.train import load_train_config

    few = recommend(50, "chat", "llama-7b")
    assert few.method == {"peft_type": "IA3"} and few.lr == pytest.approx(6e-4)
    mid = recommend(664, "chat", "llama-7b")
    assert mid.method["r"] == 8 and mid.steps == 415
    big = recommend(20_000, "chat", "llama-7b", budget_gb=16)
    assert big.method["target_modules"] == "all-linear" and big.quantize == "nf4" and big.gradient_checkpointing
    assert big.plan.fits(16)
    words = shlex.split(big.command("chat", None))
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = load_train_config(None, sets)
    assert cfg.method["r"] == 32 and cfg.optim.steps == big.steps and cfg.optim.gradient_checkpointing


def test_plan_and_recommend_commands():
    from deltatune.cli.app import app

    out = CliRunner().invoke(app, ["plan", "--model", "llama-7b", "--budget", "12"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "qlora" in out.output and "H100 80GB" in out.output and "budget 12 GB" in out.output
    out = CliRunner().invoke(app, ["recommend", "--examples", "5000", "--model", "llama-7b"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "all-linear" in out.output and "deltatune train" in out.output
