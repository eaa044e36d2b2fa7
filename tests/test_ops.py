"""Torch-backend ops against the float64 oracle in grit_kernels.reference (fresh inputs each run)."""

import math

import pytest
import torch
from conftest import rel_err

from grit_kernels import ops, reference
from grit_kernels.status import InverseStatus


def spd_with_condition(n, r, cond, dtype=torch.float64):
    """n random SPD r x r matrices with eigenvalues log-spaced over [1/cond, 1]."""
    q, _ = torch.linalg.qr(torch.randn(n, r, r, dtype=torch.float64))
    eigs = torch.logspace(-math.log10(cond), 0, r, dtype=torch.float64)
    return ((q * eigs) @ q.transpose(1, 2)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8, 16])
def test_accumulate_gram_matches_reference(fresh_seed, dtype, r):
    x = torch.randn(3, 37, r).to(dtype)
    out = torch.randn(r, r)
    out = out @ out.T
    expected = reference.accumulate_gram(out.double(), x.double(), weight=0.5)
    got = ops.accumulate_gram_(out.clone(), x, weight=0.5, backend="torch")
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-6  # input already in its dtype; products in fp32


def test_accumulate_gram_noncontiguous_views(fresh_seed):
    bank = torch.zeros(2, 8, 8)
    view = bank[1, :5, :5]  # a non-contiguous bank slice, as the layers use
    x = torch.randn(40, 10)[:, ::2]  # non-contiguous input
    ops.accumulate_gram_(view, x, backend="torch")
    assert rel_err(bank[1, :5, :5], reference.accumulate_gram(torch.zeros(5, 5, dtype=torch.float64), x.double())) < 1e-6
    assert bank[0].abs().sum() == 0 and bank[1, 5:].abs().sum() == 0 and bank[1, :, 5:].abs().sum() == 0


def test_accumulate_gram_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError):
        ops.accumulate_gram_(torch.zeros(4, 4), torch.randn(3, 5))
    with pytest.raises(TypeError):
        ops.accumulate_gram_(torch.zeros(4, 4, dtype=torch.float16), torch.randn(3, 4))
    out = torch.zeros(4, 4)
    ops.accumulate_gram_(out, torch.randn(0, 4))  # empty batch: a no-op
    assert out.abs().sum() == 0


def test_ema_fold_matches_reference(fresh_seed):
    n, R = 9, 6
    factor = torch.randn(n, R, R)
    stat = torch.randn(n, R, R)
    weight = torch.rand(n) + 0.1
    weight[2] = 0.0  # no rows this step
    stat[4, 1, 1] = float("inf")  # non-finite statistic
    stat[5, 0, 2] = float("nan")
    init = torch.rand(n) > 0.5
    ref_f, ref_i = reference.ema_fold(factor.double(), stat.double(), weight.double(), 0.9, init)
    f, i = factor.clone(), init.clone()
    ops.ema_fold_(f, stat, weight, 0.9, i, backend="torch")
    assert rel_err(f, ref_f) < 1e-6
    assert torch.equal(i, ref_i)
    assert torch.equal(f[[2, 4, 5]], factor[[2, 4, 5]])  # skipped exactly


@pytest.mark.parametrize("r", [1, 4, 13, 16, 32, 64])
@pytest.mark.parametrize("cond", [1e1, 1e4, 1e8])
def test_inverse_matches_reference(fresh_seed, r, cond):
    mats = spd_with_condition(6, r, cond, dtype=torch.float32)
    inv, status = ops.damped_cholesky_inverse(mats, 1e-3, 1e-12, backend="torch")
    ref_inv, ref_status = reference.damped_cholesky_inverse(mats.double(), 1e-3, 1e-12)
    assert torch.equal(status, ref_status)
    # relative damping bounds the condition number of C + lam I by about r / damping
    assert rel_err(inv, ref_inv) < 1e-6 * r / 1e-3
    assert torch.equal(inv, inv.transpose(1, 2))


def test_inverse_mixed_ranks_fallbacks_and_bad_inputs(fresh_seed):
    R = 8
    ranks = torch.tensor([8, 4, 8, 1, 3, 8, 5, 8], dtype=torch.int32)
    mats = spd_with_condition(8, R, 1e3, dtype=torch.float32)
    mats[1, 6, 6] = 1e9  # garbage in the padding must be ignored
    mats[2] = -mats[2]  # indefinite with a previous inverse: kept
    mats[3] = float("nan")  # non-finite, no previous: identity fallback
    mats[5] = -mats[5]  # indefinite, no previous: I/lam
    mats[6] = 0.0  # zero matrix: lam = eps_abs
    mats[7, 0, 1] = float("inf")
    previous = torch.randn(8, R, R)
    previous = previous + previous.transpose(1, 2)
    previous_valid = torch.tensor([True, True, True, False, False, False, False, True])
    poisoned = torch.full((8, R, R), float("nan"))
    inv, status = ops.damped_cholesky_inverse(
        mats, 1e-3, 1e-6, ranks=ranks, previous=previous, previous_valid=previous_valid, backend="torch"
    )
    poisoned.copy_(inv)
    ref_inv, ref_status = reference.damped_cholesky_inverse(
        mats.double(), 1e-3, 1e-6, ranks=ranks.tolist(), previous=previous.double(), previous_valid=previous_valid
    )
    assert status.tolist() == ref_status.tolist()
    assert status[2] == InverseStatus.KEPT_PREVIOUS and status[7] == InverseStatus.KEPT_PREVIOUS
    assert status[3] == InverseStatus.SCALED_IDENTITY and status[5] == InverseStatus.SCALED_IDENTITY
    assert status[6] == InverseStatus.OK
    assert torch.isfinite(poisoned).all()
    assert rel_err(poisoned, ref_inv) < 1e-5
    for i, r in enumerate(ranks.tolist()):  # identity in the padding
        assert torch.equal(poisoned[i, r:, r:], torch.eye(R - r))


def test_inverse_zero_factor_without_absolute_floor():
    """B = 0 at PEFT init gives D = 0 exactly; with eps_abs = 0 the pivot is 0: fallback, no exception."""
    inv, status = ops.damped_cholesky_inverse(torch.zeros(2, 4, 4), 1e-3, eps_abs=0.0, backend="torch")
    ref_inv, ref_status = reference.damped_cholesky_inverse(torch.zeros(2, 4, 4, dtype=torch.float64), 1e-3, 0.0)
    assert status.tolist() == ref_status.tolist() == [InverseStatus.SCALED_IDENTITY] * 2
    assert torch.equal(inv, ref_inv.float())


def test_inverse_retry_with_larger_damping():
    # eigenvalues {1, -0.01}: C + lam I is indefinite at lam = 1e-3*tr/2 but PD at 100x that
    c = torch.diag(torch.tensor([1.0, -0.01]))
    inv, status = ops.damped_cholesky_inverse(c[None], 1e-2, 0.0, backend="torch")
    ref_inv, ref_status = reference.damped_cholesky_inverse(c[None].double(), 1e-2, 0.0)
    assert status.tolist() == ref_status.tolist() == [InverseStatus.RETRIED]
    assert rel_err(inv, ref_inv) < 1e-6


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_precondition_matches_reference(fresh_seed, grad_dtype):
    # (r, d_in, d_out): mixed ranks, repeated shapes (batched path) and large ones (per-matrix path on CPU)
    shapes = [(16, 33, 20), (16, 33, 20), (4, 7, 9), (16, 20, 33), (1, 5, 3), (16, 4097, 2049), (8, 4097, 4100)]
    R = 16
    grads_a = [torch.randn(r, d_in).to(grad_dtype) for r, d_in, _ in shapes]
    grads_b = [torch.randn(d_out, r).to(grad_dtype) for r, _, d_out in shapes]
    inv_d = spd_with_condition(len(shapes), R, 1e2, torch.float32)
    inv_h = spd_with_condition(len(shapes), R, 1e2, torch.float32)
    new_a, new_b, ref_dot = reference.precondition(grads_a, grads_b, inv_d.double(), inv_h.double())
    got_a, got_b = [g.clone() for g in grads_a], [g.clone() for g in grads_b]
    dot = ops.precondition_(got_a, got_b, inv_d, inv_h, compute_dot=True, backend="torch")
    tol = 1e-6 if grad_dtype == torch.float32 else 1e-2
    for got, ref in zip(got_a + got_b, new_a + new_b):
        assert got.dtype == grad_dtype
        assert rel_err(got, ref) < tol
    assert abs(dot.item() - ref_dot.item()) <= tol * abs(ref_dot.item())
