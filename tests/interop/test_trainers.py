"""transformers.Trainer and TRL's SFTTrainer given a deltatune model, with their default saving: every checkpoint and
`save_model` holds the adapter (not the base model), peft and deltatune load it, and `resume_from_checkpoint`
continues exactly where an uninterrupted run would be."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.conftest import model_output, tiny_causal_lm, tiny_tokenizer

IDS = {"input_ids": torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))}


def _rows(tokenizer, n):
    rows = []
    for i in range(n):
        ids = tokenizer(f"the {i}th of May")["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    return rows


def _collate(features):
    width = max(len(f["input_ids"]) for f in features)
    pad = lambda key, value: torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])  # noqa: E731
    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


def _trainer(tmp_path, steps, **kwargs):
    from transformers import Trainer, TrainingArguments

    tokenizer = tiny_tokenizer()
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = dt.get_peft_model(tiny_causal_lm(len(tokenizer)), config)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        report_to=[],
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        **kwargs,
    )
    rows = _rows(tokenizer, 16)
    return Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8], data_collator=_collate)


def _lora(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_trainer_checkpoints_and_save_model_hold_the_adapter_and_resume_exactly(tmp_path):
    peft = pytest.importorskip("peft")
    full = _trainer(tmp_path / "full", 4)
    full.train()
    full.save_model(str(tmp_path / "final"))

    final = tmp_path / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()  # a final save is a plain adapter folder
    saved = load_file(final / "adapter_model.safetensors")
    assert saved.keys() == full.model.adapter_state_dict("default").keys()  # peft's keys, nothing of the base
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # the checkpoint also holds the adapters under the model's own keys, what Trainer resumes from: adapter-sized
    checkpoint = tmp_path / "full" / "checkpoint-2"
    resume_weights = load_file(checkpoint / "model.safetensors")
    assert set(resume_weights) == {k for k in full.model.state_dict() if "lora_" in k}
    base_bytes = sum(v.numel() * v.element_size() for v in full.model.get_base_model().state_dict().values())
    assert (checkpoint / "model.safetensors").stat().st_size < base_bytes / 10

    # both libraries open the final adapter and agree with the trained model
    base = tiny_causal_lm(len(tiny_tokenizer()))
    ours = dt.PeftModel.from_pretrained(base, final)
    expected = model_output(full.model.eval(), IDS)
    torch.testing.assert_close(model_output(ours, IDS), expected, atol=1e-5, rtol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_causal_lm(len(tiny_tokenizer())), str(final)).eval()
    torch.testing.assert_close(model_output(theirs, IDS), expected, atol=1e-5, rtol=1e-5)

    # resuming from checkpoint-2 ends where the uninterrupted 4-step run did
    resumed = _trainer(tmp_path / "full", 4)
    before = _lora(resumed.model)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = _lora(resumed.model)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for key, value in _lora(full.model).items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-5)


def test_trainer_loads_the_best_checkpoint_at_the_end(tmp_path):
    trainer = _trainer(
        tmp_path, 4, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss"
    )
    trainer.train()
    best = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    live = trainer.model.state_dict()
    for key, value in best.items():
        torch.testing.assert_close(live[key], value)


def test_trl_sft_trainer_trains_a_deltatune_model_and_saves_the_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = tiny_tokenizer()
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = dt.get_peft_model(tiny_causal_lm(len(tokenizer)), config)
    before = _lora(model)
    data = datasets.Dataset.from_list([{"text": f"the {i}th of May"} for i in range(16)])
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        max_length=32,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    assert result.training_loss > 0
    after = _lora(model)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    trainer.save_model(str(tmp_path / "final"))
    loaded = dt.PeftModel.from_pretrained(tiny_causal_lm(len(tokenizer)), tmp_path / "final")
    with torch.no_grad():  # the class's forward: accelerate wrapped the instance's in (bf16) autocast for training
        expected = dt.PeftModelForCausalLM.forward(model.eval(), **IDS).logits
        torch.testing.assert_close(loaded(**IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
