"""Selective fine-tuning: BitFit's counts from the paper on BERT-base, exactly the intended tensors train and are
saved, top-k-layer partial fine-tuning, feature extraction, several adapters, and the errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.conftest import model_output, perturb_trainable, tiny_bert, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}


def _bert_base():
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        return BertModel(BertConfig())  # 768 wide, 12 layers, FFN 3072, with the pooler


@pytest.mark.parametrize(
    ("modules", "count"),
    [(None, 102_912), (["query", "intermediate.dense"], 46_080)],  # paper_facts §14: all biases; b_q + b_m2
)
def test_bitfit_counts_on_bert_base_are_the_paper_s(modules, count):
    model = dt.get_peft_model(_bert_base(), dt.SelectiveConfig(select_modules=modules))
    assert model.get_nb_trainable_parameters()[0] == count


def test_bitfit_trains_and_saves_exactly_the_biases_and_the_head(tmp_path):
    model = dt.get_peft_model(
        tiny_bert(), dt.SelectiveConfig(train_output_head=True, select_modules=["query", "value"])
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *{f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.selective_params.default.bias" for i in (0, 1)
          for m in ("query", "value")},
        "base_model.model.classifier.selective_params.default.weight",
        "base_model.model.classifier.selective_params.default.bias",
    }  # fmt: skip
    perturb_trainable(model)
    # independent truth: a fresh model with those parameters replaced computes the same outputs
    reference = tiny_bert()
    with torch.no_grad():
        for path, layer in model.get_base_model().named_modules():
            if hasattr(layer, "selective_params"):
                for pname, value in layer.selective_params["default"].items():
                    getattr(reference.get_submodule(path), pname).copy_(value)
    torch.testing.assert_close(model_output(model, IDS), model_output(reference, IDS), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {k.replace(".selective_params.default", "") for k in trainable}
    loaded = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(model_output(loaded, IDS), model_output(model, IDS), rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(model_output(model, IDS), model_output(tiny_bert(), IDS), rtol=0, atol=0)


def test_partial_fine_tuning_feature_extraction_and_errors():
    model = dt.get_peft_model(tiny_llama(), dt.SelectiveConfig(train_parameters=["weight"], top_k_layers=1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)  # the last of two blocks only
    head_only = dt.get_peft_model(tiny_bert(), dt.SelectiveConfig(train_output_head=True))
    assert head_only.get_nb_trainable_parameters()[0] == 32 * 3 + 3  # the classifier: feature extraction
    with pytest.raises(dt.ConfigError, match="without biases"):
        dt.get_peft_model(tiny_llama(), dt.SelectiveConfig())  # LLaMA has no biases: no BitFit
    with pytest.raises(dt.ConfigError, match="weight"):
        dt.SelectiveConfig(train_parameters=["scale"])
    model.add_adapter("other", dt.SelectiveConfig(train_parameters=["weight"], top_k_layers=1))
    with pytest.raises(dt.AdapterError, match="one at a time"):
        model.set_adapter(["default", "other"])


def test_classification_task_trains_the_head_once_as_modules_to_save(tmp_path):
    """With task_type SEQ_CLS the head is a `modules_to_save` copy (as every method's): BitFit adds the biases of
    the body only, feature extraction trains that head alone, and a checkpoint holds exactly those tensors."""
    bitfit = dt.get_peft_model(tiny_bert(), dt.SelectiveConfig(task_type="SEQ_CLS"))
    trainable = [n for n, p in bitfit.named_parameters() if p.requires_grad]
    head = ["base_model.model.classifier.modules_to_save.default.bias",
            "base_model.model.classifier.modules_to_save.default.weight"]  # fmt: skip
    assert sorted(n for n in trainable if "classifier" in n) == head
    body = [n for n in trainable if "classifier" not in n]
    biases = [n for n, _ in tiny_bert().named_parameters() if n.endswith("bias") and "classifier" not in n]
    assert len(body) == len(biases) and all(n.endswith("selective_params.default.bias") for n in body)
    features = dt.get_peft_model(tiny_bert(), dt.SelectiveConfig(task_type="SEQ_CLS", train_output_head=True))
    assert sorted(n for n, p in features.named_parameters() if p.requires_grad) == head
    perturb_trainable(features)
    features.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.classifier.bias", "base_model.model.classifier.weight"]  # fmt: skip
    loaded = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        model_output(loaded, {"input_ids": ids}), model_output(features.eval(), {"input_ids": ids})
    )
