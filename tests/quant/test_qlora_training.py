"""QLoRA through the trainer and the optimizer options."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.app import app
from deltatune.quant import Linear4bit
from deltatune.quant.loading import load_quantized_causal_lm
from deltatune.train.optim import OffloadedAdamW, build_optimizer
from tests.conftest import tiny_causal_lm, tiny_llama


def test_streaming_4bit_load_equals_quantizing_the_loaded_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    streamed = load_quantized_causal_lm(tiny_model_dir, dt.QuantConfig(compute_dtype="fp32"))
    reference = dt.quantize_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), dt.QuantConfig(compute_dtype="fp32")
    )
    assert isinstance(streamed.model.layers[0].mlp.down_proj, Linear4bit)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_train_cli_with_quantize_nf4_lowers_the_loss(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--quantize",
            "nf4",
            f"--set=model={tiny_model_dir}",
            f"--set=output_dir={tmp_path / 'run'}",
            "--set=optim.steps=10",
            "--set=optim.batch_size=4",
            "--set=optim.lr=5e-3",
            "--set=data.max_length=200",
            "--set=optim.optimizer=adamw_offload",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_offloaded_adamw_steps_exactly_like_adamw():
    torch.manual_seed(0)
    models = [
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        for _ in range(2)
    ]
    opts = [
        build_optimizer(models[0], 1e-2, 0.01, None, "adamw"),
        build_optimizer(models[1], 1e-2, 0.01, None, "adamw_offload"),
    ]
    assert isinstance(opts[1], OffloadedAdamW)
    ids = torch.randint(0, 97, (2, 6))
    for _ in range(3):
        for model, opt in zip(models, opts, strict=True):
            model(input_ids=ids).logits.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    assert all(s["exp_avg"].device.type == "cpu" for s in opts[1].state_dict()["state"].values())


@pytest.mark.parametrize("loraplus_ratio", [None, 4.0])
def test_trainer_adamw_is_fused_and_steps_like_torchs_reference_loop(loraplus_ratio):
    torch.manual_seed(0)
    models = [
        dt.get_peft_model(
            tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], 1e-2, 0.01, loraplus_ratio, "adamw")
    assert all(group["fused"] for group in fused.param_groups)
    groups = [{k: v for k, v in g.items() if k not in ("params", "fused")} for g in fused.param_groups]
    names = {id(p): n for n, p in models[0].named_parameters()}
    twin = dict(models[1].named_parameters())
    for group, fused_group in zip(groups, fused.param_groups, strict=True):
        group["params"] = [twin[names[id(p)]] for p in fused_group["params"]]
    loop = torch.optim.AdamW(groups, foreach=False)  # torch's reference implementation, one parameter at a time
    ids = torch.randint(0, 97, (2, 6))
    for _ in range(3):
        for model, opt in zip(models, (fused, loop), strict=True):
            model(input_ids=ids).logits.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal is what is tested")
def test_paged_optimizers_need_cuda():
    model = dt.get_peft_model(tiny_causal_lm(50), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="needs"):
        build_optimizer(model, 1e-3, 0.0, None, "paged_adamw_8bit")
