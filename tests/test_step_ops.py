"""The capture and optimizer-step ops (``accumulate_rank_statistics_``, ``precondition_grafted_``,
``kl_clip_update_``, ``sum_of_squares``, ``clone_tensors``) on the ``torch`` and ``cpp`` backends against
:mod:`grit_kernels.reference` in float64, fresh random inputs; bank entries outside the written blocks are
NaN-poisoned and must stay NaN."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from grit_kernels import _ext, ops
from grit_kernels import reference as ref

BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not _ext.cpu_available(), reason="C++ extension not built"))]
TOL = 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_dtype,bank_dtype",
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("r", [12, 16], ids=["r12-padded", "r16-vector-rows"])
def test_accumulate_rank_statistics(fresh_seed, backend, x_dtype, bank_dtype, r):
    M, R, N = 9, 16, 700  # r < R: a padded bank block; 700 rows: several 256-row chunks
    indices = [6, 2, 4]  # out of order, not contiguous
    stat_sum = torch.full((2, M, R, R), float("nan"), dtype=bank_dtype)
    rows = torch.full((M,), float("nan"), dtype=bank_dtype)
    for m in indices:
        stat_sum[:, m, :r, :r] = torch.randn(2, r, r, dtype=bank_dtype)
        rows[m] = float(torch.randint(0, 50, ()))
    h = torch.randn(N, len(indices) * r).to(x_dtype)
    delta = torch.randn(N, len(indices) * r).to(x_dtype)
    delta[:37] = 0  # padding: no gradient
    delta[-1, :r] = 1e-12  # rounding noise in the first module only: no gradient there
    exp_sum, exp_rows = ref.rank_statistics(stat_sum.double(), rows.double(), indices, h.double(), delta.double(), 1e-6)
    ops.accumulate_rank_statistics_(stat_sum, rows, indices, h, delta, 1e-6, backend=backend)
    for m in indices:
        assert rel_err(stat_sum[:, m, :r, :r], exp_sum[:, m, :r, :r]) < (1e-12 if bank_dtype == torch.float64 else TOL)
        assert rows[m].item() == exp_rows[m].item()
    untouched = torch.ones(2, M, R, R, dtype=torch.bool)
    untouched[:, indices, :r, :r] = False
    assert torch.isnan(stat_sum[untouched]).all()
    assert torch.isnan(rows[[m for m in range(M) if m not in indices]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_rank_statistics_nonfinite_delta_counts_no_row(fresh_seed, backend):
    stat_sum, rows = torch.zeros(2, 2, 8, 8), torch.zeros(2)
    h, delta = torch.randn(40, 8), torch.randn(40, 8)
    delta[3, 2] = float("nan")
    ops.accumulate_rank_statistics_(stat_sum, rows, [1], h, delta, 1e-6, backend=backend)
    assert rows.tolist() == [0.0, 0.0] and torch.isnan(stat_sum[1, 1]).any()  # the fold refuses it later
    with pytest.raises(ValueError, match=r"\[\.\.\., K \* r\]"):
        ops.accumulate_rank_statistics_(stat_sum, rows, [0, 1], h[:, :7], delta[:, :7], 1e-6, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_dtype,bank_dtype",
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_accumulate_rank_statistics_many(fresh_seed, backend, x_dtype, bank_dtype):
    """Several groups in one call (different K, r, row counts, a module recorded twice, an empty group):
    the oracle group by group, and bit for bit the numbers of one accumulate_rank_statistics_ call per group."""
    M, R = 9, 16
    plan = [((6, 2, 4), 12, 700), ((1,), 16, 300), ((2,), 12, 41), ((8, 0), 8, 0), ((5,), 16, 257)]
    stat_sum = torch.full((2, M, R, R), float("nan"), dtype=bank_dtype)
    rows = torch.full((M,), float("nan"), dtype=bank_dtype)
    for indices, r, _ in plan:
        for m in indices:
            stat_sum[:, m, :r, :r] = torch.randn(2, r, r, dtype=bank_dtype)
            rows[m] = float(torch.randint(0, 50, ()))
    groups = []
    for indices, r, n in plan:
        h, delta = torch.randn(n, len(indices) * r).to(x_dtype), torch.randn(n, len(indices) * r).to(x_dtype)
        delta[: min(n, 9)] = 0  # padding: no gradient
        if n:
            delta[-1, :r] = 1e-12  # rounding noise in the group's first module only
        groups.append((indices, h, delta))
    exp_sum, exp_rows = stat_sum.double(), rows.double()
    for indices, h, delta in groups:
        exp_sum, exp_rows = ref.rank_statistics(exp_sum, exp_rows, indices, h.double(), delta.double(), 1e-6)
    one_by_one_sum, one_by_one_rows = stat_sum.clone(), rows.clone()
    for indices, h, delta in groups:
        ops.accumulate_rank_statistics_(one_by_one_sum, one_by_one_rows, indices, h, delta, 1e-6, backend=backend)
    ops.accumulate_rank_statistics_many_(stat_sum, rows, groups, 1e-6, backend=backend)
    touched = torch.zeros(2, M, R, R, dtype=torch.bool)
    for indices, r, _ in plan:
        for m in indices:
            touched[:, m, :r, :r] = True
    for indices, r, _ in plan:
        for m in indices:
            assert rel_err(stat_sum[:, m, :r, :r], exp_sum[:, m, :r, :r]) < (1e-12 if bank_dtype == torch.float64 else TOL)
            assert rows[m].item() == exp_rows[m].item()
    assert torch.isnan(stat_sum[~touched]).all()
    listed = sorted({m for indices, _, _ in plan for m in indices})
    assert torch.isnan(rows[[m for m in range(M) if m not in listed]]).all()
    assert torch.equal(stat_sum[touched], one_by_one_sum[touched]) and torch.equal(rows[listed], one_by_one_rows[listed])


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_rank_statistics_many_strided_layouts(fresh_seed, backend):
    """Recorded tensors as autograd hands them over: 3-D, column slices of wider rows (read in place by the C++
    op), leading dims that do not collapse and a transposed delta (copied): the oracle, and bit for bit the
    numbers of the same call on contiguous 2-D copies."""
    M, R, r = 6, 16, 16
    wide = torch.randn(2, 90, 3 * r)
    layouts = [
        ((0,), torch.randn(1, 70, r), torch.randn(1, 70, r)),  # PEFT's lora_A output [1, T, r]
        ((1, 2), wide[:, :, : 2 * r], torch.randn(2, 90, 2 * r)),  # column slice: row stride 3 r
        ((3,), torch.randn(2, 50, r)[:, :40], torch.randn(2, 50, r)[:, 10:]),  # [2, 40, r] out of [2, 50, r]
        ((4, 5), torch.randn(33, 2 * r), torch.randn(2 * r, 33).t()),  # delta with column stride 33
    ]
    stat_sum = torch.full((2, M, R, R), float("nan"))
    rows = torch.full((M,), float("nan"))
    stat_sum[:, :, :r, :r] = torch.randn(2, M, r, r)
    rows[:] = torch.randint(0, 50, (M,)).float()
    groups = []
    for indices, h, delta in layouts:
        delta[..., :3, :] = 0  # padding rows: no gradient
        groups.append((indices, h, delta))
    exp_sum, exp_rows = stat_sum.double(), rows.double()
    copies_sum, copies_rows = stat_sum.clone(), rows.clone()
    copies = []
    for indices, h, delta in groups:
        h2, delta2 = h.reshape(-1, h.shape[-1]).contiguous(), delta.reshape(-1, delta.shape[-1]).contiguous()
        exp_sum, exp_rows = ref.rank_statistics(exp_sum, exp_rows, indices, h2.double(), delta2.double(), 1e-6)
        copies.append((indices, h2, delta2))
    ops.accumulate_rank_statistics_many_(copies_sum, copies_rows, copies, 1e-6, backend=backend)
    ops.accumulate_rank_statistics_many_(stat_sum, rows, groups, 1e-6, backend=backend)
    assert rel_err(stat_sum[:, :, :r, :r], exp_sum[:, :, :r, :r]) < TOL
    assert torch.equal(rows, exp_rows.float())
    assert torch.isnan(stat_sum[:, :, r:]).all() and torch.isnan(stat_sum[:, :, :, r:]).all()
    assert torch.equal(stat_sum[:, :, :r, :r], copies_sum[:, :, :r, :r]) and torch.equal(rows, copies_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_rank_statistics_many_rejects_bad_groups(backend):
    stat_sum, rows = torch.zeros(2, 3, 8, 8), torch.zeros(3)
    h = torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"\[\.\.\., K \* r\]"):
        ops.accumulate_rank_statistics_many_(stat_sum, rows, [((0,), h, h), ((1, 2), h[:, :7], h[:, :7])], 1e-6, backend=backend)
    with pytest.raises(ValueError, match="R >= r"):
        ops.accumulate_rank_statistics_many_(stat_sum, rows, [((0,), torch.randn(4, 9), torch.randn(4, 9))], 1e-6, backend=backend)
    assert not stat_sum.any() and not rows.any()  # checked before anything is added


def _spd(n, r):
    x = torch.randn(n, 3 * r, r, dtype=torch.float64)
    return (x.transpose(1, 2) @ x / (3 * r) + 0.1 * torch.eye(r, dtype=torch.float64)).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precondition_grafted(fresh_seed, backend, dtype):
    ranks, R = [16, 8, 16, 4], 16
    grads_a = [torch.randn(r, 40 + 7 * i).to(dtype) for i, r in enumerate(ranks)]
    grads_b = [torch.randn(24 + 9 * i, r).to(dtype) for i, r in enumerate(ranks)]
    inv_d, inv_h = _spd(6, R), _spd(6, R)
    modules = [5, 0, 3, 1]  # bank rows of the gradient pairs
    new_a, new_b, _ = ref.precondition(
        [g.double() for g in grads_a], [g.double() for g in grads_b], inv_d.double()[modules], inv_h.double()[modules]
    )
    expected = [n * (g.double().norm() / n.norm()) for n, g in zip(new_a + new_b, grads_a + grads_b)]
    ops.precondition_grafted_(grads_a, grads_b, inv_d, inv_h, backend=backend, modules=modules)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(grads_a + grads_b, expected):
        assert got.dtype == dtype and rel_err(got.double(), want) < bound
        assert abs(got.double().norm() / want.norm() - 1) < bound  # the raw gradient's norm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [1e-3, 1.0], ids=["inside-trust-region", "clipped"])
def test_kl_clip_update(fresh_seed, backend, step):
    ranks, R = [16, 8, 12], 16
    before_a = [torch.randn(r, 30 + i) for i, r in enumerate(ranks)]
    before_b = [torch.randn(20 + 3 * i, r) for i, r in enumerate(ranks)]
    params_a = [b + step * torch.randn_like(b) for b in before_a]
    params_b = [b + step * torch.randn_like(b) for b in before_b]
    factor_d, factor_h = _spd(3, R), _spd(3, R)
    exp_a, exp_b, exp_nu = ref.kl_clip_update(params_a, params_b, before_a, before_b, factor_d, factor_h, 0.05)
    assert (exp_nu < 1) == (step == 1.0)
    snap_a, snap_b = ops.clone_tensors(before_a, backend=backend), ops.clone_tensors(before_b, backend=backend)
    nu = ops.kl_clip_update_(params_a, params_b, snap_a, snap_b, factor_d, factor_h, 0.05, backend=backend)
    assert abs(nu.item() - exp_nu) < 1e-5 * exp_nu
    for got, want in zip(params_a + params_b, exp_a + exp_b):
        assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_clip_update_float32_factors_equal_their_float64_widening(fresh_seed, backend):
    """float32 factors (the bank's, read in place by the C++ op) give bit for bit the numbers of the same
    factors widened to float64 first."""
    ranks, R = [16, 8], 16
    before = [torch.randn(r, 40) for r in ranks] + [torch.randn(24, r) for r in ranks]
    params = [b + torch.randn_like(b) for b in before]  # large steps: clipped
    factor_d, factor_h = _spd(2, R), _spd(2, R)
    results = []
    for fd, fh in ((factor_d, factor_h), (factor_d.double(), factor_h.double())):
        p = [t.clone() for t in params]
        snap = ops.clone_tensors(before, backend=backend)
        nu = ops.kl_clip_update_(p[:2], p[2:], snap[:2], snap[2:], fd, fh, 0.05, backend=backend)
        results.append((nu, p))
    assert results[0][0].item() < 1 and torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_of_squares_and_clone(fresh_seed, backend):
    xs = [torch.randn(16, 33), torch.randn(70, 16)[::2], torch.randn(5, 16).bfloat16()]  # one strided row view
    total = ops.sum_of_squares(xs, backend=backend)
    assert total.dtype == torch.float64
    assert abs(total.item() - sum(float((x.double() ** 2).sum()) for x in xs)) < 1e-5 * total.item()
    xs[0][3, 4] = float("inf")
    assert not torch.isfinite(ops.sum_of_squares(xs, backend=backend))
    assert ops.sum_of_squares([torch.zeros(4, 4)], backend=backend).item() == 0.0
    copies = ops.clone_tensors(xs, backend=backend)
    for c, x in zip(copies, xs):
        assert torch.equal(c, x) and c.data_ptr() != x.data_ptr() and c.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_tensors_refills_buffers_or_copies_nothing(fresh_seed, backend):
    xs = [torch.randn(16, 33), torch.randn(70, 16)[::2], torch.randn(5, 16).bfloat16()]  # one strided row view
    buffers = [torch.full(x.shape, float("nan"), dtype=x.dtype) for x in xs]
    assert ops.copy_tensors_(buffers, xs, backend=backend)
    for b, x in zip(buffers, xs):
        assert torch.equal(b, x) and b.data_ptr() != x.data_ptr()
    poisoned = [torch.full(x.shape, float("nan"), dtype=x.dtype) for x in xs]
    wrong = poisoned[:2] + [torch.full((5, 16), float("nan"))]  # a dtype that does not match: nothing is copied
    assert not ops.copy_tensors_(wrong, xs, backend=backend)
    assert all(torch.isnan(b.float()).all() for b in wrong)
    assert not ops.copy_tensors_(poisoned[:2], xs, backend=backend)  # one buffer too few
