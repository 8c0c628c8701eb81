"""Prompt tuning, P-tuning and prefix tuning on encoder-decoder models (T5, BART), with peft as the oracle: a file
trained by either library gives the same outputs in the other, and `generate()` is step-by-step greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.errors import CheckpointError, ConfigError
from tests.conftest import perturb_trainable, tiny_llama, tiny_seq2seq

peft = pytest.importorskip("peft")

METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "ptuning-mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 8}),
    "ptuning-lstm": ("PromptEncoderConfig", {"encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM"}),
    "prefix": ("PrefixTuningConfig", {}),
}
N = 3


def _config(lib, method):
    name, kwargs = METHODS[method]
    return getattr(lib, name)(num_virtual_tokens=N, task_type="SEQ_2_SEQ_LM", **kwargs)


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 61, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second encoder input is left-padded
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, 61, (2, 4), generator=g)}


def _trained(lib, family, method):
    model = lib.get_peft_model(tiny_seq2seq(family), _config(lib, method))
    perturb_trainable(model, seed=4, scale=0.5)
    return model.eval()


def _greedy(model, inputs, steps):
    """Greedy decoding by hand: one forward of the whole decoder prefix per token."""
    start = model.config.decoder_start_token_id
    decoded = torch.full((inputs["input_ids"].shape[0], 1), start)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], decoder_input_ids=decoded
            ).logits
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoded


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_adapter_moves_between_the_libraries(family, method, direction, tmp_path):
    source, target = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    model = _trained(source, family, method)
    want = model(**_inputs())
    assert (want.logits - tiny_seq2seq(family)(**_inputs()).logits).abs().max() > 1e-2  # the adapter acts
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["num_transformer_submodules"] == 2
    loaded = target.PeftModel.from_pretrained(tiny_seq2seq(family), tmp_path).eval()
    got = loaded(**_inputs())
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_generate_is_step_by_step_greedy(family, method, tmp_path):
    model = _trained(dt, family, method)
    inputs = _inputs()
    generated = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    out = generated.sequences
    want = _greedy(model, inputs, 6)
    assert torch.equal(out, want[:, : out.shape[1]])
    with torch.no_grad():  # each step's logits, not only the argmax, are the forward's at that position
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], decoder_input_ids=out)
    scale = logits.logits.abs().max().item()  # cached vs whole-prefix sums differ by float noise, relative to it
    for step, step_logits in enumerate(generated.logits):
        torch.testing.assert_close(step_logits, logits.logits[:, step], rtol=0, atol=1e-4 * scale)
    if method != "prefix":  # peft's own generate agrees (for prefixes, see the next test)
        model.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(tiny_seq2seq(family), tmp_path).eval()
        assert torch.equal(
            theirs.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6,
                do_sample=False,
            ),
            out,
        )  # fmt: skip


def test_prefix_generate_keeps_the_positions_of_training_where_peft_does_not(tmp_path):
    """peft 0.21's generate() gives T5's first decoder token position 0 although its forward (training) puts it after
    the n prefix positions; deltatune's generate() equals its forward's greedy decoding, which equals peft's."""
    theirs = _trained(peft, "t5", "prefix")
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_seq2seq("t5"), tmp_path).eval()
    inputs = _inputs()
    by_hand = _greedy(theirs, inputs, 5)
    assert torch.equal(_greedy(ours, inputs, 5), by_hand)
    generated = ours.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=5, do_sample=False
    )
    assert torch.equal(generated, by_hand)


def test_prefix_beam_search_and_returned_sequences_on_t5():
    model = _trained(dt, "t5", "prefix")
    inputs = _inputs()
    out = model.generate(
        input_ids=inputs["input_ids"], max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False
    )
    assert out.shape == (4, 5) and torch.all(out[:, 0] == 0)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_training_moves_the_virtual_tokens_and_lowers_the_loss(method):
    model = dt.get_peft_model(tiny_seq2seq("t5", init_scale=1.0), _config(dt, method))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.numel() < 1000 for p in trainable)  # the base stays frozen
    optimizer = torch.optim.Adam(trainable, lr=0.1)
    losses = []
    for _ in range(20):
        loss = model(**_inputs()).loss
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if method == "prompt":  # peft's table has 2n rows; only the encoder's first n are read
            grad = trainable[0].grad
            assert grad.shape == (2 * N, 16) and grad[:N].abs().sum() > 0 and grad[N:].abs().sum() == 0
        optimizer.step()
    assert losses[-1] < 0.95 * losses[0]  # a frozen random model: virtual tokens move it a little (prompt: -8 %)


def test_submodule_count_that_contradicts_the_model_is_refused():
    with pytest.raises(ConfigError, match="num_transformer_submodules=1.*encoder-decoder"):
        dt.get_peft_model(tiny_seq2seq("t5"), dt.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=1))
    with pytest.raises(ConfigError, match="num_transformer_submodules=2.*decoder-only or encoder"):
        dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2))
    with pytest.raises(ConfigError, match="num_transformer_submodules must be 1.*or None"):
        dt.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=3)


def test_prefix_needs_as_many_decoder_layers_as_encoder_layers():
    with pytest.raises(ConfigError, match="3 encoder and 2 decoder layers"):
        dt.get_peft_model(tiny_seq2seq("t5", decoder_layers=2), dt.PrefixTuningConfig(num_virtual_tokens=2))
    # prompt tuning touches only the encoder's input: any decoder depth works
    model = dt.get_peft_model(tiny_seq2seq("t5", decoder_layers=2), dt.PromptTuningConfig(num_virtual_tokens=2))
    assert model(**_inputs()).logits.shape == (2, 4, 61)


def test_a_decoder_only_table_is_refused_by_an_encoder_decoder_model(tmp_path):
    """A prompt file made for a decoder-only model has n rows; the encoder-decoder adapter needs 2n: refused with
    both shapes named, and the model keeps its own table."""
    source = dt.get_peft_model(tiny_seq2seq("t5"), dt.PromptTuningConfig(num_virtual_tokens=N))
    model = dt.get_peft_model(tiny_seq2seq("t5"), dt.PromptTuningConfig(num_virtual_tokens=N))
    before = model.adapter_state_dict("default")["prompt_embeddings"].clone()
    tensors = {"prompt_embeddings": source.adapter_state_dict("default")["prompt_embeddings"][:N]}
    with pytest.raises(
        CheckpointError, match=r"shape \(3, 16\) from checkpoint, the shape in current model is \(6, 16\)"
    ):
        model.load_adapter_tensors("default", tensors)
    torch.testing.assert_close(model.adapter_state_dict("default")["prompt_embeddings"], before)
