"""LN tuning: only the norms train, peft's defaults and saved keys, peft interop both ways, exact merge/unmerge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.ln_tuning import LNTuningLayer
from tests.conftest import model_output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize(
    ("factory", "count"),
    [
        (tiny_llama, (2 * 2 + 1) * 32),  # RMSNorm scale: two per block and the final one
        (tiny_gpt2, (2 * 2 + 1) * 2 * 32),  # LayerNorm scale and shift: ln_1, ln_2 per block and ln_f
        (tiny_bert, (1 + 2 * 2) * 2 * 32),  # embeddings' LayerNorm and two per block
    ],
)
def test_only_the_norms_train(factory, count):
    model = dt.get_peft_model(factory(), dt.LNTuningConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".ln_tuning_layers.default." in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == count
    torch.testing.assert_close(model_output(model, IDS), model_output(factory(), IDS))  # copies start equal


NORMS = {tiny_llama: ["input_layernorm", "post_attention_layernorm", "norm"], tiny_gpt2: ["ln_1", "ln_2", "ln_f"]}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_peft_interop(factory, direction, tmp_path):
    peft = pytest.importorskip("peft")
    lib = peft if direction == "peft->deltatune" else dt
    source = lib.get_peft_model(factory(), lib.LNTuningConfig(target_modules=NORMS.get(factory, ["LayerNorm"])))
    perturb_trainable(source)
    source.save_pretrained(str(tmp_path))
    target = dt if lib is peft else peft
    loaded = target.PeftModel.from_pretrained(factory(), str(tmp_path))
    torch.testing.assert_close(model_output(loaded.eval(), IDS), model_output(source.eval(), IDS), rtol=1e-5, atol=1e-5)


def test_merge_unmerge_exact_and_one_adapter_at_a_time():
    model = dt.get_peft_model(tiny_gpt2(), dt.LNTuningConfig())
    perturb_trainable(model)
    before = {k: v.clone() for k, v in tiny_gpt2().state_dict().items()}
    want = model_output(model, IDS)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, IDS), want)
    model.unmerge_adapter()
    after = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    model.add_adapter("other", dt.LNTuningConfig())
    with pytest.raises(dt.AdapterError, match="one adapter at a time"):
        model.set_adapter(["default", "other"])


def test_a_half_precision_base_runs_and_every_wrapper_tells_its_sizes():
    """peft's checks on every tuner layer: a float16 base runs (the trained copy is float32: the input is cast to it
    and the output back) and each wrapper exposes in_features / out_features (here read from the base)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).half()
    x = torch.randn(3, 4).half()
    want = base(x)
    model = dt.get_peft_model(base, dt.LNTuningConfig(target_modules=["0", "1"]))
    out = model(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)  # the copies start as the base: float16 rounding only
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, LNTuningLayer)]
    assert sizes == [(4, 6), (6, 6)]
