"""BD-LoRA: the block-diagonal factor against the matrix written out, parameter counts, peft as the oracle on the
same adapter both ways, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.bdlora import BlockDiagonalLinear, block_diagonal
from tests.conftest import two_linear

TARGETS = ["lin0", "lin1"]
CONFIGS = [
    {"target_modules_bd_a": ["lin0"], "match_strict": False},
    {"target_modules_bd_b": ["lin1"], "nblocks": 2, "match_strict": False},
    {"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2},
]


def test_blocks_sit_on_the_diagonal_and_the_layer_multiplies_by_that_matrix():
    blocks = torch.arange(12.0).reshape(4, 3)  # two blocks of (2, 3)
    want = torch.zeros(4, 6)
    want[:2, :3], want[2:, 3:] = blocks[:2], blocks[2:]
    assert torch.equal(block_diagonal(blocks, 2), want)
    layer = BlockDiagonalLinear(6, 4, nblocks=2, zero=False, device=torch.device("cpu"))
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(layer(x), x @ layer.dense().T)


def test_a_block_diagonal_factor_trains_a_fraction_of_the_values():
    config = dt.LoraConfig(r=4, target_modules=TARGETS, use_bdlora=dt.BdLoraConfig(**CONFIGS[2]))
    model = dt.get_peft_model(two_linear(), config)
    shapes = {k: tuple(v.shape) for k, v in dt.get_peft_model_state_dict(model).items()}
    assert shapes["base_model.model.lin0.lora_A.weight"] == (4, 5)  # (r, d_in / 2): blocks (2, 5)
    assert shapes["base_model.model.lin1.lora_B.weight"] == (6, 2)  # (d_out, r / 2): blocks (3, 2)
    assert model.get_nb_trainable_parameters()[0] == 4 * 5 + 20 * 4 + 4 * 20 + 6 * 2


@pytest.mark.parametrize("options", CONFIGS, ids=["A", "B", "A and B"])
def test_matches_peft_both_ways(options, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import BdLoraConfig as PeftBdLoraConfig

    base = two_linear()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS,
                                 use_bdlora=PeftBdLoraConfig(**options)))  # fmt: skip
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=TARGETS,
                             use_bdlora=dt.BdLoraConfig(**options)))  # fmt: skip
    state = peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in dt.get_peft_model_state_dict(ours).items()}
    with torch.no_grad():  # a trained state: every factor non-zero
        for tensor in state.values():
            tensor.normal_(0, 0.3)
    dt.set_peft_model_state_dict(ours, state)
    x = torch.randn(3, 10)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(reloaded(x), ours(x), rtol=1e-5, atol=1e-6)
    unmerged = ours(x)
    merged = ours.merge_and_unload()
    assert type(merged.lin0) is nn.Linear
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-4, atol=1e-5)


def test_refusals_name_the_target_and_the_fix():
    with pytest.raises(dt.ConfigError, match="both"):
        dt.BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin0"])
    strict = dt.LoraConfig(r=4, target_modules=TARGETS, use_bdlora=dt.BdLoraConfig(target_modules_bd_a=["lin0"]))
    base = two_linear()
    with pytest.raises(dt.ConfigError, match="lin1 matches neither.*match_strict=False"):
        dt.get_peft_model(base, strict)
    assert type(base.lin0) is nn.Linear  # undone
    odd = dt.LoraConfig(
        r=3, target_modules=["lin0"], use_bdlora=dt.BdLoraConfig(target_modules_bd_a=["lin0"], nblocks=2)
    )
    with pytest.raises(dt.UnsupportedModuleError, match="nblocks=2"):
        dt.get_peft_model(two_linear(), odd)
    with pytest.raises(dt.UnsupportedFieldError, match="use one of them"):
        dt.LoraConfig(target_modules=["lin0"], use_dora=True, use_bdlora=dt.BdLoraConfig())
