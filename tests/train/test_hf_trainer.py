"""A PeftModel trains under transformers.Trainer and its adapter saves and reloads."""

from __future__ import annotations

import torch

import deltatune as dt
from tests.conftest import tiny_causal_lm, tiny_tokenizer


def test_peft_model_trains_under_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from deltatune.train.config import DataConfig
    from deltatune.train.data import build_examples, collate, read_records

    tokenizer = tiny_tokenizer()
    examples = build_examples(read_records("bundled:quickstart")[:32], tokenizer, DataConfig(max_length=200), "x")
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collator(rows):
        from deltatune.train.data import Example

        return collate([Example(r["input_ids"], r["labels"]) for r in rows], tokenizer.pad_token_id)

    model = dt.get_peft_model(tiny_causal_lm(len(tokenizer)), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=8,
        max_steps=12,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    model.save_pretrained(tmp_path / "adapter")
    reloaded = dt.PeftModel.from_pretrained(tiny_causal_lm(len(tokenizer)), tmp_path / "adapter")
    ids = torch.tensor([dataset[0]["input_ids"]])
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
