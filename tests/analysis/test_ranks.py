"""Gradient-sensitivity rank allocation: budget kept, sensitive layers get more rank, usable from the trainer."""

from __future__ import annotations

import json

import torch

import deltatune as dt
from deltatune.analysis import allocate_ranks, sensitivity_scores
from deltatune.analysis.ranks import _allocate
from deltatune.train import load_train_config, train
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches():
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 97, (2, 8), generator=g), "labels": torch.randint(0, 97, (2, 8), generator=g)}
        for _ in range(2)
    ]


def test_allocation_is_proportional_and_within_the_uniform_budget():
    ranks = _allocate({"a": 9.0, "b": 1.0, "c": 1.0}, {"a": 10, "b": 10, "c": 10}, r=4, r_min=1, r_max=16)
    assert ranks["a"] > ranks["b"] and sum(ranks.values()) * 10 == 4 * 30


def test_sensitivity_leaves_the_model_unchanged_and_budget_matches_uniform():
    model = tiny_llama()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    scores = sensitivity_scores(model, _batches(), TARGETS)
    assert len(scores) == 6 and all(v > 0 for v in scores.values())
    assert all(
        torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None
        for n, p in model.named_parameters()
    )
    pattern = allocate_ranks(model, _batches(), TARGETS, r=4)
    uniform = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=TARGETS))
    allocated = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=TARGETS, rank_pattern=pattern))
    u, a = uniform.get_nb_trainable_parameters()[0], allocated.get_nb_trainable_parameters()[0]
    assert u - (32 + 48) < a <= u  # same budget up to one rank step of the cheapest layer
    assert len(set(pattern.values())) > 1


def test_trainer_accepts_rank_pattern_auto(tiny_model_dir, tmp_path):
    cfg = load_train_config(
        None,
        [
            f"model={tiny_model_dir}",
            f"output_dir={tmp_path}",
            "optim.steps=2",
            "optim.batch_size=2",
            "data.max_length=200",
            "method.rank_pattern=auto",
            "method.r=4",
            "method.target_modules=[q_proj, v_proj, down_proj]",
        ],
    )
    result = train(cfg)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert len(saved["rank_pattern"]) == 6 and len(set(saved["rank_pattern"].values())) > 1
    from transformers import AutoModelForCausalLM

    reloaded = dt.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir, is_trainable=True
    )
    assert reloaded.get_nb_trainable_parameters()[0] == result.model.get_nb_trainable_parameters()[0]
