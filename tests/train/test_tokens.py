"""Every token counts: no template default system prompt, the output head only where a response is predicted,
generation batched by length, and the trainer's time per phase and estimate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.train import load_train_config, train
from deltatune.train.config import DataConfig
from deltatune.train.data import IGNORE, Example, build_examples, collate, render_chat
from deltatune.train.evaluate import generate_answers
from deltatune.train.objectives import CausalLMObjective, head_on_responses_supported
from tests.conftest import perturb_trainable, tiny_causal_lm, tiny_tokenizer

# ChatML with SmolLM2's rule: a conversation that does not start with a system turn gets the template's own
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|system|>Be a helpful bot<|end|>"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
REFUSING_TEMPLATE = (  # Gemma's rule: no system role at all
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
)
USER = [{"role": "user", "content": "hi"}]


def _text(tokenizer, ids: list[int]) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(ids))


def test_the_templates_default_system_prompt_is_left_out_unless_asked_for():
    tok = tiny_tokenizer()
    tok.chat_template = DEFAULT_SYSTEM_TEMPLATE
    assert _text(tok, render_chat(tok, USER)) == "<|system|><|end|><|user|>hi<|end|>"
    default = "<|system|>Be a helpful bot<|end|><|user|>hi<|end|>"
    assert _text(tok, render_chat(tok, USER, template_system=True)) == default
    own = [{"role": "system", "content": "Be brief"}, *USER]
    assert _text(tok, render_chat(tok, own)) == "<|system|>Be brief<|end|><|user|>hi<|end|>"


def test_templates_without_a_default_system_prompt_render_as_they_are():
    for template, want in [(None, "<|user|>hi<|end|>"), (REFUSING_TEMPLATE, "<|user|>hi<|end|>")]:
        tok = tiny_tokenizer()
        if template:
            tok.chat_template = template
        assert _text(tok, render_chat(tok, USER)) == want


def test_data_system_prompt_text_and_null():
    tok = tiny_tokenizer()
    tok.chat_template = DEFAULT_SYSTEM_TEMPLATE
    records = [{"prompt": "hi", "response": "yo"}]
    text = {
        setting: _text(tok, build_examples(records, tok, DataConfig(system_prompt=setting), "r")[0].input_ids)
        for setting in ("", "Be brief", None)
    }
    assert text[""] == "<|system|><|end|><|user|>hi<|end|><|assistant|>yo<|end|>"
    assert text["Be brief"] == "<|system|>Be brief<|end|><|user|>hi<|end|><|assistant|>yo<|end|>"
    assert text[None] == "<|system|>Be a helpful bot<|end|><|user|>hi<|end|><|assistant|>yo<|end|>"


@pytest.mark.parametrize("chunked", [False, True])
def test_head_on_responses_gives_the_full_logits_loss(chunked):
    """The loss from logits at response positions only (whole, or chunk by chunk through `chunked_loss`) equals
    cross-entropy written out over the full logits."""
    from deltatune.chunked_loss import plain_output_head

    model = dt.get_peft_model(tiny_causal_lm(40), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model)
    g = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in [(9, 5), (14, 4), (6, 3)]:
        ids = torch.randint(3, 40, (length,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    batch = collate(examples, pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits.float(), -1)
    want = torch.zeros(())
    for row, e in enumerate(examples):
        for t in range(1, len(e.labels)):
            if e.labels[t] != IGNORE:
                want = want - log_probs[row, t - 1, e.labels[t]]
    objective = CausalLMObjective(load_train_config(None, []))
    assert head_on_responses_supported(model)
    objective.head_on_responses = True
    objective.chunked_head = plain_output_head(model) if chunked else None
    got = objective.loss_sum(model, batch, "fp32")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_forward_without_logits_to_keep_keeps_the_full_head():
    class Plain(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    assert not head_on_responses_supported(Plain())


def test_generation_in_length_sorted_batches_answers_in_the_prompts_order():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(len(tok))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(6, len(tok), (n,), generator=g).tolist() for n in (7, 3, 12, 5, 9)]
    alone = [generate_answers(model, tok, [p], 6, "cpu")[0] for p in prompts]
    assert generate_answers(model, tok, prompts, 6, "cpu", batch_size=2) == alone


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_a_shared_prefill_generates_as_each_prompt_prefilled_alone(family):
    from deltatune.train.padding_free import SharedPrefill, padding_free_supported, shared_prefill_supported
    from tests.conftest import tiny_decoder, tiny_gpt2

    base = tiny_gpt2() if family == "gpt2" else tiny_decoder(family)
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=targets)).eval()
    perturb_trainable(model)  # the adapter's own keys and values are in the cache
    assert padding_free_supported(model) and shared_prefill_supported(model)
    head, tail = [5, 6, 7, 8, 9], torch.randint(10, 97, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [head + tail[:4], head + tail[4:7], head + tail[:4], head[:2], head + tail[:6], tail[8:20], head[:3]]
    shared = SharedPrefill(model, prompts, "cpu")
    assert sum(len(rows) for rows in shared.rows) == sum(len(p) - 1 for p in prompts)  # each prompt's all but last
    assert shared.layers[0][0].shape[2] < sum(len(p) - 1 for p in prompts)  # fewer computed: the prefixes shared
    calls = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    batch = [0, 2, 3, 4, 6]  # a batch of them, left-padded, with an identical pair and a 2-token prompt
    width = max(len(prompts[i]) for i in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(batch):
        ids[row, width - len(prompts[i]) :], mask[row, width - len(prompts[i]) :] = torch.tensor(prompts[i]), 1
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, **calls, **shared.cache_for(batch, width - 1))
        for row, i in enumerate(batch):
            alone = model.generate(input_ids=torch.tensor([prompts[i]]), **calls)
            assert got.sequences[row, width:].tolist() == alone.sequences[0, len(prompts[i]) :].tolist()
            for step_got, step_alone in zip(got.scores, alone.scores, strict=True):
                torch.testing.assert_close(step_got[row], step_alone[0], rtol=1e-4, atol=1e-5)


def test_generation_batches_hold_at_most_their_prompts_and_tokens(monkeypatch):
    from deltatune.train import evaluate

    monkeypatch.setattr(evaluate, "BATCH_TOKENS", 10)
    prompts = [[1] * n for n in (4, 4, 3, 9, 12, 1, 1, 1)]
    batches = evaluate._batches(list(range(8)), prompts, size=3)
    assert batches == [[0, 1], [2], [3], [4], [5, 6, 7]]  # 4+4+3 > 10; a 12-token prompt still gets its own batch


def test_scoring_with_shared_prefixes_answers_as_without():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(len(tok))
    records = [{"prompt": f"Convert this date: {d}", "response": "x"} for d in ("1 May", "2 June", "3 July", "1 Mayo")]
    prompts = [render_chat(tok, [{"role": "user", "content": r["prompt"]}], True) for r in records]
    plain = generate_answers(model, tok, prompts, 6, "cpu", batch_size=3)
    assert generate_answers(model, tok, prompts, 6, "cpu", batch_size=3, share_prefixes=True) == plain


def test_a_run_reports_its_time_per_phase_and_an_estimate(tiny_model_dir, tmp_path, capsys):
    from rich.console import Console

    cfg = load_train_config(
        None,
        [f"model={tiny_model_dir}", f"output_dir={tmp_path}", "optim.steps=6", "optim.batch_size=2", "generate_eval=2"],
    )
    result = train(cfg, console=Console(force_terminal=False, width=200))
    assert list(result.phases) == ["setup", "score before", "train", "held-out loss", "score after", "save"]
    assert all(s >= 0 for s in result.phases.values())
    assert sum(result.phases.values()) <= result.seconds + 1e-6
    assert "estimate from the first steps" in capsys.readouterr().out


@pytest.mark.parametrize("steps", [4, 5])
def test_no_estimate_when_nothing_is_left_to_estimate(tiny_model_dir, tmp_path, capsys, steps):
    from rich.console import Console

    cfg = load_train_config(
        None, [f"model={tiny_model_dir}", f"output_dir={tmp_path}", f"optim.steps={steps}", "optim.batch_size=2"]
    )
    train(cfg, console=Console(force_terminal=False, width=200))
    assert ("estimate from the first steps" in capsys.readouterr().out) == (steps > 4)


def _examples(vocab: int, shapes: list[tuple[int, int]], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, prompt in shapes:
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def _written_out_loss(model, examples: list[Example]) -> torch.Tensor:
    """Σ -log p(response token | its prefix), each example run alone (no padding, no neighbours)."""
    total = torch.zeros(())
    for e in examples:
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0].float(), -1)
        total = total - sum(log_probs[t - 1, e.labels[t]] for t in range(1, len(e.labels)) if e.labels[t] != IGNORE)
    return total


def _assert_the_row_gives_each_examples_own_loss_and_gradients(model, objective, examples, batch) -> None:
    want = _written_out_loss(model, examples)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with objective.training_layout(model):
        got = objective.loss_sum(model, batch, "fp32")
        got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, want_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("head", ["full", "responses", "chunked"])
def test_padding_free_rows_give_each_examples_own_loss_and_gradients(family, head):
    from deltatune.chunked_loss import plain_output_head
    from deltatune.train.padding_free import padding_free_supported
    from tests.conftest import tiny_decoder, tiny_gpt2

    base = tiny_gpt2() if family == "gpt2" else tiny_decoder(family)
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=targets)).eval()  # GPT-2 has dropout
    perturb_trainable(model)
    assert padding_free_supported(model)
    examples = _examples(97, [(9, 5), (14, 4), (6, 3), (11, 1)])
    objective = CausalLMObjective(load_train_config(None, []))
    objective.padding_free, objective.head_on_responses = True, head != "full"
    objective.chunked_head = plain_output_head(model) if head == "chunked" else None
    assert (objective.chunked_head is not None) == (head == "chunked")
    batch = objective.collate(examples, pad_id=0)
    # 40 tokens, less each example's last (it predicts nothing); random prompts share no prefix: segments
    assert batch["input_ids"].shape == (1, 36) and objective.count(batch) == 4 + 10 + 3 + 10
    assert batch["segment_lengths"].tolist() == [8, 13, 5, 10]
    _assert_the_row_gives_each_examples_own_loss_and_gradients(model, objective, examples, batch)
    assert model.get_base_model().config._attn_implementation == "sdpa"  # restored after the run's steps


PROMPT = [5, 6, 7, 8]
SHARING = [  # (input_ids, first label index), IGNORE before it; and the tokens each adds to the row
    (PROMPT + [9, 10, 11, 12, 13], 6),  # all 8 of its positions that feed a prediction
    (PROMPT + [9, 10, 20, 21], 6),  # the same prompt, another answer: positions 5-6 (0-4 are the first's)
    (PROMPT + [30, 31, 32, 33], 5),  # shares PROMPT: positions 4-6
    ([40, 41, 42, 43, 44], 2),  # shares nothing: positions 0-3
    ([5, 6, 50, 51, 52, 53, 54, 55], 3),  # shares [5, 6]: positions 2-6
]


def _sharing_examples() -> list[Example]:
    out = [Example(ids, [IGNORE] * first + ids[first:]) for ids, first in SHARING]
    out[-1].labels[4:6] = [IGNORE, IGNORE]  # two answers with a prompt between them: that prompt follows an answer
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("head", ["full", "responses", "chunked"])
def test_a_shared_prompt_prefix_is_computed_once_with_each_examples_own_loss_and_gradients(family, head):
    from deltatune.chunked_loss import plain_output_head
    from deltatune.train.padding_free import padding_free_supported
    from tests.conftest import tiny_decoder, tiny_gpt2

    base = tiny_gpt2() if family == "gpt2" else tiny_decoder(family)
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=targets)).eval()
    perturb_trainable(model)
    assert padding_free_supported(model)
    examples = _sharing_examples()
    objective = CausalLMObjective(load_train_config(None, []))
    objective.padding_free, objective.head_on_responses = True, head != "full"
    objective.chunked_head = plain_output_head(model) if head == "chunked" else None
    batch = objective.collate(examples, pad_id=0)
    assert batch["input_ids"].shape == (1, 8 + 2 + 3 + 4 + 5)
    assert batch["position_ids"][0].tolist() == [*range(8), 5, 6, 4, 5, 6, *range(4), *range(2, 7)]
    assert objective.count(batch) == 3 + 2 + 3 + 3 + 3
    _assert_the_row_gives_each_examples_own_loss_and_gradients(model, objective, examples, batch)


def test_each_example_attends_to_the_shared_rows_it_opens_with_then_to_its_own():
    from deltatune.train.padding_free import collate_flat

    batch = collate_flat(_sharing_examples(), IGNORE)
    # rows: the first example's positions 0-7 (rows 0-7), the second's 5-6 (8-9) after rows 0-4, the third's 4-6
    # (10-12) after rows 0-3, the fourth's 0-3 (13-16), the fifth's 2-6 (17-21) after rows 0-1
    assert batch["segment_lengths"].tolist() == [8, 2, 3, 4, 5]
    assert batch["prefix_lengths"].tolist() == [0, 5, 4, 0, 2]
    assert batch["prefix_rows"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]
    flat = collate_flat(_sharing_examples(), IGNORE, share_prefixes=False)
    assert flat["segment_lengths"].tolist() == [8, 7, 7, 4, 7] and "prefix_rows" not in flat


def test_a_model_whose_attention_ignores_segments_keeps_padded_rows():
    from deltatune.train.padding_free import padding_free_supported

    model = tiny_causal_lm(40)
    model.config._attn_implementation = "flex_attention"  # not routed through the probe's SDPA/eager
    assert not padding_free_supported(model)


def test_the_trainer_trains_padding_free_and_the_same_as_padded(tiny_model_dir, tmp_path):
    losses = {}
    for padding_free in (True, False):
        cfg = load_train_config(
            None,
            [f"model={tiny_model_dir}", f"output_dir={tmp_path / str(padding_free)}", "optim.steps=3",
             "optim.batch_size=3", "method.lora_dropout=0", f"data.padding_free={str(padding_free).lower()}"],
        )  # fmt: skip
        losses[padding_free] = train(cfg).losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
