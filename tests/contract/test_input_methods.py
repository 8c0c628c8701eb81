"""The contract for methods that do not wrap chosen target modules (virtual tokens, key/value prefixes, adaption
prompts): counts in closed form, exact saved keys and shapes, save/load, disable, several adapters, a training step,
merging refused, generate() equal to a step-by-step forward without cache. Run on tiny LLaMA (GQA), GPT-2 and BERT.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.errors import AdapterError, MergeError
from deltatune.layers import AdapterLayer
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

N, H, A = 3, 8, 4  # virtual tokens, P-tuning encoder width, adaption prompt length
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
D, LAYERS, KV_WIDTH = 32, 2, {"llama": 16, "gpt2": 32, "bert": 32}  # tiny LLaMA: 2 key/value heads of 8


@dataclass
class InputCase:
    make_config: callable
    count: callable
    """model name -> trainable parameters (closed form)"""
    saved: callable
    """model name -> {saved key: shape}"""
    models: tuple[str, ...] = ("llama", "gpt2", "bert")
    starts_at_base: bool = False
    several_active: bool = False


def _ptuning_count(name: str) -> int:
    return N * D + (D * H + H) + (H * H + H) + (H * D + D)  # table + MLP d -> h -> h -> d


INPUT_CASES = {
    "PROMPT_TUNING": InputCase(
        make_config=lambda: dt.PromptTuningConfig(num_virtual_tokens=N),
        count=lambda name: N * D,
        saved=lambda name: {"prompt_embeddings": (N, D)},
    ),
    "P_TUNING": InputCase(
        make_config=lambda: dt.PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=H),
        count=_ptuning_count,
        saved=lambda name: {"prompt_embeddings": (N, D)},  # the encoder's output only
    ),
    "PREFIX_TUNING": InputCase(
        make_config=lambda: dt.PrefixTuningConfig(num_virtual_tokens=N),
        count=lambda name: N * LAYERS * 2 * KV_WIDTH[name],
        saved=lambda name: {"prompt_embeddings": (N, LAYERS * 2 * KV_WIDTH[name])},
    ),
    "ADAPTION_PROMPT": InputCase(
        make_config=lambda: dt.AdaptionPromptConfig(adapter_len=A, adapter_layers=1),
        count=lambda name: 1 * (A * D + 1),
        saved=lambda name: {
            "base_model.model.model.layers.1.self_attn.adaption_prompt": (1, A, D),
            "base_model.model.model.layers.1.self_attn.adaption_gate": (1,),
        },
        models=("llama",),
        starts_at_base=True,
        several_active=True,
    ),
}
CASES = [(m, name) for m, case in sorted(INPUT_CASES.items()) for name in case.models]


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _make(method: str, name: str, adapter: str = "default", pm=None):
    case = INPUT_CASES[method]
    if pm is None:
        pm = dt.get_peft_model(MODELS[name](), case.make_config(), adapter)
    else:
        pm.add_adapter(adapter, case.make_config())
    if case.starts_at_base:  # a step away from the base, as training would take, for this adapter only
        g = torch.Generator().manual_seed(3 if adapter == "default" else 5)
        with torch.no_grad():
            for layer in [m for m in pm.modules() if isinstance(m, AdapterLayer)]:
                for p in layer.adapter_parameters(adapter):
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return pm


def _out(model, inputs):
    return model(**inputs).logits


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    return request.param


def test_every_input_method_has_a_case():
    kinds = {s.peft_type for s in dt.list_methods() if s.kind == "input"} | {"ADAPTION_PROMPT"}
    assert kinds <= set(INPUT_CASES)


def test_trainable_count_equals_closed_form(case):
    method, name = case
    base_total = sum(p.numel() for p in MODELS[name]().parameters())
    pm = _make(method, name)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == INPUT_CASES[method].count(name) > 0
    assert total == base_total + trainable


def test_save_load_round_trip_saves_exactly_the_adapter(case, tmp_path):
    method, name = case
    pm, inputs = _make(method, name), _inputs(name)
    want = _out(pm, inputs)
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(t.shape) for k, t in saved.items()} == INPUT_CASES[method].saved(name)
    loaded = dt.PeftModel.from_pretrained(MODELS[name](), tmp_path)
    torch.testing.assert_close(_out(loaded, inputs), want, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0


def test_disable_gives_base_output(case):
    method, name = case
    inputs = _inputs(name)
    base = _out(MODELS[name](), inputs)
    pm = _make(method, name)
    changed = _out(pm, inputs)[:, -inputs["input_ids"].shape[1] :]
    assert not torch.allclose(changed, base)
    with pm.disable_adapter():
        torch.testing.assert_close(_out(pm, inputs), base, rtol=0, atol=0)


def test_two_adapters_switch_and_delete(case):
    method, name = case
    inputs = _inputs(name)
    pm = _make(method, name)
    out_a = _out(pm, inputs)
    torch.manual_seed(9)
    _make(method, name, "b", pm)
    pm.set_adapter("b")
    out_b = _out(pm, inputs)
    assert not torch.allclose(out_a, out_b)
    if INPUT_CASES[method].several_active:
        pm.set_adapter(["default", "b"])  # two prompt attentions add up: well-defined
        assert not torch.allclose(_out(pm, inputs), out_a)
    else:
        pm.set_adapter(["default", "b"])
        with pytest.raises(AdapterError, match="one at a time"):
            _out(pm, inputs)
    pm.set_adapter("default")
    pm.delete_adapter("b")
    torch.testing.assert_close(_out(pm, inputs), out_a, rtol=0, atol=0)


def test_training_step_moves_only_the_adapter(case):
    method, name = case
    pm, inputs = _make(method, name), _inputs(name)
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = [p for p in pm.parameters() if p.requires_grad]
    _out(pm, inputs).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    torch.optim.SGD(trainable, lr=0.1).step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n, p in pm.named_parameters() if p.requires_grad}


def test_merging_is_refused_and_changes_nothing(case):
    method, name = case
    pm, inputs = _make(method, name), _inputs(name)
    want = _out(pm, inputs)
    with pytest.raises(MergeError, match="cannot be merged"):
        pm.merge_and_unload()
    torch.testing.assert_close(_out(pm, inputs), want, rtol=0, atol=0)


def assert_greedy(model, out, prompt_length, mask):
    """Each token generate() chose is the argmax (within float noise: tiny random models make near-ties) of a full
    forward over everything before it, without a cache; positions from the mask, as generate() computes them."""
    for t in range(prompt_length, out.shape[1]):
        step_mask = torch.cat([mask, torch.ones(mask.shape[0], t - prompt_length, dtype=mask.dtype)], dim=1)
        positions = (step_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=out[:, :t], attention_mask=step_mask, position_ids=positions, use_cache=False)
        last = logits.logits[:, -1].float()
        chosen = last.gather(1, out[:, t : t + 1]).squeeze(1)
        ended = (out[:, prompt_length:t] == model.generation_config.eos_token_id).any(-1)  # then padded
        assert torch.all((chosen >= last.max(-1).values - 1e-5) | ended), f"step {t}: not the greedy token"


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_generate_equals_stepwise_forward_without_cache(case, padded):
    method, name = case
    if name == "bert":
        pytest.skip("an encoder classifier does not generate")
    pm = _make(method, name)
    ids = _inputs(name)["input_ids"]
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
    out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 5) and torch.equal(out[:, : ids.shape[1]], ids)
    assert_greedy(pm, out, ids.shape[1], mask)
