"""LoRA layers: forward equals x W0^T + s x A^T B^T for every layer type and dtype; config validation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.errors import ConfigError, UnsupportedFieldError
from deltatune.methods.lora_layer import LoraConv, LoraEmbedding, LoraLinear, lora_layer_kwargs


def _randomize_b(layer):
    """Give the adapter a non-zero update (B, or the embedding's A, start at zero)."""
    with torch.no_grad():
        for name in ("lora_B", "lora_embedding_A"):
            for v in getattr(layer, name, {}).values():
                (v.weight if isinstance(v, nn.Module) else v).normal_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_forward_equals_dense_formula(dtype, rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(dtype)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, lora_alpha=8, use_rslora=rslora)
    layer.set_active(["default"])
    _randomize_b(layer)
    x = torch.randn(3, 5, 12, dtype=dtype)
    s = 8 / (4**0.5 if rslora else 4)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = x.float() @ base.weight.float().T + base.bias.float() + s * x.float() @ a.T @ b.T
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    got = layer(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol)
    assert a.dtype == torch.float32  # adapters train in float32 on a half-precision base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_gpt2_forward_equals_dense_formula(dtype):
    torch.manual_seed(0)
    base = Conv1D(10, 12).to(dtype)  # nf=10 outputs, nx=12 inputs; weight (12, 10)
    with torch.no_grad():
        base.bias.normal_()
    layer = LoraLinear(base)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (12, 10)
    layer.add_adapter("default", r=3, lora_alpha=6)
    layer.set_active(["default"])
    _randomize_b(layer)
    x = torch.randn(2, 4, 12, dtype=dtype)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = x.float() @ base.weight.float() + base.bias.float() + 2.0 * x.float() @ a.T @ b.T
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x).float(), want, **tol)


@pytest.mark.parametrize(
    "conv", [nn.Conv1d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv3d(2, 4, (1, 3, 3))]
)
def test_conv_forward_equals_conv_with_merged_kernel(conv):
    torch.manual_seed(0)
    layer = LoraConv(conv)
    layer.add_adapter("default", r=2, lora_alpha=4)
    layer.set_active(["default"])
    _randomize_b(layer)
    shape = {1: (2, 3, 9), 2: (2, 3, 9, 9), 3: (2, 2, 3, 6, 6)}[len(conv.kernel_size)]
    x = torch.randn(*shape)
    merged = conv.weight + layer.delta_weight("default")
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(conv.kernel_size)]
    want = fn(x, merged, conv.bias, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_forward_equals_dense_formula(dtype):
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0).to(dtype)
    layer = LoraEmbedding(base)
    layer.add_adapter("default", r=2, lora_alpha=2)
    layer.set_active(["default"])
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0  # A = 0, B random (peft's choice)
    _randomize_b(layer)
    ids = torch.tensor([[0, 3, 19, 7]])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    want = base.weight.float()[ids] + (a.T[ids] @ b.T)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(ids).float(), want, **tol)


def test_default_init_starts_at_base_output():
    base = nn.Linear(8, 8)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=2, lora_alpha=4)
    layer.set_active(["default"])
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    bound = 1 / 8**0.5  # kaiming-uniform(a=sqrt(5)) on fan_in 8
    assert layer.lora_A["default"].weight.abs().max() <= bound


def test_gaussian_init_std():
    layer = LoraLinear(nn.Linear(4096, 4))
    layer.add_adapter("default", r=16, lora_alpha=16, init_lora_weights="gaussian")
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 16, rel=0.05)


def test_rank_and_alpha_patterns_resolve_per_module():
    cfg = dt.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 16},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2},
    )
    assert lora_layer_kwargs(cfg, "model.layers.0.mlp.down_proj")["r"] == 16
    assert lora_layer_kwargs(cfg, "model.layers.0.self_attn.q_proj")["lora_alpha"] == 8
    assert lora_layer_kwargs(cfg, "model.layers.1.self_attn.q_proj")["lora_alpha"] == 2


def test_dropout_only_in_training_and_grads_flow():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 16))
    layer.add_adapter("default", r=4, lora_alpha=4, lora_dropout=0.5, init_lora_weights=False)
    layer.set_active(["default"])
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    y1.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.base_layer.weight.grad is None
    torch.manual_seed(2)
    assert not torch.equal(y1, layer(x))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(r=0), ConfigError),
        (dict(r=-2), ConfigError),
        (dict(r=2.5), ConfigError),
        (dict(lora_alpha=0), ConfigError),
        (dict(lora_dropout=-0.1), ConfigError),
        (dict(lora_dropout=1.0), ConfigError),
        (dict(bias="some"), ConfigError),
        (dict(target_modules=[]), ConfigError),
        (dict(target_modules=["q_proj", ""]), ConfigError),
        (dict(init_lora_weights="eva"), UnsupportedFieldError),
        (dict(rank_pattern={"q": 0}), ConfigError),
        (dict(layers_pattern="layers"), ConfigError),
    ],
)
def test_bad_config_values_raise_config_error(kwargs, error):
    with pytest.raises(error):
        dt.LoraConfig(**kwargs)


def test_config_dict_round_trip_uses_peft_names():
    cfg = dt.LoraConfig(r=4, lora_alpha=16, target_modules={"v_proj", "q_proj"}, use_rslora=True)
    d = cfg.to_dict()
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q_proj", "v_proj"] and d["use_rslora"] is True
    assert dt.LoraConfig.from_dict(d) == cfg


def test_unsupported_peft_field_is_refused_but_defaults_are_fine():
    d = dt.LoraConfig(target_modules=["q"]).to_dict()
    dt.LoraConfig.from_dict({**d, "megatron_config": None, "peft_version": "0.21.2", "megatron_core": "megatron.core"})
    with pytest.raises(UnsupportedFieldError, match="megatron_config"):
        dt.LoraConfig.from_dict({**d, "megatron_config": {"tensor_model_parallel_size": 2}})
