"""ReFT (LoReFT, DiReFT): formulas, orthonormality, positions, counts, generation, save/load, training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.functional.reft import direft, loreft, orthonormal_rows, parse_positions, position_masks
from deltatune.methods.reft import Intervention, ReftBlock
from tests.conftest import tiny_llama

G = torch.Generator().manual_seed(0)


def test_formulas_on_random_hidden_states():
    h, rot, w, b, w2 = (
        torch.randn(*s, generator=G, dtype=torch.float64) for s in [(5, 8), (3, 8), (3, 8), (3,), (3, 8)]
    )
    rot = orthonormal_rows(rot)
    for row in range(5):  # Φ(h) = h + Rᵀ(W h + b − R h), one vector at a time
        want = h[row] + rot.T @ (w @ h[row] + b - rot @ h[row])
        torch.testing.assert_close(loreft(h, rot, w, b)[row], want)
        torch.testing.assert_close(direft(h, w, b, w2)[row], h[row] + w2.T @ (w @ h[row] + b))
    torch.testing.assert_close(
        loreft(h, rot, w, b, torch.relu)[0], h[0] + rot.T @ (torch.relu(w @ h[0] + b) - rot @ h[0])
    )
    # the retraction: orthonormal rows, and an orthonormal input maps to itself
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(orthonormal_rows(rot), rot)


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_intervention_module_matches_the_formula_and_identity_init_is_exact(kind):
    torch.manual_seed(0)
    module = Intervention(8, 3, kind, None, 0.0, False, None)
    h = torch.randn(4, 8)
    w, b = module.learned_source.weight, module.learned_source.bias
    want = loreft(h, module.rotate.weight, w, b) if kind == "loreft" else direft(h, w, b, module.project.weight)
    torch.testing.assert_close(module(h), want)
    assert not torch.allclose(module(h), h)  # the paper's random W edits from the start
    identity = Intervention(8, 3, kind, None, 0.0, True, None)
    torch.testing.assert_close(identity(h), h, rtol=0, atol=1e-6)


def test_r_stays_orthonormal_through_training():
    torch.manual_seed(0)
    module = Intervention(16, 4, "loreft", None, 0.0, False, None)
    opt = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(30):
        module(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    rot = module.rotate.weight
    assert torch.linalg.matrix_norm(rot @ rot.T - torch.eye(4)) < 1e-5
    assert not torch.allclose(module.rotate.parametrizations.weight.original, rot)  # it trained


def test_positions_parse_and_masks_follow_the_prompt_and_the_short_prompt_rule():
    assert parse_positions("f7+l7") == (7, 7) and parse_positions("f5") == (5, 0) and parse_positions("l3") == (0, 3)
    with pytest.raises(ValueError):
        parse_positions("first7")
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])  # left- and right-padded rows
    first, last = position_masks(mask, torch.tensor([6, 2]), 2, 1)
    assert first.int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]  # row 1: 2 < 2+1 -> 1 and 1
    assert last.int().tolist() == [[0, 0, 0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0]]
    first, _ = position_masks(mask, torch.tensor([6, 2]), 2, 0)
    assert first[1].int().tolist() == [1, 1, 0, 0, 0, 0, 0, 0]  # no last positions: no halving


def test_only_the_intended_positions_change():
    """One intervention on the last block edits exactly the first 2 and last 1 prompt tokens of each row (after it
    only per-position layers run), with padding on the left and a response after the prompt."""
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 9), generator=G)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    want = base(input_ids=ids, attention_mask=mask).logits
    model = dt.get_peft_model(tiny_llama(), dt.ReftConfig(layer_indices=[1], r=2, positions="f2+l1"))
    got = model(input_ids=ids, attention_mask=mask, prompt_lengths=torch.tensor([5, 4])).logits
    changed = (got - want).abs().amax(-1) > 1e-6
    assert changed.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0, 0]]
    untied = dt.get_peft_model(
        tiny_llama(), dt.ReftConfig(layer_indices=[1], r=2, positions="f2+l1", share_weights=False)
    )
    groups = untied.base_model.model.model.layers[1].reft_interventions["default"]
    assert sorted(groups) == ["first", "last"]


def _count(d: int, r: int, blocks: int, per_block: int = 1) -> int:
    return blocks * per_block * (2 * d * r + r)


@pytest.mark.parametrize(
    ("family", "layers", "r", "tied", "want"),
    [
        ("llama-7b", "all", 8, True, 2_097_408),  # Table 1/2: 0.031%
        ("llama-7b", [15], 4, True, 32_772),  # pyreft README: one intervention at layer 15
        ("llama-13b", "all", 8, True, 3_277_120),
        ("llama-7b", "all", 8, False, 4_194_816),  # untied: twice (0.062%)
        ("roberta-base", "all", 1, True, 18_444),
    ],
)
def test_counts_equal_the_closed_form_and_the_paper(family, layers, r, tied, want):
    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, RobertaConfig

    configs = {
        "llama-7b": LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
        ),
        "llama-13b": LlamaConfig(
            hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
        ),
        "roberta-base": RobertaConfig(),
    }
    with torch.device("meta"):
        auto = AutoModel if family == "roberta-base" else AutoModelForCausalLM  # the paper's % counts LLaMA's head
        base = auto.from_config(configs[family])
    model = dt.get_peft_model(base, dt.ReftConfig(layer_indices=layers, r=r, share_weights=tied))
    cfg = configs[family]
    blocks = cfg.num_hidden_layers if layers == "all" else len(layers)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == _count(cfg.hidden_size, r, blocks, 1 if tied else 2) == want
    if layers == "all":  # Table 1/2's percentages of the base model
        share = {"llama-7b": 0.031 if tied else 0.062, "llama-13b": 0.025, "roberta-base": 0.015}[family]
        assert round(100 * trainable / (total - trainable), 3) == share


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_generate_equals_step_by_step_forward_without_cache(kind):
    model = dt.get_peft_model(tiny_llama(), dt.ReftConfig(r=2, positions="f2+l2", intervention_type=kind)).eval()
    # its own generator: the shared G's state depends on which tests ran first in this worker
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    eos = model.get_base_model().generation_config.eos_token_id
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # left padding, as generation batches are
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq, seq_mask, prompt = ids, mask, mask.sum(-1)
    done = torch.zeros(2, 1, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=seq, attention_mask=seq_mask, prompt_lengths=prompt, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True).masked_fill(done, 0)  # a finished row gets padding
            done |= nxt == eos
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out[:, : seq.shape[1]], seq) and (out.shape[1] == seq.shape[1] or bool(done.all()))
    with model.disable_adapter():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, out)


def test_save_load_several_adapters_disable_and_merge_refused(tmp_path):
    ids = {"input_ids": torch.randint(0, 97, (2, 8), generator=G)}
    model = dt.get_peft_model(tiny_llama(), dt.ReftConfig(layer_indices=[0, 1], r=2))
    model.add_adapter("direct", dt.ReftConfig(r=3, intervention_type="direft", positions="l2"))
    want = model(**ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    block = "base_model.model.model.layers.0.reft_interventions.all"
    assert {k: tuple(v.shape) for k, v in saved.items() if k.startswith(block)} == {
        f"{block}.learned_source.weight": (2, 32),
        f"{block}.learned_source.bias": (2,),
        f"{block}.rotate.parametrizations.weight.original": (2, 32),
    }
    assert len(saved) == 6  # two blocks x three tensors: nothing of the base, no (d, d) buffers
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "direct", "direct")
    torch.testing.assert_close(loaded(**ids).logits, want, rtol=0, atol=0)
    loaded.set_adapter("direct")
    model.set_adapter("direct")
    torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits, rtol=0, atol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(loaded(**ids).logits, tiny_llama()(**ids).logits)
    with pytest.raises(dt.MergeError, match="hidden states at chosen positions"):
        loaded.merge_adapter()
    with pytest.raises(dt.AdapterError, match="adapter_names"):
        loaded(**ids, adapter_names=["direct", "__base__"])
    assert all(isinstance(loaded.base_model.model.model.layers[i], ReftBlock) for i in (0, 1))


def test_config_errors_name_the_field():
    with pytest.raises(dt.ConfigError, match="positions"):
        dt.ReftConfig(positions="middle")
    with pytest.raises(dt.ConfigError, match="layer_indices"):
        dt.ReftConfig(layer_indices=[])
    with pytest.raises(dt.ConfigError, match="exceeds the hidden size"):
        dt.get_peft_model(tiny_llama(), dt.ReftConfig(r=64))


def test_trainer_passes_prompt_lengths_so_responses_are_not_edited(tiny_model_dir, tmp_path, monkeypatch):
    """In a `deltatune train` run each batch carries prompt_lengths (tokens before the first response token) to
    the model, and the run trains and saves a ReFT adapter that reloads."""
    from deltatune.methods import reft
    from deltatune.train import load_train_config, train

    seen = []
    real = reft.position_masks

    def spy(mask, prompt_lengths, first, last):
        seen.append(prompt_lengths)
        return real(mask, prompt_lengths, first, last)

    monkeypatch.setattr(reft, "position_masks", spy)
    cfg = load_train_config(None, [f"model={tiny_model_dir}", f"output_dir={tmp_path}", "optim.steps=4",
                                   "optim.batch_size=4", "data.max_length=200", "data.general_eval=null",
                                   "method={peft_type: REFT, r: 2}", "optim.lr=1e-2"])  # fmt: skip
    result = train(cfg)
    prompt_lengths = [p for p in seen if p is not None]
    assert prompt_lengths and all(len(p) == 4 and (p > 10).all() for p in prompt_lengths[:4])
    loaded = dt.PeftModel.from_pretrained(tiny_llama_from(tiny_model_dir), result.adapter_dir)
    assert isinstance(loaded.get_base_model().model.layers[0], ReftBlock)
    with pytest.raises(dt.ConfigError, match="packing"):
        packed = [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'p'}", "optim.steps=1", "data.max_length=200",
                  "data.packing=true", "method={peft_type: REFT}"]  # fmt: skip
        train(load_train_config(None, packed))


def tiny_llama_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
