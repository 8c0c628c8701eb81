"""Encoder-decoder runs of `deltatune train` (task=seq2seq): config, objective, scoring, a run on a tiny T5."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.train import load_train_config, train
from deltatune.train.seq2seq import Seq2SeqObjective, rouge_l
from tests.conftest import plus_minus_texts, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A saved tiny T5 + character tokenizer (end of sequence: <|end|>)."""
    from tokenizers import decoders
    from transformers import T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()  # characters decode as written, without spaces
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _data(path, n: int, seed: int):
    """input: a string of '+' and '-'; target "up" when it holds more '+', else "down"."""
    rows = [{"input": text, "target": label} for text, label in plus_minus_texts(n, seed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = _data(tmp_path / "train.jsonl", 96, 0), _data(tmp_path / "test.jsonl", 16, 1)
    return load_train_config(None, [
        "task=seq2seq", f"model={model_dir}", f"data.train={train_file}", f"data.eval={eval_file}",
        "data.prompt_field=input", "data.response_field=target", f"output_dir={tmp_path / 'run'}",
        "optim.batch_size=16", "optim.lr=2e-2", "optim.warmup_steps=2", "optim.steps=50", "generate_eval=16",
        "max_new_tokens=6", *extra])  # fmt: skip


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    # LCS "the cat on the mat": 5 of 6 words on each side
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # the ROUGE paper's example: LCS "the gunman" (2 of 4 each way)
    assert rouge_l("the gunman killed police", "police killed the gunman") == pytest.approx(0.5)
    # P = 2/2, R = 2/4: F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("Paris, France!", "the city of paris france") == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert rouge_l("", "anything") == 0.0 and rouge_l("no overlap", "at all") == 0.0
    assert rouge_l("1992-10-07", "1992-10-07") == 1.0


def test_seq2seq_config_defaults_and_refusals(tiny_model_dir, tmp_path):
    cfg = load_train_config(None, ["task=seq2seq", f"model={tmp_path}"])
    assert cfg.method["task_type"] == "SEQ_2_SEQ_LM" and cfg.optim.steps == 80 and cfg.method["peft_type"] == "LORA"
    with pytest.raises(ConfigError, match="task=seq2seq needs model"):
        load_train_config(None, ["task=seq2seq"])
    with pytest.raises(ConfigError, match="task_type is CAUSAL_LM but task=seq2seq"):
        load_train_config(None, ["task=seq2seq", f"model={tmp_path}", "method.task_type=CAUSAL_LM"])
    for refused in ("data.packing=true", "quantize=nf4", "data.extra_eval={a: b}"):
        with pytest.raises(ConfigError, match=f"{refused.split('=')[0]} is for causal_lm runs"):
            load_train_config(None, ["task=seq2seq", f"model={tmp_path}", refused])
    from deltatune.pretrained import load_seq2seq_lm

    with pytest.raises(ConfigError, match="not an encoder-decoder one"):
        load_seq2seq_lm(tiny_model_dir)


def test_records_without_the_fields_are_refused_by_name(tmp_path):
    objective = Seq2SeqObjective(load_train_config(None, ["task=seq2seq", f"model={tmp_path}"]))
    with pytest.raises(ConfigError, match="example 1 has no text field 'response'.*data.response_field"):
        objective.check([{"prompt": "a", "response": "b"}, {"prompt": "a", "target": "b"}], "mine.jsonl")


def test_the_loss_is_the_decoders_cross_entropy_over_response_tokens(tiny_t5_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    cfg = _cfg(tiny_t5_dir, tmp_path)
    tokenizer = tiny_tokenizer()
    objective = Seq2SeqObjective(cfg)
    examples = objective.examples([{"input": "++-", "target": "up"}, {"input": "-", "target": "down"}], tokenizer, "x")
    assert examples[0].labels == [*tokenizer("up")["input_ids"], tokenizer.eos_token_id]
    batch = objective.collate(examples, tokenizer.pad_token_id)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    total = torch.tensor(0.0)
    for e in examples:  # each example alone, decoder fed its own shifted response: the loss summed by hand
        ids, target = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        start = torch.tensor([[model.config.decoder_start_token_id]])
        logits = model(input_ids=ids, decoder_input_ids=torch.cat([start, target[:, :-1]], 1)).logits
        total = total + torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum")
    torch.testing.assert_close(objective.loss_sum(model, batch, "fp32"), total, rtol=1e-5, atol=1e-5)
    assert objective.count(batch) == sum(len(e.labels) for e in examples)


METHODS = {
    "lora": [],
    "ia3": ["method={peft_type: IA3}", "optim.lr=5e-2"],
    "prompt_tuning": ["method={peft_type: PROMPT_TUNING, num_virtual_tokens: 4}", "optim.lr=1e-1"],
    "prefix_tuning": ["method={peft_type: PREFIX_TUNING, num_virtual_tokens: 4}", "optim.lr=5e-2"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_seq2seq_run_learns_scores_and_its_adapter_reloads(tiny_t5_dir, tmp_path, method):
    """Every method runs through the same config; on this random tiny T5 only LoRA learns the task in 50 steps
    (the others change too little of a model that knows nothing), so the others are held to a falling loss."""
    result = train(_cfg(tiny_t5_dir, tmp_path, *METHODS[method]))
    assert set(result.scores) == {"held-out exact match", "held-out ROUGE-L"}
    assert result.scored_by == "generation (greedy)" and len(result.samples) == 16
    if method == "lora":
        assert result.losses[-1] < 0.5 * result.losses[0]
        assert result.metric_after >= 0.75 > result.metric_before  # exact match of "up" / "down"
        assert result.scores["held-out ROUGE-L"][1] >= result.metric_after  # a right answer's ROUGE-L is 1
    else:
        assert result.losses[-1] < 0.9 * result.losses[0]
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_2_SEQ_LM"

    from deltatune.pretrained import load_seq2seq_lm

    base, tokenizer = load_seq2seq_lm(tiny_t5_dir)
    loaded = dt.PeftModel.from_pretrained(base, result.adapter_dir)
    assert type(loaded) is dt.PeftModelForSeq2SeqLM
    cfg = _cfg(tiny_t5_dir, tmp_path)
    objective = Seq2SeqObjective(cfg)
    records = [json.loads(line) for line in open(cfg.data.eval)]
    predictions = objective.predict(
        loaded, objective.examples(records, tokenizer, "x"), tokenizer.pad_token_id, 8, "cpu"
    )
    assert predictions == [s["after"] for s in result.samples]
