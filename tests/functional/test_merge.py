"""Merge rules against the papers' steps written out here, entry by entry."""

from __future__ import annotations

import torch

from deltatune.functional import merge

T1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 0.2, 4.0]])
T2 = torch.tensor([[-1.0, -2.0, 0.1], [1.0, 3.0, -0.3]])


def test_magnitude_prune_keeps_the_largest_entries():
    # density 0.5 of 6 entries: the 3 largest |x| of each tensor
    kept1 = torch.tensor([[3.0, 0, 0], [-2.0, 0, 4.0]])
    kept2 = torch.tensor([[0, -2.0, 0], [1.0, 3.0, 0]])
    torch.testing.assert_close(merge.magnitude_prune([T1, T2], [0.5, 2.0], 0.5), 0.5 * kept1 + 2.0 * kept2)


def test_ties_trim_elect_and_disjoint_merge():
    kept1 = torch.tensor([[3.0, 0, 0], [-2.0, 0, 4.0]])
    kept2 = torch.tensor([[0, -2.0, 0], [1.0, 3.0, 0]])
    w1, w2 = 0.5, 2.0
    want = torch.zeros(2, 3)
    for i in range(2):
        for j in range(3):
            values = [float(kept1[i, j]), float(kept2[i, j])]
            sign = 1.0 if sum(values) >= 0 else -1.0  # "total": the sign of the sum of the trimmed values
            agree = [(v, w) for v, w in zip(values, [w1, w2], strict=True) if v != 0 and (v > 0) == (sign > 0)]
            want[i, j] = sum(v * w for v, w in agree) / max(1, len(agree))
    torch.testing.assert_close(merge.ties([T1, T2], [w1, w2], 0.5), want)
    # "frequency": one vote per tensor; entry (1, 0) has +1 and -1 -> a tie elects +, keeping only T2's 1.0
    freq = merge.ties([T1, T2], [1.0, 1.0], 0.5, "frequency")
    assert float(freq[1, 0]) == 1.0


def test_dare_drops_and_rescales_with_a_seeded_mask():
    density = 0.5
    g = torch.Generator().manual_seed(3)
    out = merge.dare_linear([T1, T2], [1.0, -1.0], density, generator=g)
    g = torch.Generator().manual_seed(3)
    m1, m2 = (torch.rand(T1.shape, generator=g) < density for _ in range(2))
    torch.testing.assert_close(out, T1 * m1 / density - T2 * m2 / density)
    g = torch.Generator().manual_seed(3)
    ties_out = merge.dare_ties([T1, T2], [1.0, 1.0], density, generator=g)
    trimmed = torch.stack([T1 * m1 / density, T2 * m2 / density])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (trimmed.sign() == sign) & (trimmed != 0)
    torch.testing.assert_close(ties_out, (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1))
