"""The contract matrix: every registered method x every tiny model gets the same checks (STYLE.md rule 9).

A method joins by adding a row to METHOD_CASES: a config factory and its closed-form trainable count. A check a
method cannot meet is opted out by name, with the reason, in `skip`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.layers import AdapterLayer
from tests.conftest import TINY_MODELS, model_output

# -- independent truth: shapes of the plain base modules, the papers' formulas, the papers' parameter counts --------
# Everything below reads only the config values a case sets and fresh (never wrapped) base modules, so a bug in a
# layer (a wrong scale, a transposed factor, a missing parameter) cannot hide in its own reference.


def _dims(module: nn.Module) -> tuple[str, int, int, tuple[int, ...]]:
    """(kind, d_in, d_out, kernel) of a plain module: linear (nn.Linear / GPT-2 Conv1D), conv or embedding."""
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim, ()
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", module.in_channels, module.out_channels, tuple(module.kernel_size)
    if isinstance(module, Conv1D):
        return "linear", module.weight.shape[0], module.weight.shape[1], ()
    return "linear", module.in_features, module.out_features, ()


def _as_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A stored weight as (d_out, d_in, ...); an embedding table stays (vocab, dim)."""
    return weight.T if isinstance(module, Conv1D) else weight


R, ALPHA = 4, 8  # LoRA / DoRA cases: s = alpha / r
ADA_R, ADA_ALPHA = 4, 0.5  # AdaLoRA: s = alpha / (init_r + 1e-5) (peft's ranknum denominator)
GRA_R, GRA_HYBRID, GRA_K, GRA_ALPHA = 4, 2, 2, 8  # GraLoRA: s = alpha / (r + hybrid_r)
VERA_R = 8


def _lora_delta(layer, name, module) -> torch.Tensor:
    """s · B A (Hu et al. §4.1) as (d_out, d_in, ...); an embedding's ΔE = s · (B A)ᵀ, shape (vocab, dim)."""
    s = ALPHA / R
    if isinstance(module, nn.Embedding):
        return s * (layer.lora_embedding_B[name] @ layer.lora_embedding_A[name]).T
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)  # a conv's A carries the kernel, B is 1x1
    return s * delta.reshape(b.shape[0], *a.shape[1:])


def _lora_dense(layer, name, module, w):
    return w + _lora_delta(layer, name, module)


def _dora_dense(layer, name, module, w):
    """W' = m · (W + ΔW) / ‖W + ΔW‖ per output feature (Liu et al. §4); an embedding's features are its dims."""
    combined = w + _lora_delta(layer, name, module)
    m = layer.lora_magnitude_vector[name].reshape(-1)
    if isinstance(module, nn.Embedding):
        return combined * (m / combined.norm(dim=0))[None, :]
    norm = combined.reshape(combined.shape[0], -1).norm(dim=1)
    return combined * (m / norm).reshape(-1, *([1] * (combined.dim() - 1)))


def _adalora_dense(layer, name, module, w):
    """W + P Λ Q · alpha / (init_r + 1e-5) (Zhang et al. §3.1; peft's scale)."""
    delta = layer.lora_B[name] @ (layer.lora_E[name] * layer.lora_A[name])
    return w + (ADA_ALPHA / (ADA_R + 1e-5)) * delta.reshape(w.shape)


def _gralora_dense(layer, name, module, w):
    """Block (j, n) of ΔW is B_j[n-th rank slice]ᵀ · A_n[:, j-th rank slice]ᵀ (Jung et al. §3), plus the hybrid
    plain-LoRA part, times alpha / (r + hybrid_r)."""
    a, b = layer.gralora_A[name], layer.gralora_B[name]  # (k, d_in/k, r), (k, r, d_out/k)
    sub = GRA_R // GRA_K
    delta = torch.zeros_like(w)
    rows, cols = w.shape[0] // GRA_K, w.shape[1] // GRA_K
    for j in range(GRA_K):
        for n in range(GRA_K):
            block = b[j, n * sub : (n + 1) * sub, :].T @ a[n, :, j * sub : (j + 1) * sub].T
            delta[j * rows : (j + 1) * rows, n * cols : (n + 1) * cols] = block
    delta = delta + layer.gralora_B_general[name].weight @ layer.gralora_A_general[name].weight
    return w + GRA_ALPHA / (GRA_R + GRA_HYBRID) * delta


def _vera_dense(layer, name, module, w):
    """W + Λ_b B Λ_d A with A, B the shared frozen projections cut to the layer's size (Kopiczko et al. §3)."""
    shared = layer.shared[name]
    a, b = shared.vera_A[:, : w.shape[1]], shared.vera_B[: w.shape[0], :]
    return w + torch.diag(layer.vera_lambda_b[name]) @ b @ torch.diag(layer.vera_lambda_d[name]) @ a


def _ia3_dense(layer, name, module, w):
    """diag(l) W: each output row scaled (Liu et al. 2022 §3.3; the contract's targets are all non-feed-forward)."""
    return layer.ia3_l[name].reshape(-1, 1) * w


def _ia3_dense_bias(layer, name, module, b):
    """l ⊙ b: an output scale multiplies the layer's whole output, bias included."""
    return layer.ia3_l[name].flatten() * b


def _copy_dense(layer, name, module, w):
    """LN tuning: the layer runs its adapter's trained copy, so the weight is the copy's."""
    return _as_out_in(module, layer.ln_tuning_layers[name].weight.detach().float())


def _copy_dense_bias(layer, name, module, b):
    return layer.ln_tuning_layers[name].bias.detach().float()


def _copy_saved(module) -> dict[str, tuple[int, ...]]:
    return {f"ln_tuning_layers.{k}": tuple(v.shape) for k, v in module.named_parameters()}


def _selected_dense(layer, name, module, w):
    """Selective: the module runs with its trained copies of its own parameters."""
    return _as_out_in(module, layer.selective_params[name]["weight"].detach().float())


def _selected_dense_bias(layer, name, module, b):
    return layer.selective_params[name]["bias"].detach().float()


def _lora_saved(module) -> dict[str, tuple[int, ...]]:
    kind, d_in, d_out, kernel = _dims(module)
    if kind == "embedding":
        return {"lora_embedding_A": (R, d_in), "lora_embedding_B": (d_out, R)}
    return {"lora_A.weight": (R, d_in, *kernel), "lora_B.weight": (d_out, R, *([1] * len(kernel)))}


def _dora_saved(module) -> dict[str, tuple[int, ...]]:
    kind, _, d_out, kernel = _dims(module)
    magnitude = (1, d_out, *([1] * len(kernel))) if kind == "conv" else (d_out,)
    return {**_lora_saved(module), "lora_magnitude_vector": magnitude}


def _adalora_saved(module) -> dict[str, tuple[int, ...]]:
    _, d_in, d_out, kernel = _dims(module)
    return {"lora_A": (ADA_R, d_in * math.prod(kernel)), "lora_E": (ADA_R, 1), "lora_B": (d_out, ADA_R)}


def _gralora_saved(module) -> dict[str, tuple[int, ...]]:
    _, d_in, d_out, _ = _dims(module)
    return {
        "gralora_A": (GRA_K, d_in // GRA_K, GRA_R),
        "gralora_B": (GRA_K, GRA_R, d_out // GRA_K),
        "gralora_A_general.weight": (GRA_HYBRID, d_in),
        "gralora_B_general.weight": (d_out, GRA_HYBRID),
    }


def _vera_saved(module) -> dict[str, tuple[int, ...]]:
    return {"vera_lambda_b": (_dims(module)[2],), "vera_lambda_d": (VERA_R,)}


def _vera_shared(modules) -> dict[str, tuple[int, ...]]:
    """peft saves the projections once, sized for the largest adapted layer (save_projection=True)."""
    return {
        "base_model.vera_A": (VERA_R, max(_dims(m)[1] for m in modules)),
        "base_model.vera_B": (max(_dims(m)[2] for m in modules), VERA_R),
    }


def _lora_count(module) -> int:
    """r · (d_in·k + d_out) per adapted matrix (an embedding: r · (vocab + dim))."""
    _, d_in, d_out, kernel = _dims(module)
    return R * (d_in * math.prod(kernel) + d_out)


def _dora_count(module) -> int:
    """LoRA's count plus one magnitude per output feature."""
    return _lora_count(module) + _dims(module)[2]


def _adalora_count(module) -> int:
    """init_r · (d_in + d_out + 1) per adapted matrix (P, Q and the singular values Λ)."""
    _, d_in, d_out, kernel = _dims(module)
    return ADA_R * (d_in * math.prod(kernel) + d_out + 1)


def _gralora_count(module) -> int:
    """(r + hybrid_r) · (d_in + d_out): LoRA's count at the same total rank."""
    _, d_in, d_out, _ = _dims(module)
    return (GRA_R + GRA_HYBRID) * (d_in + d_out)


def _vera_count(module) -> int:
    """r + d_out per adapted layer (the shared projections are frozen)."""
    return VERA_R + _dims(module)[2]


@dataclass
class MethodCase:
    peft_type: str
    make_config: callable
    dense: callable
    """(layer, adapter, plain module, W as (d_out, d_in, ...)) -> the adapted weight, from the paper's formula"""
    count: callable
    """plain module -> trainable parameters the method adds for it (closed form)"""
    saved: callable
    """plain module -> {saved key suffix: shape}"""
    shared_saved: callable = lambda modules: {}
    mlp_targets: list[str] | None = None
    """targets on the custom model for methods that wrap fewer layer types than LoRA"""
    not_additive: str | None = None
    """why several active adapters do not equal their composed merge (the check is skipped, with this reason)"""
    dense_bias: callable = None
    """(layer, adapter, plain module, bias) -> the adapted bias, for methods that change it"""
    starts_at_base: bool = False
    """the method has no random init (its adapter equals the base at creation): the checks move it off first"""
    skip: dict = None
    """check name -> why the method cannot meet it (the check is skipped with that reason)"""


REFT_R = 2

METHOD_CASES: dict[str, MethodCase] = {
    "ADALORA": MethodCase(
        "ADALORA",
        make_config=lambda targets, **kw: dt.AdaLoraConfig(
            init_r=ADA_R,
            target_r=2,
            lora_alpha=ADA_ALPHA,
            total_step=10,
            target_modules=targets,
            init_lora_weights=False,
            **kw,
        ),
        dense=_adalora_dense,
        count=_adalora_count,
        saved=_adalora_saved,
        mlp_targets=["conv", "lin0", "lin1"],
    ),
    "LORA": MethodCase(
        "LORA",
        make_config=lambda targets, **kw: dt.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False, **kw
        ),
        dense=_lora_dense,
        count=_lora_count,
        saved=_lora_saved,
    ),
    "LORA+dora": MethodCase(
        "LORA",
        make_config=lambda targets, **kw: dt.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False, use_dora=True, **kw
        ),
        dense=_dora_dense,
        count=_dora_count,
        saved=_dora_saved,
        not_additive="each active DoRA adapter renormalises the output of the ones before it (as in peft)",
    ),
    "GRALORA": MethodCase(
        "GRALORA",
        make_config=lambda targets, **kw: dt.GraloraConfig(
            r=GRA_R,
            alpha=GRA_ALPHA,
            gralora_k=GRA_K,
            hybrid_r=GRA_HYBRID,
            target_modules=targets,
            init_weights=False,
            **kw,
        ),
        dense=_gralora_dense,
        count=_gralora_count,
        saved=_gralora_saved,
        mlp_targets=["lin0", "lin1"],
    ),
    "IA3": MethodCase(
        "IA3",
        make_config=lambda targets, **kw: dt.IA3Config(
            target_modules=targets, feedforward_modules=[], init_ia3_weights=False, **kw
        ),
        dense=_ia3_dense,
        dense_bias=_ia3_dense_bias,
        count=lambda module: _dims(module)[2],  # one scale per output
        saved=lambda module: {"ia3_l": (_dims(module)[2], 1)},
        mlp_targets=["lin0", "lin1"],
    ),
    "LN_TUNING": MethodCase(
        "LN_TUNING",
        make_config=lambda targets, **kw: dt.LNTuningConfig(target_modules=targets, **kw),
        dense=_copy_dense,
        dense_bias=_copy_dense_bias,
        count=lambda module: sum(p.numel() for p in module.parameters()),  # the whole copy trains
        saved=_copy_saved,
        mlp_targets=["lin0", "lin1"],
        not_additive="one copy runs at a time: several active adapters are refused",
        starts_at_base=True,
    ),
    "SELECTIVE": MethodCase(
        "SELECTIVE",
        make_config=lambda targets, **kw: dt.SelectiveConfig(
            select_modules=targets, train_parameters=["weight", "bias"], **kw
        ),
        dense=_selected_dense,
        dense_bias=_selected_dense_bias,
        count=lambda module: sum(p.numel() for p in module.parameters()),  # the selected modules train whole
        saved=lambda module: {k: tuple(v.shape) for k, v in module.named_parameters()},
        mlp_targets=["lin0", "lin1"],
        not_additive="each adapter replaces the same parameters: one runs at a time",
        starts_at_base=True,
    ),
    "BOTTLENECK": MethodCase(
        "BOTTLENECK",
        make_config=lambda targets, **kw: dt.BottleneckConfig(target_modules=targets, reduction_factor=4, **kw),
        dense=None,
        count=lambda module: (lambda d: 2 * d * (d // 4) + d // 4 + d)(_dims(module)[2]),  # 2dm + m + d
        saved=lambda module: (
            lambda d: {
                "bottleneck_down.weight": (d // 4, d),
                "bottleneck_down.bias": (d // 4,),
                "bottleneck_up.weight": (d, d // 4),
                "bottleneck_up.bias": (d,),
            }
        )(_dims(module)[2]),  # fmt: skip
        mlp_targets=["lin0", "lin1"],
        starts_at_base=True,
        skip={
            "dense": "non-linear: no weight formula (tests/methods/test_bottleneck.py checks the forward itself)",
            "merge": "non-linear: merging is refused (tests/methods/test_bottleneck.py checks the error)",
        },
    ),
    "REFT": MethodCase(
        "REFT",
        make_config=lambda targets, **kw: dt.ReftConfig(target_modules=targets, r=REFT_R, positions="f2+l2", **kw),
        dense=None,
        count=lambda module: 2 * _dims(module)[2] * REFT_R + REFT_R,  # 2dr + r per intervention
        saved=lambda module: (
            lambda d: {
                "reft_interventions.all.learned_source.weight": (REFT_R, d),
                "reft_interventions.all.learned_source.bias": (REFT_R,),
                "reft_interventions.all.rotate.parametrizations.weight.original": (REFT_R, d),
            }
        )(_dims(module)[2]),  # fmt: skip
        mlp_targets=["lin0", "lin1"],
        skip={
            "dense": "edits hidden states at positions: no weight formula (tests/methods/test_reft.py checks it)",
            "merge": "position-dependent: merging is refused (tests/methods/test_reft.py checks the error)",
        },
    ),
    "VERA": MethodCase(
        "VERA",
        make_config=lambda targets, **kw: dt.VeraConfig(r=VERA_R, target_modules=targets, init_weights=False, **kw),
        dense=_vera_dense,
        count=_vera_count,
        saved=_vera_saved,
        shared_saved=_vera_shared,
        mlp_targets=["lin0", "lin1"],
    ),
}

METHODS = [spec.peft_type for spec in dt.list_methods()]


def test_every_registered_method_has_a_contract_case():
    from tests.contract.test_input_methods import INPUT_CASES  # methods that wrap no chosen targets: own contract

    covered = {case.peft_type for case in METHOD_CASES.values()} | set(INPUT_CASES)
    assert set(METHODS) <= covered, f"add a MethodCase for {set(METHODS) - covered}"


@pytest.fixture(params=sorted(METHOD_CASES))
def method(request):
    return METHOD_CASES[request.param]


@pytest.fixture
def tiny_for(tiny, method):
    """(model name, fresh model, targets this method supports there, inputs)."""
    name, model, targets, inputs = tiny
    if name == "mlp" and method.mlp_targets is not None:
        targets = method.mlp_targets
    return name, model, targets, inputs


def _skip_if(method, check):
    if method.skip and check in method.skip:
        pytest.skip(method.skip[check])


def _move_off_base(pm, method, name="default"):
    """For a method whose fresh adapter computes the base exactly, a random step away from it (as training would)."""
    if method.starts_at_base:
        g = torch.Generator().manual_seed(7 if name == "default" else 11)
        with torch.no_grad():
            for layer in _wrapped(pm).values():
                for p in layer.adapter_parameters(name):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _make(model, method, targets):
    pm = dt.get_peft_model(model, method.make_config(targets))
    _move_off_base(pm, method)
    return pm


def _wrapped(model):
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)}


def _plain_targets(factory, targets) -> dict[str, nn.Module]:
    """The modules of a fresh, never-wrapped model that `targets` (name suffixes) name."""
    return {n: m for n, m in factory().named_modules() if any(n == t or n.endswith("." + t) for t in targets)}


def _reference(factory, peft_model, method, names):
    """A fresh base whose target weights are the paper's formula applied to the adapter tensors (independent of the
    layers' own merge code)."""
    ref = factory()
    with torch.no_grad():
        for path, layer in _wrapped(peft_model).items():
            module = ref.get_submodule(path)
            w = _as_out_in(module, module.weight.detach().float())
            for name in names:
                w = method.dense(layer, name, module, w)
                if method.dense_bias is not None and getattr(module, "bias", None) is not None:
                    module.bias.copy_(method.dense_bias(layer, name, module, module.bias.detach().float()))
            module.weight.copy_(_as_out_in(module, w))
    return ref


def test_forward_equals_dense_formula(tiny_for, method):
    _skip_if(method, "dense")
    name, model, targets, inputs = tiny_for
    pm = _make(model, method, targets)
    assert set(_wrapped(pm)) == set(_plain_targets(TINY_MODELS[name][0], targets))
    ref = _reference(TINY_MODELS[name][0], pm, method, ["default"])
    torch.testing.assert_close(model_output(pm, inputs), model_output(ref, inputs), rtol=1e-5, atol=1e-5)


def test_merge_unmerge_restores_base_and_merged_equals_unmerged(tiny_for, method):
    _skip_if(method, "merge")
    _, model, targets, inputs = tiny_for
    before = copy.deepcopy(model.state_dict())
    pm = _make(model, method, targets)
    unmerged = model_output(pm, inputs)
    pm.merge_adapter()
    torch.testing.assert_close(model_output(pm, inputs), unmerged, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    after = {k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items()}
    for key, value in before.items():
        assert (after[key] - value).abs().max() <= 1e-6, key


def test_merge_and_unload_gives_plain_model_with_same_output(tiny_for, method):
    _skip_if(method, "merge")
    _, model, targets, inputs = tiny_for
    plain_types = {n: type(m) for n, m in model.named_modules()}
    pm = _make(model, method, targets)
    want = model_output(pm, inputs)
    merged = pm.merge_and_unload()
    assert {n: type(m) for n, m in merged.named_modules()} == plain_types
    torch.testing.assert_close(model_output(merged, inputs), want, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_only_adapter_tensors_saved(tiny_for, method, tmp_path):
    name, model, targets, inputs = tiny_for
    pm = _make(model, method, targets)
    want = model_output(pm, inputs)
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    plain = _plain_targets(TINY_MODELS[name][0], targets)
    expected = {
        f"base_model.model.{path}.{k}": shape for path, m in plain.items() for k, shape in method.saved(m).items()
    }
    expected.update(method.shared_saved(list(plain.values())))
    assert {k: tuple(t.shape) for k, t in saved.items()} == expected
    loaded = dt.PeftModel.from_pretrained(TINY_MODELS[name][0](), tmp_path)
    torch.testing.assert_close(model_output(loaded, inputs), want, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode unless is_trainable=True


def test_disable_gives_base_output(tiny_for, method):
    name, model, targets, inputs = tiny_for
    base_out = model_output(model, inputs)
    pm = _make(model, method, targets)
    assert not torch.allclose(model_output(pm, inputs), base_out)
    with pm.disable_adapter():
        torch.testing.assert_close(model_output(pm, inputs), base_out, rtol=0, atol=0)


def test_two_adapters_coexist_switch_and_sum(tiny_for, method):
    _skip_if(method, "dense")
    name, model, targets, inputs = tiny_for
    pm = _make(model, method, targets)
    torch.manual_seed(5)
    pm.add_adapter("b", method.make_config(targets))
    _move_off_base(pm, method, "b")
    out_a = model_output(pm, inputs)
    pm.set_adapter("b")
    out_b = model_output(pm, inputs)
    factory = TINY_MODELS[name][0]
    torch.testing.assert_close(
        out_b, model_output(_reference(factory, pm, method, ["b"]), inputs), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(out_a, out_b)
    if method.not_additive is None:
        pm.set_adapter(["default", "b"])
        both = model_output(pm, inputs)
        torch.testing.assert_close(
            both, model_output(_reference(factory, pm, method, ["default", "b"]), inputs), rtol=1e-5, atol=1e-5
        )
    pm.delete_adapter("b")
    torch.testing.assert_close(model_output(pm, inputs), out_a, rtol=0, atol=0)


def test_trainable_count_equals_closed_form(tiny_for, method):
    name, model, targets, _ = tiny_for
    base_total = sum(p.numel() for p in model.parameters())
    pm = _make(model, method, targets)
    trainable, total = pm.get_nb_trainable_parameters()
    closed_form = sum(method.count(m) for m in _plain_targets(TINY_MODELS[name][0], targets).values())
    assert trainable == closed_form > 0
    assert total == base_total + trainable  # peft's "all params": the base plus what the adapter adds
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".base_layer." in n or "lora_" not in n for n in frozen)


def test_training_step_moves_only_adapter(tiny_for, method):
    _, model, targets, inputs = tiny_for
    pm = _make(model, method, targets)
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    model_output(pm, inputs).float().pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
