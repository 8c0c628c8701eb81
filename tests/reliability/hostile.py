"""Shared pieces of the fault tests: hostile JSON values, and the checks that nothing changed."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hypothesis import strategies as st
from torch import nn

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["q_proj", "all-linear", "none", "lora_only", "RANDOM", "zero", "houlsby", "0", ".*"]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
"""Anything a JSON file (or a keyword argument written from one) can hold."""


def model_snapshot(model: nn.Module) -> tuple:
    """Everything a failed operation must leave as it was: module tree, parameters and buffers, trainable flags."""
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return modules, tensors, flags


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    modules, tensors, flags = model_snapshot(model)
    assert modules == before[0]
    assert flags == before[2]
    assert tensors.keys() == before[1].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[1][key]), key


def folder_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under `folder`: a failed load or save must not write or leave anything."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            stat = (Path(root) / name).stat()
            out[str(Path(root, name).relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return out
