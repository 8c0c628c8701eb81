"""functional/lora.py against dense formulas and autograd references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deltatune.functional.lora as lora_functional
from deltatune.functional.lora import (
    _dropout,
    dropout_keep_mask,
    embedding_lora_delta,
    lora_branch,
    lora_delta,
    lora_scale,
)


def test_lora_scale_plain_and_rslora():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == pytest.approx(16 / math.sqrt(4))


def test_lora_delta_is_scaled_b_times_a():
    a, b = torch.randn(3, 5), torch.randn(7, 3)
    torch.testing.assert_close(lora_delta(a, b, 0.5), 0.5 * b @ a)
    torch.testing.assert_close(lora_delta(a, b, 0.5, fan_in_fan_out=True), (0.5 * b @ a).T)


def test_conv_delta_equals_composed_convolutions():
    """A conv (kernel k) followed by a 1x1 conv B equals one conv with kernel ΔW."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1)
    x = torch.randn(1, 3, 8, 8)
    composed = F.conv2d(F.conv2d(x, a, padding=1), b) * 0.7
    direct = F.conv2d(x, lora_delta(a, b, 0.7), padding=1)
    torch.testing.assert_close(direct, composed, rtol=1e-5, atol=1e-5)


def test_embedding_delta_matches_lookup():
    a, b = torch.randn(2, 10), torch.randn(6, 2)
    ids = torch.tensor([[1, 4, 9]])
    looked_up = F.embedding(ids, a.T) @ b.T * 3.0
    torch.testing.assert_close(F.embedding(ids, embedding_lora_delta(a, b, 3.0)), looked_up)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_branch_grads_match_autograd_reference(p):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, requires_grad=True)
    a = torch.randn(3, 6, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    torch.manual_seed(123)
    y = lora_branch(x, a, b, 1.5, p, training=True)
    g = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), g)
    # reference: the same mask (same seed drawn from the same global RNG state), plain autograd
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31, (1,)).item())
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, a, b))
    xd = _dropout(xr, p, seed) if p > 0 else xr
    yr = xd @ ar.T @ br.T * 1.5
    torch.testing.assert_close(y, yr)
    for got, want in zip((gx, ga, gb), torch.autograd.grad(yr, (xr, ar, br), g), strict=True):
        torch.testing.assert_close(got, want)


def test_dropout_keeps_expected_fraction_and_scale():
    x = torch.ones(200_000)
    y = _dropout(x, 0.25, seed=7)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_hash_mask_is_deterministic_uniform_and_independent_across_seeds(p):
    shape = (600, 701)  # odd element count: the last hash contributes one element
    m1 = dropout_keep_mask(shape, p, 11, torch.device("cpu"))
    assert torch.equal(m1, dropout_keep_mask(shape, p, 11, torch.device("cpu")))
    m2 = dropout_keep_mask(shape, p, 12, torch.device("cpu"))
    n = m1.numel()
    sd = ((1 - p) * p / n) ** 0.5
    assert abs(m1.float().mean().item() - (1 - p)) < 5 * sd
    assert abs((m1 & m2).float().mean().item() - (1 - p) ** 2) < 5 * sd  # independent streams
    # no structure along rows or columns: every row's keep rate is plausible
    rows = m1.float().mean(1)
    assert (rows - (1 - p)).abs().max() < 6 * ((1 - p) * p / shape[1]) ** 0.5
    neighbours = (m1[:, 1:] & m1[:, :-1]).float().mean().item()
    assert abs(neighbours - (1 - p) ** 2) < 5 * sd


def test_lora_branch_eval_ignores_dropout():
    x, a, b = torch.randn(3, 6), torch.randn(2, 6), torch.randn(4, 2)
    torch.testing.assert_close(lora_branch(x, a, b, 2.0, 0.9, training=False), x @ a.T @ b.T * 2.0)


def _murmur_mask_reference(n: int, p: float, seed: int) -> np.ndarray:
    """The documented mask, written out with numpy's uint32 arithmetic: murmur3's finalizer over
    i * 0x9E3779B9 + spread(seed) - 2^31, each hash's low then high 16 bits as signed uniforms."""
    spread = (seed * 0x9E3779B97F4A7C15 >> 32) & 0xFFFFFFFF
    h = np.arange((n + 1) // 2, dtype=np.uint64) * 0x9E3779B9 + spread + 2**31  # -2^31 == +2^31 mod 2^32
    h = h.astype(np.uint32)
    h ^= h >> 16
    h = (h.astype(np.uint64) * 0x85EBCA6B).astype(np.uint32)
    h ^= h >> 13
    h = (h.astype(np.uint64) * 0xC2B2AE35).astype(np.uint32)
    h ^= h >> 16
    uniform = h.view(np.int16)[:n]  # little-endian: low half first
    return uniform >= round(p * 65536) - 32768


@pytest.mark.parametrize("n", [7, 4096, 100_001])
def test_hash_mask_matches_the_documented_hash_cached_or_not(n, monkeypatch):
    want = _murmur_mask_reference(n, 0.1, 1234)
    assert np.array_equal(dropout_keep_mask((n,), 0.1, 1234, torch.device("cpu")).numpy(), want)
    monkeypatch.setattr(lora_functional, "_COUNTER_CACHE_MAX", 16)  # the counter built per call past the cache
    assert np.array_equal(dropout_keep_mask((n,), 0.1, 1234, torch.device("cpu")).numpy(), want)
