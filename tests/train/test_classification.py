"""Classification runs of `deltatune train` (task=classification): config, objective, head, fusion stages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train import load_train_config, train
from deltatune.train.data import read_records
from deltatune.train.objectives import ClassificationObjective
from tests.conftest import plus_minus_texts, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A saved tiny BERT body (no head: the run adds one) + character tokenizer."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _data(path, n: int, seed: int):
    """Label "up" when the text holds more '+' than '-' characters, else "down"."""
    rows = [{"text": text, "label": label} for text, label in plus_minus_texts(n, seed, extra="ab")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = _data(tmp_path / "train.jsonl", 96, 0), _data(tmp_path / "test.jsonl", 32, 1)
    return load_train_config(None, [
        "task=classification", f"model={model_dir}", f"data.train={train_file}", f"data.eval={eval_file}",
        f"output_dir={tmp_path / 'run'}", "optim.batch_size=16", "optim.lr=1e-2", "optim.warmup_steps=2",
        "optim.steps=60", *extra])  # fmt: skip


def test_classification_defaults_and_refusals():
    cfg = load_train_config(None, ["task=classification", "method.r=4"])
    assert (cfg.model, cfg.data.train, cfg.optim.steps) == ("minilm", "bundled:sentiment", 150)
    assert cfg.method == {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.05, "task_type": "SEQ_CLS"}
    causal = load_train_config(None, [])
    assert (causal.model, causal.data.train, causal.optim.steps, causal.method["target_modules"][0]) == (
        "smollm2", "bundled:quickstart", 80, "q_proj")  # fmt: skip
    with pytest.raises(dt.ConfigError, match="task_type is CAUSAL_LM"):
        load_train_config(None, ["task=classification", "method.task_type=CAUSAL_LM"])
    with pytest.raises(dt.ConfigError, match="generate_eval is for causal_lm"):
        load_train_config(None, ["task=classification", "generate_eval=8"])
    records = read_records("bundled:sentiment", "train")
    assert len(records) == 480 and {r["label"] for r in records} == {"positive", "negative"}
    assert len(read_records("bundled:intents", "test")) == 80


def test_objective_loss_is_the_cross_entropy_of_the_labels():
    from transformers import BertConfig, BertForSequenceClassification

    objective = ClassificationObjective(load_train_config(None, ["task=classification"]), labels=["a", "b", "c"])
    records = [{"text": "abc", "label": "c"}, {"text": "ab", "label": "a"}]
    objective.check(records, "x")
    tokenizer = tiny_tokenizer()
    examples = objective.examples(records, tokenizer, "x")
    batch = objective.collate(examples, tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [2, 0] and batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, num_labels=3)  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = -(logits.log_softmax(-1)[0, 2] + logits.log_softmax(-1)[1, 0])
    torch.testing.assert_close(objective.loss_sum(model, batch, "fp32"), by_hand)
    assert objective.count(batch) == 2
    with pytest.raises(dt.ConfigError, match=r"labels \['d'\] do not occur"):
        objective.check([{"text": "a", "label": "d"}], "eval.jsonl")
    with pytest.raises(dt.ConfigError, match="no 'label' field"):
        objective.check([{"text": "a", "class": "a"}], "eval.jsonl")


@pytest.mark.parametrize("model_kind", ["bert", "llama"])
def test_classification_run_learns_and_its_adapter_reloads(tiny_encoder_dir, tiny_model_dir, tmp_path, model_kind):
    """A run trains the adapter and the new head (`classifier` on BERT, `score` on a decoder), scores accuracy
    before/after, and saves an adapter that, loaded onto a fresh classifier, predicts the same labels."""
    model_dir = tiny_encoder_dir if model_kind == "bert" else tiny_model_dir
    targets = "[query, value]" if model_kind == "bert" else "[q_proj, v_proj]"
    result = train(_cfg(model_dir, tmp_path, f"method.target_modules={targets}"))
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.metric_after >= 0.9 and result.scored_by == "predicted label"
    assert len(result.samples) == 32 and {s["reference"] for s in result.samples} == {"up", "down"}
    head = "classifier" if model_kind == "bert" else "score"
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert f"base_model.model.{head}.weight" in saved
    labels = json.loads((result.adapter_dir / "labels.json").read_text())
    assert labels == ["down", "up"]

    from deltatune.pretrained import load_sequence_classifier

    base, tokenizer = load_sequence_classifier(model_dir, labels)
    loaded = dt.PeftModel.from_pretrained(base, result.adapter_dir)
    assert type(loaded) is dt.PeftModelForSequenceClassification
    cfg = _cfg(model_dir, tmp_path)
    objective = ClassificationObjective(cfg, labels=labels)
    records = read_records(cfg.data.eval)
    predictions = objective.predict(
        loaded, objective.examples(records, tokenizer, "x"), tokenizer.pad_token_id, 8, "cpu"
    )
    assert predictions == [s["after"] for s in result.samples]


def test_fusion_second_stage_trains_only_the_fusion_and_the_head(tiny_encoder_dir, tmp_path):
    """AdapterFusion through the trainer: stage one trains bottleneck adapters on two tasks (2 and 3 labels), stage
    two loads their bodies frozen (`load_adapters`: each without its own task's head) and trains a fusion over them;
    the sources' tensors do not change."""
    stage_one = train(_cfg(tiny_encoder_dir, tmp_path / "one", "method={peft_type: BOTTLENECK}", "optim.steps=20"))
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"text": t * 3, "label": t}) + "\n" for t in "xyz" * 8))
    other = train(_cfg(tiny_encoder_dir, tmp_path / "other", "method={peft_type: BOTTLENECK}", "optim.steps=5",
                       f"data.train={three}", f"data.eval={three}"))  # fmt: skip
    sources = f"{{source: {stage_one.adapter_dir}, other: {other.adapter_dir}}}"
    fusion = train(_cfg(tiny_encoder_dir, tmp_path / "two", "optim.steps=20", f"load_adapters={sources}",
                        "method={peft_type: BOTTLENECK, fusion_of: [source, other]}"))  # fmt: skip
    model = fusion.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("fusion_" in n or "classifier.modules_to_save.default." in n for n in trainable)
    before = load_file(stage_one.adapter_dir / "adapter_model.safetensors")
    after = model.adapter_state_dict("source")
    assert sorted(after) == sorted(k for k in before if ".classifier." not in k)
    assert all(torch.equal(before[k].float(), after[k].float()) for k in after)
    saved = json.loads((fusion.adapter_dir / "adapter_config.json").read_text())
    assert saved["fusion_of"] == ["source", "other"] and saved["task_type"] == "SEQ_CLS"
    assert sorted(p.name for p in fusion.adapter_dir.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "labels.json"]  # fmt: skip
