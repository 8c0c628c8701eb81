"""(IA)³: the forward equals the formula, the family defaults are peft's, the paper's T0-3B count, peft interop both
ways, exact merge and unmerge (bias included)."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from tests.conftest import model_output, tiny_bert, tiny_gpt2, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}


def _random_scales(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))


def test_forward_scales_outputs_or_feedforward_inputs():
    model = dt.get_peft_model(tiny_gpt2(), dt.IA3Config())  # defaults: c_attn (outputs), mlp.c_proj (inputs)
    _random_scales(model)
    block = model.get_base_model().transformer.h[0]
    attn, ffn = block.attn.c_attn, block.mlp.c_proj
    x = torch.randn(3, 32)
    base = attn.get_base_layer()
    torch.testing.assert_close(attn(x), attn.ia3_l["default"].flatten() * (x @ base.weight + base.bias))
    h = torch.randn(3, 128)
    base = ffn.get_base_layer()
    torch.testing.assert_close(ffn(h), (h * ffn.ia3_l["default"].flatten()) @ base.weight + base.bias)


@pytest.mark.parametrize(
    ("factory", "targets", "feedforward", "per_block"),
    [
        (tiny_llama, ["k_proj", "v_proj", "mlp.down_proj"], ["mlp.down_proj"], 16 + 16 + 48),
        (tiny_gpt2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], 96 + 128),
        (tiny_bert, ["key", "value", "output.dense"], ["output.dense"], 32 + 32 + 48 + 32),
    ],
)
def test_family_defaults_are_peft_s(factory, targets, feedforward, per_block):
    model = dt.get_peft_model(factory(), dt.IA3Config())
    config = model.peft_config["default"]
    assert (config.target_modules, config.feedforward_modules) == (targets, feedforward)
    # bert's "output.dense" also matches the attention output (peft's default does the same): 32 inputs scaled there
    assert model.get_nb_trainable_parameters()[0] == 2 * per_block


def test_t0_3b_count_matches_the_paper():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24,
        feed_forward_proj="gated-gelu", vocab_size=32128,
    )  # fmt: skip
    with torch.device("meta"):
        base = T5ForConditionalGeneration(config)
    model = dt.get_peft_model(base, dt.IA3Config())
    assert model.get_nb_trainable_parameters()[0] == 540_672  # 24·(2048+2048+5120) + 24·(4·2048+5120)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_peft_interop(factory, direction, tmp_path):
    peft = pytest.importorskip("peft")
    if direction == "peft->deltatune":
        source = peft.get_peft_model(factory(), peft.IA3Config())
        _random_scales(source)
        source.save_pretrained(tmp_path)
        loaded = dt.PeftModel.from_pretrained(factory(), tmp_path)
    else:
        source = dt.get_peft_model(factory(), dt.IA3Config())
        _random_scales(source)
        source.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(factory(), str(tmp_path))
    torch.testing.assert_close(model_output(loaded.eval(), IDS), model_output(source.eval(), IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_exact_and_unmerge_gives_back_every_bit(dtype):
    model = dt.get_peft_model(tiny_gpt2().to(dtype), dt.IA3Config())
    _random_scales(model)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "ia3_l" not in k}
    want = model_output(model, IDS)
    model.merge_adapter()
    torch.testing.assert_close(
        model_output(model, IDS),
        want,
        rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
        atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
    )
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_config_checks():
    with pytest.raises(dt.ConfigError, match="feedforward_modules"):
        dt.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(dt.ConfigError, match="no default"):
        from tests.conftest import tiny_mlp

        dt.get_peft_model(tiny_mlp(), dt.IA3Config())


class _ConvNet(torch.nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
        self.inner, self.outer = conv(3, 6, 3), conv(6, 4, 1)

    def forward(self, x):
        return self.outer(torch.relu(self.inner(x)))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_scales_channels_as_the_formula_says_and_merges_exactly(dims):
    torch.manual_seed(0)
    net, x = _ConvNet(dims), torch.randn(2, 3, *(6,) * dims)
    with torch.no_grad():
        plain_inner = net.inner(x)
    config = dt.IA3Config(target_modules=["inner", "outer"], feedforward_modules=["outer"], init_ia3_weights=False)
    model = dt.get_peft_model(net, config)
    l_in = model.base_model.model.inner.ia3_l["default"]
    l_ff = model.base_model.model.outer.ia3_l["default"]
    assert l_in.shape == (1, 6, *(1,) * dims) and l_ff.shape == (1, 6, *(1,) * dims)  # peft's shapes
    outer = model.base_model.model.outer.base_layer
    expected = outer(l_ff * torch.relu(l_in * plain_inner))  # h = l ⊙ (W x + b); feed-forward: W (l ⊙ x) + b
    out = model(x)
    torch.testing.assert_close(out, expected)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-6)


def test_conv_matches_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    ours_net, x = _ConvNet(2), torch.randn(2, 3, 7, 7)
    theirs_net = copy.deepcopy(ours_net)
    kwargs = {"target_modules": ["inner", "outer"], "feedforward_modules": ["outer"], "init_ia3_weights": False}
    ours = dt.get_peft_model(ours_net, dt.IA3Config(**kwargs))
    theirs = peft.get_peft_model(theirs_net, peft.IA3Config(**kwargs))
    peft.set_peft_model_state_dict(theirs, dt.get_peft_model_state_dict(ours))
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("feedforward", [True, False])
def test_grouped_conv_scales_merge_exactly(feedforward):
    torch.manual_seed(2)
    net, x = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, groups=2)), torch.randn(2, 4, 5, 5)
    feedforward_modules = ["0"] if feedforward else []
    config = dt.IA3Config(target_modules=["0"], feedforward_modules=feedforward_modules, init_ia3_weights=False)
    model = dt.get_peft_model(net, config)
    scale = model.base_model.model[0].ia3_l["default"]
    conv = model.base_model.model[0].base_layer
    expected = conv(x * scale) if feedforward else conv(x) * scale  # the formula, on the grouped base conv
    torch.testing.assert_close(model(x), expected)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
