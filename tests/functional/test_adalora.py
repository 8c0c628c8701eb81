"""AdaLoRA math against dense computations and the schedule values in paper_facts.md."""

from __future__ import annotations

import torch

from deltatune.functional.adalora import (
    budget_schedule,
    keep_top,
    orthogonality_penalty,
    svd_delta,
    svd_scale,
    triplet_scores,
    update_importance,
)


def test_delta_is_scaled_b_diag_e_a():
    torch.manual_seed(0)
    a, e, b = torch.randn(3, 5), torch.randn(3, 1), torch.randn(4, 3)
    want = 0.7 * b @ torch.diag(e.view(-1)) @ a
    torch.testing.assert_close(svd_delta(a, e, b, 0.7), want)
    torch.testing.assert_close(svd_delta(a, e, b, 0.7, fan_in_fan_out=True), want.T)
    assert svd_scale(8, 12) == 8 / (12 + 1e-5)


def test_orthogonality_penalty_is_zero_for_orthonormal_factors_and_frobenius_otherwise():
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert orthogonality_penalty(q[:3], q[:, :3]) < 1e-5
    a, b = torch.randn(2, 4), torch.randn(5, 2)
    want = ((a @ a.T - torch.eye(2)) ** 2).sum().sqrt() + ((b.T @ b - torch.eye(2)) ** 2).sum().sqrt()
    torch.testing.assert_close(orthogonality_penalty(a, b), want)
    stacked = orthogonality_penalty(torch.stack([a, 2 * a]), torch.stack([b, b]))
    torch.testing.assert_close(stacked, torch.stack([want, orthogonality_penalty(2 * a, b)]))


def test_importance_emas_follow_the_paper():
    p, g = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    ipt, unc = torch.zeros(2), torch.zeros(2)
    other = [torch.ones(3), torch.zeros(3), torch.zeros(3)]  # a second tensor in the same call
    update_importance([p, other[0]], [g, torch.full((3,), 2.0)], [ipt, other[1]], [unc, other[2]], 0.85, 0.9)
    torch.testing.assert_close(ipt, 0.15 * torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(unc, 0.1 * (torch.tensor([1.0, 3.0]) - ipt).abs())  # uses the updated Ī
    torch.testing.assert_close(other[1], torch.full((3,), 0.3))
    ipt_before = ipt.clone()
    update_importance([p], [g], [ipt], [unc], 0.85, 0.9)
    torch.testing.assert_close(ipt, 0.85 * ipt_before + 0.15 * torch.tensor([1.0, 3.0]))


def test_triplet_score_sums_e_and_row_and_column_means():
    sa, se, sb = torch.arange(6.0).view(2, 3), torch.tensor([[10.0], [20.0]]), torch.arange(8.0).view(4, 2)
    torch.testing.assert_close(triplet_scores(sa, se, sb), torch.tensor([10 + 1 + 3.0, 20 + 4 + 4.0]))


def test_budget_schedule_matches_the_reference_values():
    # paper_facts.md §6: tinit=10, tfinal=20, T=100, deltaT=5 over 4 matrices (b0 = 48, bT = 16)
    def at(step):
        return budget_schedule(step, 48, 16, 10, 20, 100, 5)

    assert at(0) == (48, False) and at(10) == (48, False)
    assert at(11)[0] == 46 and at(40) == (21, True) and at(45)[0] == 20
    assert at(79) == (16, False) and at(80) == (16, True) and at(81) == (16, True)


def test_keep_top_keeps_exactly_the_budget_even_with_ties():
    masks = keep_top([torch.zeros(4), torch.zeros(3)], 5)
    assert sum(int(m.sum()) for m in masks) == 5 and [m.numel() for m in masks] == [4, 3]
    masks = keep_top([torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.2, 0.8])], 3)
    assert [m.tolist() for m in masks] == [[False, True], [True, False, True]]
    assert not any(m.any() for m in keep_top([torch.ones(2)], 0))
