"""The contract matrix: every registered method x every tiny model gets the same checks (STYLE.md rule 9).

A method joins by adding a row to METHOD_CASES: a config factory and its closed-form trainable count. A check a
method cannot meet is opted out by name, with the reason, in `skip`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import pytest
import torch

import deltatune as dt
from deltatune.layers import AdapterLayer
from tests.conftest import TINY_MODELS, model_output


def _lora_count(model: dt.PeftModel, adapter: str) -> int:
    """Σ over adapted layers of r·(d_in + d_out) (embedding: r·(vocab + dim); conv: r·(c_in·k + c_out))."""
    total = 0
    for module in model.modules():
        if isinstance(module, AdapterLayer) and adapter in module.adapter_names:
            w = module.base_weight
            r = module.r[adapter]
            if w.dim() > 2:
                total += r * (w[0].numel() + w.shape[0])
            else:
                total += r * (w.shape[0] + w.shape[1])
    return total


@dataclass
class MethodCase:
    peft_type: str
    make_config: callable
    trainable: callable
    skip: dict[str, str] = field(default_factory=dict)
    """tiny model name -> why this case does not run on it"""
    not_additive: str | None = None
    """why several active adapters do not equal their composed merge (the check is skipped, with this reason)"""


def _dora_count(model: dt.PeftModel, adapter: str) -> int:
    """LoRA's count plus one magnitude per output feature of each adapted layer (an embedding's features are its
    dims; a conv's its output channels)."""
    from deltatune.methods.lora import LoraConv, LoraEmbedding

    def features(m):
        if isinstance(m, LoraEmbedding):
            return m.base_weight.shape[1]
        return m.base_weight.shape[0] if isinstance(m, LoraConv) else m.out_features

    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and adapter in m.adapter_names]
    return _lora_count(model, adapter) + sum(features(m) for m in layers)


def _gralora_count(model: dt.PeftModel, adapter: str) -> int:
    """(r + hybrid_r) · (d_in + d_out) per adapted layer: LoRA's count at the same total rank."""
    return sum(
        (m.r[adapter] + m.hybrid_r[adapter]) * (m.in_features + m.out_features)
        for m in model.modules()
        if isinstance(m, AdapterLayer) and adapter in m.adapter_names
    )


def _vera_count(model: dt.PeftModel, adapter: str) -> int:
    """r + d_out per adapted layer (the shared projections are frozen buffers)."""
    return sum(
        m.vera_lambda_d[adapter].numel() + m.out_features
        for m in model.modules()
        if isinstance(m, AdapterLayer) and adapter in m.adapter_names
    )


def _adalora_count(model: dt.PeftModel, adapter: str) -> int:
    """init_r · (d_in + d_out + 1) per adapted matrix (A, B and the singular values E)."""
    return sum(
        m.r[adapter] * (m.in_features + m.out_features + 1)
        for m in model.modules()
        if isinstance(m, AdapterLayer) and adapter in m.adapter_names
    )


METHOD_CASES: dict[str, MethodCase] = {
    "ADALORA": MethodCase(
        "ADALORA",
        make_config=lambda targets, **kw: dt.AdaLoraConfig(
            init_r=4, target_r=2, lora_alpha=0.5, total_step=10, target_modules=targets, init_lora_weights=False, **kw
        ),
        trainable=_adalora_count,
        skip={"mlp": "AdaLoRA wraps Linear, Conv1D and Conv2d layers; the custom model also targets embedding/Conv1d"},
    ),
    "LORA": MethodCase(
        "LORA",
        make_config=lambda targets, **kw: dt.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw
        ),
        trainable=_lora_count,
    ),
    "LORA+dora": MethodCase(
        "LORA",
        make_config=lambda targets, **kw: dt.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=True, **kw
        ),
        trainable=_dora_count,
        not_additive="each active DoRA adapter renormalises the output of the ones before it (as in peft)",
    ),
    "GRALORA": MethodCase(
        "GRALORA",
        make_config=lambda targets, **kw: dt.GraloraConfig(
            r=4, alpha=8, gralora_k=2, hybrid_r=2, target_modules=targets, init_weights=False, **kw
        ),
        trainable=_gralora_count,
        skip={"mlp": "GraLoRA wraps Linear and Conv1D layers; the custom model targets conv and embedding layers"},
    ),
    "VERA": MethodCase(
        "VERA",
        make_config=lambda targets, **kw: dt.VeraConfig(r=8, target_modules=targets, init_weights=False, **kw),
        trainable=_vera_count,
        skip={"mlp": "VeRA wraps Linear and Conv1D layers; the custom model targets conv and embedding layers"},
    ),
}

METHODS = [spec.peft_type for spec in dt.list_methods()]


def test_every_registered_method_has_a_contract_case():
    covered = {case.peft_type for case in METHOD_CASES.values()}
    assert set(METHODS) <= covered, f"add a MethodCase for {set(METHODS) - covered}"


@pytest.fixture(params=sorted(METHOD_CASES))
def method(request, tiny):
    case = METHOD_CASES[request.param]
    if tiny[0] in case.skip:
        pytest.skip(case.skip[tiny[0]])
    return case


def _wrapped(model):
    return {n: m for n, m in model.base_model.named_modules() if isinstance(m, AdapterLayer)}


def _reference(factory, peft_model, names):
    """A fresh copy of the base whose target weights are set to the composed (dense) weights."""
    ref = factory()
    with torch.no_grad():
        for path, layer in _wrapped(peft_model).items():
            w = layer.base_weight.detach().float()
            for name in names:
                w = layer.compose(name, w)
            ref.get_submodule(path).weight.copy_(w)
    return ref


def test_forward_equals_dense_formula(tiny, method):
    name, model, targets, inputs = tiny
    pm = dt.get_peft_model(model, method.make_config(targets))
    ref = _reference(TINY_MODELS[name][0], pm, ["default"])
    torch.testing.assert_close(model_output(pm, inputs), model_output(ref, inputs), rtol=1e-5, atol=1e-5)


def test_merge_unmerge_restores_base_and_merged_equals_unmerged(tiny, method):
    _, model, targets, inputs = tiny
    before = copy.deepcopy(model.state_dict())
    pm = dt.get_peft_model(model, method.make_config(targets))
    unmerged = model_output(pm, inputs)
    pm.merge_adapter()
    torch.testing.assert_close(model_output(pm, inputs), unmerged, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    after = {k.replace(".base_layer", ""): v for k, v in pm.base_model.state_dict().items()}
    for key, value in before.items():
        assert (after[key] - value).abs().max() <= 1e-6, key


def test_merge_and_unload_gives_plain_model_with_same_output(tiny, method):
    _, model, targets, inputs = tiny
    plain_types = {n: type(m) for n, m in model.named_modules()}
    pm = dt.get_peft_model(model, method.make_config(targets))
    want = model_output(pm, inputs)
    merged = pm.merge_and_unload()
    assert {n: type(m) for n, m in merged.named_modules()} == plain_types
    torch.testing.assert_close(model_output(merged, inputs), want, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_only_adapter_tensors_saved(tiny, method, tmp_path):
    name, model, targets, inputs = tiny
    pm = dt.get_peft_model(model, method.make_config(targets))
    want = model_output(pm, inputs)
    pm.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable * 4 <= os.path.getsize(weights) <= trainable * 4 + 64 * 1024
    loaded = dt.PeftModel.from_pretrained(TINY_MODELS[name][0](), tmp_path)
    torch.testing.assert_close(model_output(loaded, inputs), want, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode unless is_trainable=True


def test_disable_gives_base_output(tiny, method):
    name, model, targets, inputs = tiny
    base_out = model_output(model, inputs)
    pm = dt.get_peft_model(model, method.make_config(targets))
    assert not torch.allclose(model_output(pm, inputs), base_out)
    with pm.disable_adapter():
        torch.testing.assert_close(model_output(pm, inputs), base_out, rtol=0, atol=0)


def test_two_adapters_coexist_switch_and_sum(tiny, method):
    name, model, targets, inputs = tiny
    pm = dt.get_peft_model(model, method.make_config(targets))
    torch.manual_seed(5)
    pm.add_adapter("b", method.make_config(targets))
    out_a = model_output(pm, inputs)
    pm.set_adapter("b")
    out_b = model_output(pm, inputs)
    torch.testing.assert_close(
        out_b, model_output(_reference(TINY_MODELS[name][0], pm, ["b"]), inputs), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(out_a, out_b)
    if method.not_additive is None:
        pm.set_adapter(["default", "b"])
        both = model_output(pm, inputs)
        torch.testing.assert_close(
            both, model_output(_reference(TINY_MODELS[name][0], pm, ["default", "b"]), inputs), rtol=1e-5, atol=1e-5
        )
    pm.delete_adapter("b")
    torch.testing.assert_close(model_output(pm, inputs), out_a, rtol=0, atol=0)


def test_trainable_count_equals_closed_form(tiny, method):
    _, model, targets, _ = tiny
    pm = dt.get_peft_model(model, method.make_config(targets))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == method.trainable(pm, "default") > 0
    assert total == sum(p.numel() for p in model.parameters())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".base_layer." in n or "lora_" not in n for n in frozen)


def test_training_step_moves_only_adapter(tiny, method):
    _, model, targets, inputs = tiny
    pm = dt.get_peft_model(model, method.make_config(targets))
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    model_output(pm, inputs).float().pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
