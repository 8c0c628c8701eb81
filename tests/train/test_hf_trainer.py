"""A PeftModel trains under transformers.Trainer and its adapter saves and reloads."""

from __future__ import annotations

import torch

import deltatune as dt
from tests.conftest import tiny_causal_lm, tiny_tokenizer


def _hf_trainer(model, tokenizer, tmp_path, **extra):
    from transformers import Trainer, TrainingArguments

    from deltatune.train.config import DataConfig
    from deltatune.train.data import Example, build_examples, collate, read_records

    examples = build_examples(read_records("bundled:quickstart")[:32], tokenizer, DataConfig(max_length=200), "x")
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collator(rows):
        return collate([Example(r["input_ids"], r["labels"]) for r in rows], tokenizer.pad_token_id)

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
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, **extra), dataset


def test_peft_model_trains_under_transformers_trainer(tmp_path):
    tokenizer = tiny_tokenizer()
    model = dt.get_peft_model(tiny_causal_lm(len(tokenizer)), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer, dataset = _hf_trainer(model, tokenizer, tmp_path)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    model.save_pretrained(tmp_path / "adapter")
    reloaded = dt.PeftModel.from_pretrained(tiny_causal_lm(len(tokenizer)), tmp_path / "adapter")
    ids = torch.tensor([dataset[0]["input_ids"]])
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_adalora_allocates_under_transformers_trainer_with_the_callback(tmp_path):
    from deltatune.train.hf import AdapterHooksCallback

    tokenizer = tiny_tokenizer()
    config = dt.AdaLoraConfig(
        init_r=4, target_r=2, total_step=12, tinit=2, tfinal=3, target_modules=["q_proj", "v_proj"]
    )
    model = dt.get_peft_model(tiny_causal_lm(len(tokenizer)), config)
    seen = []
    model.update_and_allocate = lambda step, real=model.update_and_allocate: (seen.append(step), real(step))
    trainer, _ = _hf_trainer(model, tokenizer, tmp_path, callbacks=[AdapterHooksCallback()])
    trainer.train()
    assert seen == list(range(12))
    pattern = model.peft_config["default"].rank_pattern
    assert len(pattern) == 4 and sum(sum(v) for v in pattern.values()) == 2 * 4  # the target budget was reached


def test_the_chunked_loss_under_transformers_trainer_trains_the_same(tmp_path):
    """Same seeds, same batches, gradient accumulation 2 (Trainer passes num_items_in_batch): the chunked loss gives
    the losses of the model's own loss, step by step."""
    from deltatune.chunked_loss import enable_chunked_loss

    tokenizer = tiny_tokenizer()
    losses = {}
    for chunked in (False, True):
        torch.manual_seed(0)
        model = dt.get_peft_model(tiny_causal_lm(len(tokenizer)), dt.LoraConfig(r=4, target_modules=["q_proj"]))
        handle = enable_chunked_loss(model, chunk_size=16) if chunked else None
        trainer, _ = _hf_trainer(model, tokenizer, tmp_path / str(chunked))
        trainer.args.gradient_accumulation_steps, trainer.args.max_steps = 2, 4
        trainer.train()
        losses[chunked] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        if handle is not None:
            handle.remove()
    assert len(losses[True]) == 4
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-4)
