"""Bottleneck adapters: the forward equals the formula, the model starts at the base, the papers' parameter counts
(Pfeiffer and Houlsby on BERT-base), placements from the architecture table, parallel beside the FFN, save/load,
several adapters, merging refused with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from tests.conftest import model_output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}


def _bert(size: str):
    from transformers import BertConfig, BertModel

    config = BertConfig() if size == "base" else BertConfig(hidden_size=1024, num_hidden_layers=24,
                                                            num_attention_heads=16, intermediate_size=4096)  # fmt: skip
    with torch.device("meta"):
        return BertModel(config)


@pytest.mark.parametrize(
    ("size", "config", "count"),
    [
        ("base", dict(adapter_type="pfeiffer"), 894_528),  # rf 16: m = 48, one per layer
        ("base", dict(adapter_type="houlsby", bottleneck_size=64), 2_379_264),  # two per layer, m = 64
        ("large", dict(adapter_type="houlsby", bottleneck_size=64), 6_343_680),
    ],
)
def test_counts_are_the_papers(size, config, count):
    model = dt.get_peft_model(_bert(size), dt.BottleneckConfig(**config))
    assert model.get_nb_trainable_parameters()[0] == count


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert])
def test_placements_from_the_table_start_at_the_base_and_follow_the_formula(factory):
    base_out = model_output(factory(), IDS)
    houlsby = dt.get_peft_model(factory(), dt.BottleneckConfig(adapter_type="houlsby", reduction_factor=4))
    wrapped = [n for n, m in houlsby.get_base_model().named_modules() if isinstance(m, dt.layers.AdapterLayer)]
    assert len(wrapped) == 2 * 2  # after attention and after the FFN, in each of 2 blocks
    torch.testing.assert_close(model_output(houlsby, IDS), base_out)  # W_up = 0: the base model exactly
    perturb_trainable(houlsby)
    layer = houlsby.get_base_model().get_submodule(wrapped[-1])
    x = torch.randn(3, layer.base_layer.weight.shape[0 if factory is tiny_gpt2 else 1])
    h = layer.base_layer(x)
    down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
    want = h + (F.silu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)  # swish, s = 1
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model_output(houlsby, IDS), base_out)


def test_parallel_beside_the_ffn_and_refused_where_the_ffn_is_split():
    model = dt.get_peft_model(tiny_llama(), dt.BottleneckConfig(adapter_type="parallel", reduction_factor=4))
    mlp = model.get_base_model().model.layers[0].mlp
    perturb_trainable(model)
    x = torch.randn(2, 3, 32)
    down, up = mlp.bottleneck_down["default"], mlp.bottleneck_up["default"]
    want = mlp.base_layer(x) + 4.0 * (F.relu(x @ down.weight.T + down.bias) @ up.weight.T + up.bias)  # s = 4
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(dt.ConfigError, match="one module"):
        dt.get_peft_model(tiny_bert(), dt.BottleneckConfig(adapter_type="parallel"))


def test_save_load_several_adapters_layer_norms_and_merge_refused(tmp_path):
    model = dt.get_peft_model(tiny_bert(), dt.BottleneckConfig(reduction_factor=4, train_layer_norms=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("LayerNorm" in n for n in trainable)
    perturb_trainable(model)
    want = model_output(model, IDS)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(model_output(loaded, IDS), want, rtol=0, atol=0)
    model.add_adapter("other", dt.BottleneckConfig(reduction_factor=8))
    model.set_adapter("other")
    assert not torch.allclose(model_output(model, IDS), want)
    with pytest.raises(dt.MergeError, match="non-linear"):
        model.merge_and_unload()


def _two_adapters_and_fusion(factory=tiny_bert):
    model = dt.get_peft_model(factory(), dt.BottleneckConfig(reduction_factor=4))
    model.add_adapter("b", dt.BottleneckConfig(reduction_factor=4))
    perturb_trainable(model)  # both adapters "trained"
    model.add_adapter("fusion", dt.BottleneckConfig(reduction_factor=4, fusion_of=["default", "b"]))
    return model


def test_fusion_combines_the_adapters_by_attention_and_trains_alone():
    model = _two_adapters_and_fusion()
    model.set_adapter("fusion")
    layer = model.get_base_model().bert.encoder.layer[1].output.dense
    x = torch.randn(3, 48)
    h = layer.base_layer(x)
    z = torch.stack([layer._adapter("default", h), layer._adapter("b", h)], dim=1)  # (tokens, N=2, d)
    q = layer.fusion_query["fusion"](h)
    scores = torch.einsum("nkd,nd->nk", layer.fusion_key["fusion"](z), q)
    want = h + torch.einsum("nk,nkd->nd", scores.softmax(-1), layer.fusion_value["fusion"](z))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    # stage two: only the fusion's projections receive gradients, the combined adapters stay frozen
    model.train()
    model(**IDS).logits.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".fusion_" in n for n in grads)
    with pytest.raises(dt.AdapterError, match="alone"):
        model.set_adapter(["fusion", "b"])


def test_fusion_of_one_adapter_reproduces_it_and_counts_match_the_paper(tmp_path):
    model = dt.get_peft_model(tiny_bert(), dt.BottleneckConfig(reduction_factor=4))
    perturb_trainable(model)
    alone = model_output(model, IDS)
    model.add_adapter("fusion", dt.BottleneckConfig(reduction_factor=4, fusion_of=["default"]))
    with torch.no_grad():  # exactly V = I: one adapter gets all the attention, so the output is its output
        for module in model.modules():
            if hasattr(module, "fusion_value") and "fusion" in module.fusion_value:
                module.fusion_value["fusion"].weight.copy_(torch.eye(module.hidden_size))
    model.set_adapter("fusion")
    torch.testing.assert_close(model_output(model, IDS), alone, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    with pytest.raises(dt.ConfigError, match="default"):  # the fusion without the adapter it combines
        dt.PeftModel.from_pretrained(tiny_bert(), tmp_path / "fusion", adapter_name="fusion")
    loaded = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    loaded.load_adapter(tmp_path / "fusion", "fusion")
    loaded.set_adapter("fusion")
    torch.testing.assert_close(model_output(loaded, IDS), alone, rtol=1e-5, atol=1e-5)
    with torch.device("meta"):
        from transformers import BertConfig, BertModel

        base = BertModel(BertConfig())
    big = dt.get_peft_model(base, dt.BottleneckConfig())
    big.add_adapter("fusion", dt.BottleneckConfig(fusion_of=["default"]))
    big.set_adapter("fusion")
    assert big.get_nb_trainable_parameters()[0] == 21_252_096  # 12 · (3·768² + 2·768), paper_facts §12
