"""GraLoRA: block structure against a dense construction, rank k·r at LoRA's parameter count, peft both ways."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.functional.gralora import gralora_delta, gralora_project
from tests.interop.roundtrip import assert_round_trip


def _dense_blocks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW built element by element from the definition: ΔW[j·ob + o, n·ib + i] = Σ_s A[n,i,j·sub+s] B[j,n·sub+s,o]."""
    k, ib, r = a.shape
    ob, sub = b.shape[2], r // k
    out = torch.zeros(k * ob, k * ib)
    for j in range(k):
        for n in range(k):
            for s in range(sub):
                out[j * ob : (j + 1) * ob, n * ib : (n + 1) * ib] += torch.outer(
                    b[j, n * sub + s], a[n, :, j * sub + s]
                )
    return out


@pytest.mark.parametrize("k, r", [(2, 4), (4, 8)])
def test_delta_and_projection_match_the_definition(k, r):
    torch.manual_seed(0)
    a, b = torch.randn(k, 32 // k, r), torch.randn(k, r, 48 // k)
    delta = gralora_delta(a, b, 1.0)
    torch.testing.assert_close(delta, _dense_blocks(a, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(gralora_project(x, a, b), x @ delta.T, rtol=1e-5, atol=1e-5)
    assert torch.linalg.matrix_rank(delta) == k * r  # k times LoRA's rank, same parameter count


def test_same_parameter_count_as_lora_on_a_7b_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    counts = []
    for config in (
        dt.LoraConfig(r=32, target_modules=["q_proj", "v_proj"]),
        dt.GraloraConfig(r=32, gralora_k=2, target_modules=["q_proj", "v_proj"]),
    ):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        counts.append(dt.get_peft_model(model, config).get_nb_trainable_parameters()[0])
    assert counts[0] == counts[1] == 32 * 2 * 32 * (4096 + 4096)


@pytest.mark.parametrize("bad", [dict(r=6, gralora_k=4), dict(gralora_k=0), dict(hybrid_r=-1), dict(alpha=0)])
def test_bad_configs(bad):
    with pytest.raises(dt.ConfigError):
        dt.GraloraConfig(target_modules=["q_proj"], **bad)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_peft_interop(case, direction, tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"] if case == "llama" else ["c_attn", "c_fc"]
    kwargs = dict(r=4, alpha=8, gralora_k=2, hybrid_r=2, target_modules=targets)
    lib_save, lib_load = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    assert_round_trip(lib_save, lib_load, "GraloraConfig", kwargs, case, tmp_path)
