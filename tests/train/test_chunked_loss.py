"""The chunked output-head loss against the plain computation: logits = h W^T + b, cross-entropy in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.chunked_loss import enable_chunked_loss, linear_cross_entropy, plain_output_head
from deltatune.errors import ConfigError
from tests.conftest import tiny_llama


def _plain(hidden, weight, targets, bias=None, reduction="sum"):
    logits = hidden.float() @ weight.float().T + (0 if bias is None else bias.float())
    return nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)


def _case(n=37, d=12, vocab=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 100])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_equal_the_plain_computation(chunk_size, reduction, with_bias):
    hidden, weight, bias, targets = _case()
    bias = bias if with_bias else None
    want = _plain(hidden, weight, targets, bias, reduction)
    wanted = torch.autograd.grad(want * 3, [hidden, weight] + ([bias] if with_bias else []))
    got = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk_size, reduction=reduction)
    grads = torch.autograd.grad(got * 3, [hidden, weight] + ([bias] if with_bias else []))  # upstream scale of 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, wanted, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_frozen_head_gets_no_gradient_and_3d_inputs_flatten():
    hidden, weight, _, targets = _case(n=24)
    weight = weight.detach()
    got = linear_cross_entropy(hidden.view(2, 12, -1), weight, targets.view(2, 12), chunk_size=5)
    got.backward()
    torch.testing.assert_close(got, _plain(hidden, weight, targets))
    assert weight.grad is None and hidden.grad is not None


def test_all_ignored_targets_give_zero_loss_and_zero_gradient():
    hidden, weight, _, targets = _case(n=6)
    targets[:] = -100
    got = linear_cross_entropy(hidden, weight, targets, reduction="mean")
    got.backward()
    assert got.item() == 0 and torch.count_nonzero(hidden.grad) == 0


def test_mismatched_positions_are_refused():
    hidden, weight, _, targets = _case(n=6)
    with pytest.raises(ConfigError, match="differ in positions"):
        linear_cross_entropy(hidden, weight, targets[:5])


def test_bfloat16_inputs_match_the_plain_bfloat16_head():
    hidden, weight, _, targets = _case(dtype=torch.bfloat16)
    logits = (hidden @ weight.T).float()  # what the model's own head does in bf16, then the loss in fp32
    want = nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


# -- on a transformers model ------------------------------------------------------------------------------------------
def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


def _step(model, ids, labels, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, out.logits


@pytest.mark.parametrize("num_items_in_batch", [None, 11])
def test_enable_chunked_loss_gives_transformers_loss_and_gradients(num_items_in_batch):
    ids, labels = _batch()
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    plain = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"]))
    chunked = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"]))
    chunked.load_state_dict(plain.state_dict())
    handle = enable_chunked_loss(chunked, chunk_size=4)
    want_loss, want_grads, logits = _step(plain, ids, labels, **kwargs)
    loss, grads, no_logits = _step(chunked, ids, labels, **kwargs)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert sorted(grads) == sorted(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)
    assert no_logits is None and logits is not None
    with torch.no_grad():  # evaluation is untouched: logits and the same loss
        out = chunked(input_ids=ids, labels=labels, **kwargs)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-6)
    handle.remove()
    assert chunked(input_ids=ids, labels=labels).logits is not None


def test_an_adapted_head_is_refused_by_name():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["lm_head"]))
    assert plain_output_head(model) is None
    with pytest.raises(ConfigError, match="output head"):
        enable_chunked_loss(model)


def test_a_model_that_caps_its_logits_is_not_chunked():
    """A cap (gemma's tanh softcapping) does not commute with the head; a scale (cohere's) would, and passes."""
    base = tiny_llama()
    forward = base.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 3 * torch.tanh(out.logits / 3)
        return out

    base.forward = capped
    assert plain_output_head(base) is None
    assert isinstance(plain_output_head(tiny_llama()), nn.Linear)


def test_the_trainer_uses_the_chunked_loss_where_it_applies():
    from deltatune.train.config import load_train_config
    from deltatune.train.objectives import CausalLMObjective

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    spec = dt.registry.get_method("LORA")
    for overrides, chunked in (([], True), (["optim.chunked_loss=false"], False)):
        objective = CausalLMObjective(load_train_config(None, overrides))
        objective.prepare(model, spec)
        assert (objective.chunked_head is model.get_base_model().lm_head) == chunked
