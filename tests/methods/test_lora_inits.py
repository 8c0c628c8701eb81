"""LoRA options beyond the default: the orthogonal, PiSSA (full and randomized SVD) and OLoRA inits, saving a
base-rewriting adapter relative to the original base, and lora_bias; peft as the oracle for the same options."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.functional.init import mica_factors, olora_factors, orthogonal_factors, pissa_factors
from deltatune.functional.lora import relative_to_initial
from tests.conftest import model_output, tiny_bert, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _weight(d_out=12, d_in=9, seed=0):
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


def test_pissa_factors_hold_the_best_rank_r_part_scaled():
    weight, r, scale = _weight(), 3, 0.5
    lora_a, lora_b = pissa_factors(weight, r, scale)
    singular = torch.linalg.svdvals(weight)
    # Eckart-Young: the residual of the best rank-r approximation has the tail singular values' energy
    residual = weight - scale * lora_b @ lora_a
    torch.testing.assert_close(residual.square().sum(), singular[r:].square().sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lora_a @ lora_a.T, torch.diag(singular[:r] / scale), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lora_b.T @ lora_b, torch.diag(singular[:r] / scale), rtol=1e-4, atol=1e-5)
    # randomized SVD (peft's pissa_niter_N) finds the same part where the spectrum has a clear gap after r
    u, _ = torch.linalg.qr(_weight(12, 12, seed=1))
    v, _ = torch.linalg.qr(_weight(9, 9, seed=2))
    spectrum = torch.tensor([10.0, 8.0, 6.0, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001])
    gapped = u[:, :9] @ torch.diag(spectrum) @ v.T
    fast_a, fast_b = pissa_factors(gapped, r, scale, niter=4)
    exact_a, exact_b = pissa_factors(gapped, r, scale)
    torch.testing.assert_close(fast_b @ fast_a, exact_b @ exact_a, rtol=1e-3, atol=1e-3)


def test_olora_factors_are_orthonormal_b_and_triangular_a():
    weight, r = _weight(), 4
    lora_a, lora_b = olora_factors(weight, r)
    torch.testing.assert_close(lora_b.T @ lora_b, torch.eye(r), rtol=1e-5, atol=1e-5)
    assert torch.all(torch.tril(lora_a[:, :r], diagonal=-1) == 0)
    torch.testing.assert_close((lora_b @ lora_a)[:, :r], weight[:, :r], rtol=1e-5, atol=1e-5)  # W = QR


def test_orthogonal_factors_multiply_to_zero_and_relative_pair_subtracts():
    torch.manual_seed(0)
    lora_a, lora_b = orthogonal_factors(9, 12, 4)
    assert lora_a.shape == (4, 9) and lora_b.shape == (12, 4) and lora_a.abs().sum() > 0 and lora_b.abs().sum() > 0
    torch.testing.assert_close(lora_b @ lora_a, torch.zeros(12, 9), rtol=0, atol=1e-6)
    a, b, a0, b0 = (torch.randn(*s) for s in [(3, 9), (12, 3), (3, 9), (12, 3)])
    new_a, new_b = relative_to_initial(a, b, a0, b0)
    torch.testing.assert_close(new_b @ new_a, b @ a - b0 @ a0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "orthogonal"])
def test_inits_keep_the_output_and_match_peft(init):
    peft = pytest.importorskip("peft")
    base_output = model_output(tiny_llama(), IDS)
    ours = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    )
    torch.testing.assert_close(model_output(ours, IDS), base_output, rtol=1e-4, atol=1e-5)
    if init in ("orthogonal", "pissa_niter_4"):  # random factors: the output check above and non-zero factors
        layer = ours.get_base_model().model.layers[0].self_attn.q_proj
        assert layer.lora_A["default"].weight.abs().sum() > 0 and layer.lora_B["default"].weight.abs().sum() > 0
        return
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    )
    mine, their_state = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == their_state.keys()
    for key, value in mine.items():  # factors and the rewritten (residual) base weights alike
        torch.testing.assert_close(value, their_state[key], rtol=1e-4, atol=1e-5, msg=key)


def _trained_pissa(init="pissa"):
    model = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    )
    return model


def _perturb(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))


def test_pissa_adapter_moves_both_ways_and_converts_to_plain_lora_on_the_original_base(tmp_path):
    peft = pytest.importorskip("peft")
    original_output = model_output(tiny_llama(), IDS)
    model = _trained_pissa()
    # peft's documented flow: save the initial adapter as a plain init, train, save relative to it
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "pissa"
    _perturb(model)
    trained_output = model_output(model, IDS)
    assert not torch.allclose(trained_output, original_output, atol=1e-3)

    model.save_pretrained(tmp_path / "pissa")  # needs the init replayed on load (as peft does)
    reloaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "pissa")
    torch.testing.assert_close(model_output(reloaded, IDS), trained_output, rtol=1e-4, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "pissa"))
    torch.testing.assert_close(model_output(theirs, IDS), trained_output, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = dt.LoraConfig.from_pretrained(tmp_path / "lora")
    assert (config.init_lora_weights, config.r, config.lora_alpha) == (True, 8, 16)
    plain = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")  # the original base, untouched
    torch.testing.assert_close(model_output(plain, IDS), trained_output, rtol=1e-4, atol=1e-5)
    theirs_plain = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    torch.testing.assert_close(model_output(theirs_plain, IDS), trained_output, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain.merge_adapter()
    torch.testing.assert_close(model_output(plain, IDS), trained_output, rtol=1e-4, atol=1e-5)


def test_peft_saved_olora_adapter_loads_here(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora")
    )
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(model_output(ours, IDS), model_output(theirs, IDS), rtol=1e-4, atol=1e-5)


def test_refused_inits_and_a_refused_load_leaves_the_base_unchanged(tmp_path):
    with pytest.raises(dt.UnsupportedFieldError, match="eva"):
        dt.LoraConfig(init_lora_weights="eva")
    with pytest.raises(dt.UnsupportedFieldError, match="use_dora"):
        dt.LoraConfig(init_lora_weights="pissa", use_dora=True)
    with pytest.raises(dt.ConfigError, match="even"):
        dt.LoraConfig(r=3, init_lora_weights="orthogonal")
    with pytest.raises(dt.UnsupportedModuleError, match="linear"):
        dt.get_peft_model(tiny_bert(), dt.LoraConfig(target_modules=["word_embeddings"], init_lora_weights="pissa"))
    # a PiSSA adapter saved for rank 4, loaded under a rank-2 config: refused before the init touches the base
    _trained_pissa().save_pretrained(tmp_path)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    wrong = dt.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    with pytest.raises(dt.CheckpointError):
        dt.PeftModel.from_pretrained(base, tmp_path, config=wrong)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(dt.UnsupportedArgumentError, match="VERA"):
        vera = dt.get_peft_model(tiny_llama(), dt.VeraConfig(r=4, target_modules=["q_proj"]))
        vera.save_pretrained(tmp_path / "v", path_initial_model_for_weight_conversion=tmp_path)


def test_lora_bias_adds_scaled_bias_merges_into_the_base_bias_and_unmerges_exactly():
    from tests.conftest import tiny_gpt2

    model = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_bias=True))
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert layer.lora_B["default"].bias.requires_grad and not layer.lora_B["default"].bias.any()  # zero at start
    _perturb(model)
    x = torch.randn(3, 32)
    a, b, bias = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    expected = layer.base_layer(x) + 2.0 * (x @ a.T @ b.T + bias)  # s = alpha / r = 2
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    original_bias = layer.base_layer.bias.detach().clone()
    unmerged = model_output(model, IDS)
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, original_bias + 2.0 * bias.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model_output(model, IDS), unmerged, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.bias, original_bias)
    with pytest.raises(dt.UnsupportedModuleError, match="lora_bias"):
        dt.get_peft_model(tiny_bert(), dt.LoraConfig(target_modules=["word_embeddings"], lora_bias=True))
    with pytest.warns(dt.PeftWarning, match="`lora_bias=True` was passed but the targeted layer of type Linear"):
        no_bias = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    weight = no_bias.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="bias"):  # a MergeError, and a RuntimeError as peft raises here
        no_bias.merge_adapter()
    assert torch.equal(no_bias.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, weight)


def _nf4(weight):
    from deltatune.functional.nf4 import dequantize_blockwise_4bit, quantize_blockwise_4bit

    return dequantize_blockwise_4bit(*quantize_blockwise_4bit(weight, "nf4", 64), weight.shape, "nf4", 64)


def test_loftq_factors_fit_what_quantization_lost():
    from deltatune.functional.init import loftq_factors

    weight, r = _weight(32, 64), 4
    quantized, lora_a, lora_b = loftq_factors(weight, r, 1, _nf4)
    torch.testing.assert_close(quantized, _nf4(weight))  # one iteration: Q = quantize(W)
    lost = weight - quantized
    singular = torch.linalg.svdvals(lost)  # Eckart-Young on what the quantization lost
    remaining = (lost - lora_b @ lora_a).square().sum()
    torch.testing.assert_close(remaining, singular[r:].square().sum(), rtol=1e-4, atol=1e-6)
    quantized2, a2, b2 = loftq_factors(weight, r, 2, _nf4)
    torch.testing.assert_close(quantized2, _nf4(weight - lora_b @ lora_a))  # Q_2 = quantize(W - B_1 A_1)


def test_loftq_model_starts_closer_to_the_base_than_plain_nf4_and_the_base_requantizes_exactly():
    original = tiny_llama()
    config = dt.LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=TARGETS,
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": 2},
    )
    model = dt.get_peft_model(tiny_llama(), config)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    base = layer.get_base_layer().weight.detach()
    torch.testing.assert_close(_nf4(base), base)  # NF4 values already: quantize_model stores exactly this
    plain = original.model.layers[0].self_attn.q_proj.weight.detach()
    adapted = base + layer.get_delta_weight("default")
    assert (adapted - plain).norm() < (_nf4(plain) - plain).norm()
    # then store the base in 4 bits: the LoftQ values come back exactly, and the adapter stays full precision
    # (regression: quantize_model used to turn the adapters' own lora_A / lora_B linears into 4-bit layers too)
    from deltatune.quant import QuantConfig

    dt.quantize_model(model.get_base_model(), QuantConfig(double_quant=False))
    assert torch.equal(layer.base_weight.float(), base) and type(layer.lora_A["default"]) is torch.nn.Linear
    assert layer.lora_A["default"].weight.requires_grad
    with pytest.raises(dt.UnsupportedFieldError, match="8-bit"):
        dt.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    with pytest.raises(dt.ConfigError, match="loftq_config"):
        dt.LoraConfig(loftq_config={"loftq_bits": 4})
    quantized = dt.quantize_model(tiny_llama())
    with pytest.raises(dt.UnsupportedModuleError, match="full-precision"):
        dt.get_peft_model(quantized, dt.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq"))


def test_mica_factors_span_the_minor_output_directions():
    weight, r = _weight(), 3
    lora_a, lora_b = mica_factors(weight, r)
    assert torch.equal(lora_a, torch.zeros(r, weight.shape[1]))
    torch.testing.assert_close(lora_b.T @ lora_b, torch.eye(r), rtol=1e-5, atol=1e-5)  # orthonormal columns
    # the columns' energy under Wᵀ is exactly the r smallest singular values' (a subspace property, sign-free)
    smallest = torch.linalg.svdvals(weight)[-r:]
    torch.testing.assert_close((weight.T @ lora_b).square().sum(), smallest.square().sum(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="r <= min"):
        mica_factors(weight, 10)


def test_mica_trains_only_a_matches_peft_and_keeps_b_fixed_through_switches(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    targets = ["q_proj", "down_proj", "embed_tokens"]
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=targets, init_lora_weights="mica"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets,
                                                                       init_lora_weights="mica"))  # fmt: skip
    ours_saved = {k: v.clone() for k, v in dt.get_peft_model_state_dict(ours).items()}
    theirs_saved = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if "lora_" in k}
    assert ours_saved.keys() == theirs_saved.keys()
    for key in ours_saved:
        torch.testing.assert_close(ours_saved[key], theirs_saved[key], rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_embedding_A" in n for n in trainable)
    ours.set_adapter("default")
    ours.set_requires_grad("default")
    with ours.disable_adapter():
        pass
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(model_output(ours, IDS), model_output(base, IDS))  # A = 0: the base's output
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(**IDS, labels=IDS["input_ids"]).loss.backward()
    opt.step()
    after = dt.get_peft_model_state_dict(ours)
    assert all(torch.equal(after[k], ours_saved[k]) for k in after if "lora_B" in k or "lora_embedding_B" in k)
    assert any(not torch.equal(after[k], ours_saved[k]) for k in after if "lora_A" in k)
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(model_output(reloaded, IDS), model_output(ours.eval(), IDS), rtol=1e-5, atol=1e-5)


def test_mica_refuses_layers_and_ranks_it_cannot_serve():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(dt.UnsupportedModuleError, match="linear and embedding"):
        dt.get_peft_model(conv, dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights="mica"))
    small = torch.nn.Sequential(torch.nn.Linear(3, 5))
    with pytest.raises(dt.UnsupportedModuleError, match="r <= min"):
        dt.get_peft_model(small, dt.LoraConfig(r=4, target_modules=["0"], init_lora_weights="mica"))
    assert type(small[0]) is torch.nn.Linear
