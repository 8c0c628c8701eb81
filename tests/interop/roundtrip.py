"""Shared peft <-> deltatune round trip: perturb the trainables, save with one library, load with the other."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import TINY_MODELS, model_output


def assert_round_trip(lib_save, lib_load, config_name: str, kwargs: dict, model_name: str, tmp_path: Path) -> None:
    factory, _, inputs_fn = TINY_MODELS[model_name]
    inputs = inputs_fn()
    source = lib_save.get_peft_model(factory(), getattr(lib_save, config_name)(**kwargs))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in source.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    source.eval()
    want = model_output(source, inputs)
    source.save_pretrained(tmp_path)
    loaded = lib_load.PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(model_output(loaded, inputs), want, rtol=1e-5, atol=1e-5)
