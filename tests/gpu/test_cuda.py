"""CUDA paths: every method on the GPU against the same adapter on the CPU, the bitsandbytes 4-bit backend, paged
optimizers, and the trainer on one GPU (bf16 QLoRA runs). Skipped where no GPU is present (CI); run on a
GPU machine with `make test-gpu`."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import deltatune as dt
from deltatune.quant import Linear4bit
from tests.conftest import tiny_llama
from tests.contract.test_methods import METHOD_CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _loss(model, ids):
    return model(input_ids=ids).logits.float().pow(2).mean()


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_method_on_cuda_matches_cpu_forward_grads_merge_and_save(case, tmp_path):
    config = METHOD_CASES[case].make_config(TARGETS)
    torch.manual_seed(0)
    cpu = dt.get_peft_model(tiny_llama(), config).train()
    gpu = copy.deepcopy(cpu).cuda()
    _loss(cpu, IDS).backward()
    _loss(gpu, IDS.cuda()).backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)
    gpu.eval()
    with torch.no_grad():
        unmerged = gpu(input_ids=IDS.cuda()).logits
        gpu.merge_adapter()
        torch.testing.assert_close(gpu(input_ids=IDS.cuda()).logits, unmerged, rtol=1e-4, atol=1e-4)
        gpu.unmerge_adapter()
    gpu.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, unmerged.cpu(), rtol=1e-4, atol=1e-4)


def _train_on_cuda(model, steps: int, autocast: bool) -> list[float]:
    """AdamW steps on IDS with the per-step hook called; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = IDS.cuda(), []
    for step in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_bf16_autocast_training_steps_on_cuda_lower_the_loss(case):
    model = dt.get_peft_model(tiny_llama(), METHOD_CASES[case].make_config(TARGETS)).cuda().train()
    losses = _train_on_cuda(model, 5, autocast=True)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_4bit_layers_use_bitsandbytes_on_cuda_and_agree_with_the_torch_backend():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).cuda()
    auto = Linear4bit.from_linear(linear, dt.QuantConfig(compute_dtype="bf16"))
    plain = Linear4bit.from_linear(linear, dt.QuantConfig(compute_dtype="bf16", backend="torch"))
    assert auto.kernel_for(torch.empty(1, device="cuda")) == "bitsandbytes"
    assert torch.equal(auto.dequantize(), plain.dequantize())  # same bytes, whichever code dequantizes
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(auto(x), plain(x), rtol=2e-2, atol=2e-2)


def test_a_model_quantized_on_cpu_uses_bitsandbytes_once_on_cuda():
    pytest.importorskip("bitsandbytes")
    model = dt.quantize_model(tiny_llama(), dt.QuantConfig(compute_dtype="bf16")).cuda()
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    assert layer.kernel_for(torch.empty(1, device="cuda")) == "bitsandbytes"


def test_qlora_with_adalora_trains_on_a_4bit_cuda_base():
    model = dt.quantize_model(tiny_llama().cuda(), dt.QuantConfig(compute_dtype="bf16"))
    cuda_input = torch.empty(1, device="cuda")
    assert all(m.kernel_for(cuda_input) == "bitsandbytes" for m in model.modules() if isinstance(m, Linear4bit))
    peft_model = dt.get_peft_model(model, METHOD_CASES["ADALORA"].make_config(TARGETS)).train()
    losses = _train_on_cuda(peft_model, 6, autocast=False)
    assert losses[-1] < losses[0]


def _train_args(model_dir, tmp_path, *extra):
    return [
        f"model={model_dir}",
        f"output_dir={tmp_path / 'run'}",
        "optim.steps=8",
        "optim.batch_size=4",
        "optim.lr=5e-3",
        "data.max_length=200",
        "method.target_modules=[q_proj, v_proj, down_proj]",
        *extra,
    ]


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit", "adamw_offload"])
def test_qlora_run_with_paged_or_offloaded_optimizer_on_cuda(optimizer, tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from deltatune.train import load_train_config, train

    args = _train_args(tiny_model_dir, tmp_path, "quantize=nf4", "optim.precision=bf16", f"optim.optimizer={optimizer}")
    result = train(load_train_config(None, [*args, "log_every=1"]))
    losses = _losses(result.run_dir)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert next(result.model.parameters()).is_cuda


@pytest.mark.parametrize("case", ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT"])
def test_input_method_on_cuda_matches_cpu_forward_grads_and_generate(case):
    """Virtual tokens, prefixes (a DynamicCache built on the GPU) and adaption prompts: the same adapter on the GPU
    gives the CPU's logits and gradients, and greedy generate() the same tokens."""
    from tests.contract.test_input_methods import _make

    torch.manual_seed(0)
    cpu = _make(case, "llama").train()
    gpu = copy.deepcopy(cpu).cuda()
    _loss(cpu, IDS).backward()
    _loss(gpu, IDS.cuda()).backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)
    cpu.eval(), gpu.eval()
    want = cpu.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = gpu.generate(input_ids=IDS.cuda(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert got.shape == want.shape
    assert (got.cpu() == want).float().mean() > 0.9  # near-ties on a tiny random model may flip a token
