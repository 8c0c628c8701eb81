"""Task classes, peft's names and state-dict helpers, and transformers.Trainer with its default arguments."""

from __future__ import annotations

import inspect

import pytest
import torch

import deltatune as dt
from tests.conftest import model_output, perturb_trainable, tiny_bert, tiny_causal_lm, tiny_llama, tiny_tokenizer

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}


def test_task_type_selects_the_task_class_on_create_and_load(tmp_path):
    config = dt.LoraConfig(r=2, target_modules=["q_proj"], task_type=dt.TaskType.CAUSAL_LM)
    model = dt.get_peft_model(tiny_llama(), config)
    assert type(model) is dt.PeftModelForCausalLM
    model.save_pretrained(tmp_path)
    assert type(dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)) is dt.PeftModelForCausalLM
    plain = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    assert type(plain) is dt.PeftModel
    with pytest.raises(dt.ConfigError, match="task_type"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], task_type="TRANSLATION"))


def test_task_forward_names_its_inputs_and_passes_them_on():
    from transformers.utils.generic import find_labels

    assert find_labels(dt.PeftModelForCausalLM) == ["labels"]
    assert find_labels(dt.PeftModelForQuestionAnswering) == ["start_positions", "end_positions"]
    assert "decoder_input_ids" in inspect.signature(dt.PeftModelForSeq2SeqLM.forward).parameters
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    torch.testing.assert_close(model(IDS["input_ids"]).logits, model_output(model, IDS))  # positional input_ids
    assert model(**IDS, labels=IDS["input_ids"]).loss > 0
    with pytest.raises(dt.UnsupportedArgumentError, match="task_ids"):
        model(**IDS, task_ids=torch.zeros(2, dtype=torch.long))
    classifier = dt.get_peft_model(tiny_bert(), dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert classifier(**IDS, labels=torch.tensor([0, 2])).loss > 0


def _rows(tokenizer, n):
    texts = [f"the {i}th of May" for i in range(n)]
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids, "text": text})
    return rows


def test_transformers_trainer_with_default_arguments_trains_and_evaluates(tmp_path):
    """Regression: with remove_unused_columns=True (the default) Trainer dropped every column, and evaluate()
    returned no eval_loss, since PeftModel.forward(*args, **kwargs) named nothing."""
    from transformers import Trainer, TrainingArguments

    tokenizer = tiny_tokenizer()
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_peft_model(tiny_causal_lm(len(tokenizer)), config)
    seen_keys = set()

    def collate(features):
        seen_keys.update(k for f in features for k in f)
        width = max(len(f["input_ids"]) for f in features)
        pad = lambda key, value: torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])  # noqa: E731
        return {
            "input_ids": pad("input_ids", 0),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100),
        }

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_rows(tokenizer, 16),
        eval_dataset=_rows(tokenizer, 8),
        data_collator=collate,
    )
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert seen_keys == {"input_ids", "attention_mask", "labels"}  # the unused "text" column was removed, no more
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    prediction = trainer.predict(_rows(tokenizer, 4))
    assert prediction.label_ids is not None and prediction.label_ids.shape[0] == 4


def test_state_dict_helpers_match_peft_and_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    ours = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    want = peft.get_peft_model_state_dict(theirs)
    got = dt.get_peft_model_state_dict(ours)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    from_full = dt.get_peft_model_state_dict(ours, state_dict=ours.state_dict())
    assert all(torch.equal(from_full[k], want[k]) for k in want)
    loaded = dt.load_peft_weights(tmp_path)
    assert all(torch.equal(loaded[k], want[k]) for k in want)

    other = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    result = dt.set_peft_model_state_dict(other, loaded)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(model_output(other, IDS), model_output(ours, IDS), rtol=0, atol=0)
    with pytest.raises(dt.CheckpointError):
        dt.set_peft_model_state_dict(other, {k: v[:1] for k, v in loaded.items()})


def test_loraplus_optimizer_at_peft_import_path():
    from deltatune.optimizers import create_loraplus_optimizer

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-3, 4e-3]


def test_peft_config_from_pretrained_picks_the_method_and_layer_switches(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    config = dt.PeftConfig.from_pretrained(tmp_path)
    assert type(config) is dt.LoraConfig and config.r == 2 and model.active_peft_config.r == 2
    with pytest.raises(dt.ConfigError, match="peft_type"):
        dt.VeraConfig.from_pretrained(tmp_path)
    base_output = model_output(tiny_llama(), IDS)
    model.disable_adapter_layers()
    torch.testing.assert_close(model_output(model, IDS), base_output, rtol=0, atol=0)
    model.enable_adapter_layers()
    assert not torch.allclose(model_output(model, IDS), base_output)


def test_peft_model_api_additions(capsys):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    model.set_requires_grad("b", True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora  # both adapters now
    model.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters()) and model.active_peft_config.inference_mode
    assert model.base_model_torch_dtype == torch.float32
    with pytest.raises(dt.UnsupportedArgumentError, match="low_cpu_mem_usage"):
        model.add_adapter("c", dt.LoraConfig(r=2, target_modules=["q_proj"]), low_cpu_mem_usage=True)
    model.add_adapter("c", dt.LoraConfig(r=2, target_modules=["q_proj"]), autocast_adapter_dtype=True)
    want = model_output(model, IDS)
    merged = model.merge_and_unload(progressbar=True)
    torch.testing.assert_close(model_output(merged, IDS), want, rtol=1e-5, atol=1e-5)


def test_inject_adapter_in_model_wraps_in_place():
    from deltatune.layers import AdapterLayer

    base = tiny_llama()
    out = dt.inject_adapter_in_model(dt.LoraConfig(r=2, target_modules=["q_proj"]), base)
    assert out is base and sum(isinstance(m, AdapterLayer) for m in base.modules()) == 2
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {
        n for n in dict(base.named_parameters()) if "lora_" in n
    }


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_auto_classes_open_adapters_both_ways(tiny_model_dir, tmp_path, task_type):
    """A deltatune adapter opens with deltatune's and peft's auto classes (task_type, or peft's auto_mapping)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    config = dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type=task_type)
    ours = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).eval()
    ours.save_pretrained(tmp_path)
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(0))
    want = ours(input_ids=ids).logits
    auto, peft_auto = (
        (dt.AutoPeftModelForCausalLM, peft.AutoPeftModelForCausalLM)
        if task_type
        else (dt.AutoPeftModel, peft.AutoPeftModel)
    )
    for loaded in (auto.from_pretrained(tmp_path), peft_auto.from_pretrained(tmp_path)):
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    if task_type is None:
        with pytest.raises(dt.ConfigError, match="only transformers classes"):
            import json

            path = tmp_path / "adapter_config.json"
            data = json.loads(path.read_text())
            data["auto_mapping"]["parent_library"] = "os"
            path.write_text(json.dumps(data))
            dt.AutoPeftModel.from_pretrained(tmp_path)


def test_layer_and_model_status_match_peft_on_the_same_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ours.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    theirs.load_adapter(tmp_path / "b", adapter_name="b", is_trainable=True)
    for model in (ours, theirs):
        model.set_adapter("b")
        model.merge_adapter()
    status_fields = ("enabled", "merged_adapters", "available_adapters", "devices")
    our_layers = {s.name: s for s in dt.get_layer_status(ours)}
    their_layers = {s.name.removeprefix("model."): s for s in peft.get_layer_status(theirs)}
    assert our_layers.keys() == their_layers.keys()
    for name, status in our_layers.items():
        assert {f: getattr(status, f) for f in status_fields} == {
            f: getattr(their_layers[name], f) for f in status_fields
        }
    mine, peft_status = dt.get_model_status(ours), peft.get_model_status(theirs)
    fields = ("trainable_params", "total_params", "num_adapter_layers", "peft_types", "merged_adapters", "enabled")
    fields += ("active_adapters",)
    fields += ("available_adapters", "base_model_type", "quantization_backend")
    assert {f: getattr(mine, f) for f in fields} == {f: getattr(peft_status, f) for f in fields}
    assert our_layers["model.layers.0.self_attn.v_proj"].active_adapters == []  # "b" is not there: ours says so


def test_cast_mixed_precision_params_keeps_the_adapter_in_float32():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    dt.cast_mixed_precision_params(model, torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("direction", ["deltatune->peft", "peft->deltatune"])
def test_classification_head_trains_saves_and_moves_like_peft(tmp_path, direction):
    """SEQ_CLS trains the fresh `classifier` head with the adapter (peft's rule); a head also named in
    target_modules is trained whole, not adapted; the saved head moves between the libraries."""
    import peft

    def build(lib):
        config = lib.LoraConfig(r=2, target_modules=["query", "classifier"], task_type="SEQ_CLS")
        return lib.get_peft_model(tiny_bert(), config)

    ours, theirs = build(dt), build(peft)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert ours.peft_config["default"].modules_to_save == ["classifier"]  # tiny BERT has no `score`
    source, lib_load = (ours, peft) if direction == "deltatune->peft" else (theirs, dt)
    perturb_trainable(source, scale=0.3)
    source.eval().save_pretrained(tmp_path)
    loaded = lib_load.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(model_output(loaded.eval(), IDS), model_output(source, IDS), atol=1e-5, rtol=1e-5)
    head = loaded.base_model.model.classifier
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)
