"""QLoRA: LoRA on a 4-bit base equals LoRA on the dequantized weights; only the adapter trains; peft layout."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.layers import AdapterLayer
from deltatune.quant import Linear4bit, merge_and_dequantize
from tests.conftest import model_output, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def _qlora(double_quant=True, quant_type="nf4"):
    model = dt.quantize_model(
        tiny_llama(), dt.QuantConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype="fp32")
    )
    torch.manual_seed(1)
    return dt.get_peft_model(model, dt.LoraConfig(**LORA))


def _dense_twin(qlora: dt.PeftModel) -> dt.PeftModel:
    """The same LoRA on an fp32 model whose linear weights are the 4-bit model's dequantized weights."""
    dense = tiny_llama()
    torch.manual_seed(1)
    twin = dt.get_peft_model(dense, dt.LoraConfig(**LORA))
    with torch.no_grad():
        quantized = dict(qlora.get_base_model().named_modules())
        for name, module in dense.named_modules():
            if isinstance(quantized.get(name), Linear4bit):
                module.weight.copy_(quantized[name].dequantize())
    twin.load_adapter_tensors("default", qlora.adapter_state_dict("default"))
    return twin


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_model_replaces_linears_but_keeps_head_and_embeddings(quant_type):
    model = dt.quantize_model(tiny_llama(), dt.QuantConfig(quant_type=quant_type))
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.embed_tokens"] == "Embedding"
    assert kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_forward_equals_lora_on_dequantized_weights(double_quant):
    qlora = _qlora(double_quant)
    torch.testing.assert_close(model_output(qlora, IDS), model_output(_dense_twin(qlora), IDS), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_adapter_and_no_dense_weight_is_saved():
    qlora = _qlora()
    qlora.train()
    shapes = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.add(tuple(t.shape)) or t, lambda t: t):
        loss = model_output(qlora, IDS).float().pow(2).mean()
    loss.backward()
    grads = {n for n, p in qlora.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert (48, 32) not in shapes and (32, 48) not in shapes  # no dequantized MLP weight kept for backward


def test_adapter_on_4bit_base_saves_in_peft_layout_and_reloads(tmp_path):
    qlora = _qlora()
    want = model_output(qlora, IDS)
    qlora.save_pretrained(tmp_path)
    fresh = dt.quantize_model(tiny_llama(), dt.QuantConfig(compute_dtype="fp32"))
    torch.testing.assert_close(model_output(dt.PeftModel.from_pretrained(fresh, tmp_path), IDS), want, rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    twin_base = _dense_twin(qlora).unload()  # the fp32 model with the dequantized weights, no adapter
    theirs = peft.PeftModel.from_pretrained(twin_base, tmp_path).eval()
    torch.testing.assert_close(model_output(theirs, IDS), want, rtol=1e-5, atol=1e-5)


def test_merge_paths_requantize_or_dequantize():
    qlora = _qlora()
    want = model_output(qlora, IDS)
    merged = merge_and_dequantize(_qlora())  # exact: dequantize to fp32, then merge
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    torch.testing.assert_close(model_output(merged, IDS), want, rtol=1e-4, atol=1e-4)
    # into the 4-bit weights: each merged weight is W + s·B·A re-quantized with the layer's own format (docs/qlora.md)
    from deltatune.quant import dequantize_4bit, quantize_4bit

    expected = {}
    for name, module in qlora.get_base_model().named_modules():
        if isinstance(module, AdapterLayer):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            exact = module.base_layer.dequantize() + (LORA["lora_alpha"] / LORA["r"]) * b @ a
            expected[name] = dequantize_4bit(quantize_4bit(exact.detach(), "nf4", 64, True))
    qlora.merge_adapter()
    for name, module in qlora.get_base_model().named_modules():
        if name in expected:
            assert torch.equal(module.base_layer.dequantize(), expected[name]), name
    twin = tiny_llama()  # a dense model holding exactly those weights (and the other 4-bit ones) gives the same outputs
    with torch.no_grad():
        for name, module in qlora.get_base_model().named_modules():
            if isinstance(module, Linear4bit):
                twin.get_submodule(name.removesuffix(".base_layer")).weight.copy_(module.dequantize())
    torch.testing.assert_close(model_output(qlora, IDS), model_output(twin, IDS), rtol=1e-5, atol=1e-5)


def test_linear_weights_take_at_most_4_2_bits_per_parameter():
    for double_quant, limit in ((True, 4.2), (False, 4.6)):
        model = dt.quantize_model(tiny_llama(), dt.QuantConfig(double_quant=double_quant))
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        bits = sum(m.state().nbytes() for m in layers) * 8 / sum(m.in_features * m.out_features for m in layers)
        assert bits <= limit, (double_quant, bits)


def test_bitsandbytes_backend_matches_torch_backend():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    ours = Linear4bit.from_linear(linear, dt.QuantConfig(compute_dtype="fp32", backend="torch"))
    theirs = Linear4bit.from_linear(
        linear, dt.QuantConfig(compute_dtype="fp32", backend="bitsandbytes", double_quant=False)
    )
    x = torch.randn(3, 128)
    torch.testing.assert_close(
        theirs(x),
        Linear4bit.from_linear(linear, dt.QuantConfig(compute_dtype="fp32", double_quant=False))(x),
        rtol=1e-4,
        atol=1e-4,
    )
    assert ours(x).shape == (3, 64)


def test_parameter_report_counts_4bit_weights_like_dense_ones():
    def count(model):
        return dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["q_proj"])).get_nb_trainable_parameters()

    assert count(dt.quantize_model(tiny_llama())) == count(tiny_llama())


def test_dora_on_a_4bit_base_equals_dora_on_the_dequantized_weights():
    def build(quantized: bool):
        model = tiny_llama()
        if quantized:
            dt.quantize_model(model, dt.QuantConfig(compute_dtype="fp32"))
        torch.manual_seed(1)
        return dt.get_peft_model(model, dt.LoraConfig(**LORA, use_dora=True))

    qdora, dense = build(True), build(False)
    with torch.no_grad():
        quantized = dict(qdora.get_base_model().named_modules())
        for name, module in dense.get_base_model().named_modules():
            if isinstance(quantized.get(name), Linear4bit):
                module.weight.copy_(quantized[name].dequantize())
    dense.load_adapter_tensors("default", qdora.adapter_state_dict("default"))
    torch.testing.assert_close(model_output(qdora, IDS), model_output(dense, IDS), rtol=1e-5, atol=1e-5)


def test_casting_the_model_keeps_the_quantization_constants():
    """Regression: model.to(bfloat16) cast absmax / scale / offset too, shifting every dequantized weight."""
    model = dt.quantize_model(tiny_llama(), dt.QuantConfig(compute_dtype="fp32"))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    before = [m.dequantize() for m in layers]
    dtypes = [{n: t.dtype for n, t in m.weight_state().items()} for m in layers]
    model.to(torch.bfloat16)
    assert [{n: t.dtype for n, t in m.weight_state().items()} for m in layers] == dtypes
    for layer, want in zip(layers, before, strict=True):
        assert torch.equal(layer.dequantize(), want)
    model.half().float()
    assert all(torch.equal(m.dequantize(), w) for m, w in zip(layers, before, strict=True))


def test_auto_backend_is_chosen_per_call():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), dt.QuantConfig(compute_dtype="fp32"))
    assert layer.backend == "auto"
    assert layer.kernel_for(torch.randn(2, 64)) == "torch"  # CPU input: pure PyTorch, whatever is installed


def test_merge_unmerge_into_a_4bit_base_restores_its_stored_bytes():
    model = dt.quantize_model(tiny_llama(), dt.QuantConfig(compute_dtype="fp32"))
    stored = {n: t.clone() for n, t in model.state_dict().items()}
    torch.manual_seed(1)
    pm = dt.get_peft_model(model, dt.LoraConfig(**LORA))
    for _ in range(3):
        pm.merge_adapter()
        pm.unmerge_adapter()
    after = {k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in stored.items())


@pytest.mark.parametrize("reentrant", [True, False])
def test_prepare_model_for_kbit_training_then_lora_trains(reentrant):
    """peft's recipe with our 4-bit layers: frozen, 16-bit leftovers in float32, checkpointing on, and a LoRA on top
    trains (its gradients equal a plain run's: checkpointing only recomputes)."""
    grads = []
    for prepare in (False, True):
        model = dt.quantize_model(tiny_llama(), dt.QuantConfig(compute_dtype="fp32")).to(torch.bfloat16)
        if prepare:
            dt.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        else:
            model.float()
        torch.manual_seed(1)
        pm = dt.get_peft_model(model, dt.LoraConfig(**LORA)).train()
        pm(**IDS, labels=IDS["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)
