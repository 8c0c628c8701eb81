"""DoRA: the formula computed densely, detached-norm gradients, exact merge, paper parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.functional.lora import dropout_keep_mask
from deltatune.methods.lora_layer import LoraLinear, lora_layer_kwargs
from tests.conftest import tiny_mlp


def _dora_layer(base: nn.Module) -> LoraLinear:
    layer = LoraLinear(base)
    cfg = dt.LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["x"])
    layer.add_adapter("default", **lora_layer_kwargs(cfg, "x"))
    layer.set_active(["default"])
    with torch.no_grad():  # a non-trivial state: random B and a perturbed magnitude
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, layer.out_features))
    return layer


def _reference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """m · (W0 + s B A) x / ‖W0 + s B A‖_row + b with the norm detached, computed densely."""
    w0 = layer.weight_out_in()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    combined = w0 + 2.0 * b @ a
    norm = combined.norm(dim=1).detach()
    weight = (layer.lora_magnitude_vector["default"] / norm)[:, None] * combined
    return x @ weight.T + layer.base_layer.bias


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_gradients_match_the_detached_norm_formula(kind):
    torch.manual_seed(0)
    base = nn.Linear(10, 7) if kind == "linear" else Conv1D(7, 10)
    with torch.no_grad():
        base.bias.normal_()
    layer = _dora_layer(base)
    x = torch.randn(2, 4, 10, requires_grad=True)
    layer.base_layer.bias.requires_grad_(True)  # a trained base bias (bias="all") gets its gradient too
    got, want = layer(x), _reference(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]]
    params += [x, layer.base_layer.bias]
    g = torch.randn_like(got)
    for ours, theirs in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_dropout_recomputes_the_base_term_on_the_dropped_input(with_bias):
    """With dropout (training), y = W0 x + b + (k - 1) W0 x_d + k s B A x_d, k = m / ‖W0 + s B A‖ (peft's form),
    x_d the dropped input: values and every gradient against that expression written out."""
    torch.manual_seed(1)
    layer = _dora_layer(nn.Linear(10, 7, bias=with_bias))
    layer.dropout_p["default"] = 0.3
    layer.train()
    x = torch.randn(3, 5, 10, requires_grad=True)
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)  # the same seed, drawn as the layer draws it: the same (hash) mask
    seed = int(torch.randint(0, 2**31, (1,)).item())
    dropped = x * dropout_keep_mask(x.shape, 0.3, seed, x.device) / 0.7
    assert 0.6 < (dropped != 0).float().mean() < 0.8
    w0, a, b = layer.weight_out_in(), layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"]
    k = magnitude / (w0 + 2.0 * b @ a).norm(dim=1).detach()
    want = layer.base_layer(x) + (k - 1) * (dropped @ w0.T) + k * (dropped @ a.T @ b.T * 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    params = [x, a, b, magnitude]
    for ours, theirs in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dora_gradients_equal_peft_on_a_model(tmp_path):
    """peft's DoRA adapter (perturbed), loaded into deltatune: the same loss gives the same gradients."""
    peft = pytest.importorskip("peft")
    from tests.conftest import perturb_trainable, tiny_llama

    ids = torch.tensor([[3, 8, 1, 9, 4, 2]])
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    theirs = peft.get_peft_model(tiny_llama(), config)
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    grads = {}
    for name, model in (("deltatune", ours), ("peft", theirs)):
        model.eval()  # no dropout masks to line up
        model(input_ids=ids, labels=ids).loss.backward()
        named = {n.replace("magnitude_vector.default.weight", "magnitude_vector.default"): p  # peft: a module
                 for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
        grads[name] = {n: p.grad for n, p in named.items()}
    assert sorted(grads["deltatune"]) == sorted(grads["peft"])
    for name, grad in grads["peft"].items():
        torch.testing.assert_close(grads["deltatune"][name], grad, rtol=1e-4, atol=1e-6)


def test_magnitude_starts_at_the_weight_norm_so_the_output_is_unchanged():
    base = nn.Linear(8, 5)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=2, lora_alpha=2, variant="use_dora")
    layer.set_active(["default"])
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], base.weight.norm(dim=1))
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


def test_merge_unmerge_exact_and_equal_outputs():
    torch.manual_seed(0)
    base = nn.Linear(12, 9)
    layer = _dora_layer(base)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 12)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert (base.weight - w0).abs().max() <= 1e-6


def test_eval_norm_is_cached_until_the_adapter_changes():
    layer = _dora_layer(nn.Linear(6, 4)).eval()
    x = torch.randn(2, 6)
    with torch.no_grad():
        first = layer(x)
        assert "default" in layer.adapter_cache
        layer.lora_B["default"].weight.add_(1.0)  # in-place update bumps the version: the cache must not be reused
        torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer(x), first)


def test_conv_and_embedding_magnitudes_have_peft_shapes_and_start_at_the_weight_norm():
    model = tiny_mlp()
    inputs = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    want = model(inputs)
    pm = dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["emb", "conv", "conv1d"], use_dora=True))
    magnitude = {
        n: m.lora_magnitude_vector["default"]
        for n, m in pm.get_base_model().named_children()
        if hasattr(m, "lora_magnitude_vector")
    }
    assert magnitude["conv"].shape == (1, 4, 1, 1) and magnitude["conv1d"].shape == (1, 16, 1)
    emb = pm.get_base_model().emb.base_layer.weight
    torch.testing.assert_close(magnitude["emb"], emb.norm(dim=0))  # per embedding dim, over the vocabulary
    torch.testing.assert_close(pm(inputs), want, rtol=1e-5, atol=1e-5)  # B = 0 (A = 0 for embeddings): unchanged


def test_dora_on_an_unsupported_layer_is_a_typed_error_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    from deltatune.methods.lora_layer import LORA_VARIANTS, LoraLinear

    variants = dict(LORA_VARIANTS["use_dora"])
    del LORA_VARIANTS["use_dora"][LoraLinear]
    try:
        with pytest.raises(dt.UnsupportedModuleError, match="use_dora is not supported on Linear"):
            dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    finally:
        LORA_VARIANTS["use_dora"] = variants
    assert type(model[0]) is torch.nn.Linear


def test_llama_7b_counts_from_the_dora_paper():
    """LLaMA-7B, r=32 on q,k,v,up,down: LoRA 56,098,816 and DoRA 56,975,360 trainable (paper_facts.md §3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    counts = {}
    for use_dora in (False, True):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        peft_model = dt.get_peft_model(model, dt.LoraConfig(r=32, target_modules=targets, use_dora=use_dora))
        counts[use_dora] = peft_model.get_nb_trainable_parameters()[0]
    assert counts == {False: 56_098_816, True: 56_975_360}


def _dora_llama(seed: int):
    from tests.conftest import tiny_llama

    model = tiny_llama()
    torch.manual_seed(seed)
    cfg = dt.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return model, cfg


def test_reloading_an_adapter_under_a_deleted_name_uses_its_own_norm(tmp_path):
    """Regression: the eval-mode norm cache survived delete_adapter and served adapter "a"'s old norm to a new "a"
    loaded the same way (same tensor version counters)."""
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    for seed in (1, 2):
        model, cfg = _dora_llama(seed)
        dt.get_peft_model(model, cfg).save_pretrained(tmp_path / f"adapter{seed}")
    with torch.no_grad():
        want = dt.PeftModel.from_pretrained(_dora_llama(0)[0], tmp_path / "adapter2")(input_ids=ids).logits
    model, cfg = _dora_llama(3)
    pm = dt.get_peft_model(model, cfg, adapter_name="keep")  # holds the wrappers while "a" comes and goes
    pm.load_adapter(tmp_path / "adapter1", adapter_name="a")
    pm.set_adapter("a")
    pm.eval()
    with torch.no_grad():
        pm(input_ids=ids)  # fills the cache for "a"
    pm.delete_adapter("a")
    pm.load_adapter(tmp_path / "adapter2", adapter_name="a")
    pm.set_adapter("a")
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_moving_the_model_drops_the_cached_norm():
    layer = _dora_layer(nn.Linear(6, 4)).eval()
    x = torch.randn(2, 6)
    with torch.no_grad():
        layer(x)
        assert layer.adapter_cache
        layer.double()
        assert not layer.adapter_cache
        got = layer(x.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(layer, x.double()), rtol=1e-6, atol=1e-6)
    assert layer.adapter_cache["default"][1].dtype == torch.float32  # recomputed from the moved tensors


class _Three(nn.Module):
    """One embedding, one conv and one linear layer, each the target of several adapters at once."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8, 6)

    def forward(self, ids):
        h = self.emb(ids)
        return self.lin(self.conv(h.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("target", ["emb", "conv", "lin"])
def test_several_active_dora_adapters_merge_to_their_forward_which_is_peft_s(target):
    """Each DoRA adapter normalises by the unmerged base's norm ‖W0 + ΔW‖_c in the forward; merged in turn (a
    plain LoRA among them, merged in place), each must use that norm too, not the weight's that already holds the
    earlier ones. The forward is peft's on the same tensors."""
    peft = pytest.importorskip("peft")
    from peft.utils import set_peft_model_state_dict

    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    models = {}
    for lib in (dt, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(_Three().eval(), lib.LoraConfig(target_modules=[target], init_lora_weights=False,
                                                                   use_dora=True), adapter_name="a0")  # fmt: skip
        model.add_adapter("plain", lib.LoraConfig(target_modules=[target], init_lora_weights=False))
        model.add_adapter("a1", lib.LoraConfig(target_modules=[target], init_lora_weights=False, use_dora=True))
        (model.base_model if lib is peft else model).set_adapter(["a0", "plain", "a1"])
        models[lib] = model.eval()
    ours, theirs = models[dt], models[peft]
    for name in ("a0", "plain", "a1"):
        state = {k.removeprefix("base_model.model."): v for k, v in ours.adapter_state_dict(name).items()}
        set_peft_model_state_dict(theirs, state, adapter_name=name)
    with torch.no_grad():
        want = ours(ids)
        torch.testing.assert_close(want, theirs(ids), rtol=1e-5, atol=1e-5)
        ours.merge_adapter()
        torch.testing.assert_close(ours(ids), want, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(ids), want, rtol=0, atol=0)
