"""Triton kernels (grit_kernels/triton) against the float64 oracle, on the CPU through the interpreter.

The environment variable must be set before triton or grit_kernels is imported. A GPU session runs
with ``TRITON_INTERPRET=0`` (bench/run_gpu_all.sh) and skips this file; tests/test_gpu_kernels.py runs the
same checks (the ``check_*`` functions below) on CUDA.

Inputs are fresh random draws each run (the ``fresh_seed`` fixture prints the seed); errors are
``||out - ref|| / ||ref||`` against ``grit_kernels.reference`` evaluated on float64 copies of the
exact inputs; fresh output buffers are NaN-poisoned (``poisoned_empty``) so unwritten elements fail.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import warnings

import pytest
import torch
from conftest import rel_err

from grit_kernels import ops, reference
from grit_kernels.ops import interpreter_active
from grit_kernels.status import InverseStatus

pytestmark = [
    pytest.mark.skipif(not interpreter_active(), reason="CPU interpreter tests; TRITON_INTERPRET=0 here"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy inf/nan arithmetic inside the interpreter
]

DEVICE = "cpu"
EPS32 = torch.finfo(torch.float32).eps
RANKS = [1, 4, 8, 13, 16, 32, 64]
#: relative-error bounds of results stored in each dtype (fp32 math inside)
STORE_BOUND = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make ``torch.empty`` return NaN-filled float (or -7 filled integer) tensors during a test."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return empty


def spd_with_condition(conds, r, device=DEVICE):
    """One SPD ``r x r`` float64 matrix per entry of ``conds`` (eigenvalues log-spaced in [1/cond, 1])."""
    q, _ = torch.linalg.qr(torch.randn(len(conds), r, r, dtype=torch.float64))
    eigs = torch.stack([torch.logspace(-math.log10(c), 0, r, dtype=torch.float64) for c in conds])
    return ((q * eigs[:, None, :]) @ q.transpose(1, 2)).to(device)


def per_matrix_rel_err(out, ref):
    out, ref = out.double().cpu().flatten(1), ref.double().cpu().flatten(1)
    return ((out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).tolist()


def damped_condition(mats64, damping, eps_abs, ranks=None):
    """Condition number of ``C + lam*I`` on each matrix's leading block (float64)."""
    out = []
    for i, c in enumerate(mats64.cpu()):
        r = c.shape[-1] if ranks is None else int(ranks[i])
        block = c[:r, :r]
        lam = reference.damping_of(block, damping, eps_abs)
        ev = torch.linalg.eigvalsh(block + lam * torch.eye(r, dtype=torch.float64))
        out.append(float(ev[-1] / ev[0]))
    return out


# ------------------------------------------------------------------------------------ the checks
# Each check_* runs one comparison on `device` and is shared with tests/test_gpu_kernels.py.


def check_gram(r, dtype, rows_shape, device=DEVICE, weight=0.37, noncontiguous=False, bound=2e-6):
    x = torch.randn(*rows_shape, r + (3 if noncontiguous else 0), device=device).to(dtype)
    if noncontiguous:
        x = x[..., 3:]  # rows not contiguous in memory
    bank = torch.randn(2, r + 2, r + 2, device=device)
    out = bank[1, 1:, 1:][:r, :r] if noncontiguous else bank[1, :r, :r].contiguous()
    if noncontiguous:
        assert not out.is_contiguous() or r == 1
    expected = reference.accumulate_gram(out.double().cpu(), x.double().cpu(), weight)
    untouched = bank.clone()
    got = ops.accumulate_gram_(out, x, weight=weight, backend="triton")
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    err = rel_err(out, expected)
    assert err < bound, f"gram r={r} {dtype} rows={rows_shape}: rel err {err:.3e}"
    if noncontiguous:  # nothing outside the view was written
        mask = torch.ones_like(bank, dtype=torch.bool)
        mask[1, 1 : r + 1, 1 : r + 1] = False
        assert torch.equal(bank[mask], untouched[mask])
    return err


def check_grams(shapes, dtype, device=DEVICE, weight=0.37, bound=2e-6):
    """Grouped Gram over modules of mixed rank and row count; accumulators are strided bank slices."""
    R = max(r for r, _ in shapes)
    bank = torch.randn(2, len(shapes), R + 1, R + 1, device=device)
    outs = [bank[1, i, 1 : r + 1, :r] for i, (r, _) in enumerate(shapes)]  # non-contiguous views
    xs = [torch.randn(rows, r, device=device).to(dtype) for r, rows in shapes]
    xs[0] = torch.randn(shapes[0][1], shapes[0][0] + 2, device=device).to(dtype)[:, 2:]  # strided rows
    expected = reference.accumulate_grams([o.double().cpu() for o in outs], [x.double().cpu() for x in xs], weight)
    untouched = bank.clone()
    got = ops.accumulate_grams_(outs, xs, weight=weight, backend="triton")
    assert list(got) == outs
    errs = [rel_err(o, e) for o, e in zip(outs, expected)]
    assert max(errs) < bound, f"grams {dtype}: rel errs {errs}"
    mask = torch.ones_like(bank, dtype=torch.bool)
    for i, (r, _) in enumerate(shapes):
        mask[1, i, 1 : r + 1, :r] = False
    assert torch.equal(bank[mask], untouched[mask]), "written outside the accumulators"


def check_fold(n, R, device=DEVICE, noncontiguous=False):
    shape = (n, R + 1, R + 1) if noncontiguous else (n, R, R)
    factor_store = torch.randn(*shape, device=device)
    factor = factor_store[:, 1:, 1:] if noncontiguous else factor_store
    stat = torch.randn(n, R, R, device=device) * 3
    weight = torch.rand(n, device=device) + 0.1
    weight[0] = 0.0  # no rows this step: skipped
    if n > 3:
        stat[1, R // 2, R - 1] = float("nan")  # skipped
        stat[2, 0, 0] = float("inf")  # skipped
        weight[3] = float("inf")  # inf * finite: skipped
    if n > 4:
        stat[4] = stat[4] * 0.0 + 1e-30  # tiny but finite: folded
    initialized = torch.rand(n, device=device) > 0.5
    initialized[-1] = False
    exp_factor, exp_init = reference.ema_fold(
        factor.double().cpu(), stat.double().cpu(), weight.double().cpu(), 0.9, initialized.cpu()
    )
    before = factor_store.clone()
    ops.ema_fold_(factor, stat, weight, 0.9, initialized, backend="triton")
    assert torch.equal(initialized.cpu(), exp_init.cpu())
    err = rel_err(factor, exp_factor)
    assert err < 2e-6, f"ema_fold n={n} R={R}: rel err {err:.3e}"
    skipped = ~exp_init.cpu() | (weight.cpu() == 0) | ~torch.isfinite(stat.cpu() * weight.cpu()[:, None, None]).flatten(1).all(1)
    for i in torch.nonzero(skipped).flatten().tolist():
        assert torch.equal(factor_store[i].cpu(), before[i].cpu()), f"skipped matrix {i} was written"
    if noncontiguous:
        assert torch.equal(factor_store[:, 0].cpu(), before[:, 0].cpu())
        assert torch.equal(factor_store[:, :, 0].cpu(), before[:, :, 0].cpu())


def check_inverse_conditioning(r, damping, conds, device=DEVICE, in_dtype=torch.float32, kappa_factor=8.0):
    """Inverse of well and badly conditioned SPD matrices; error bound scales with cond(C + lam I)."""
    mats = spd_with_condition(conds, r, device).to(in_dtype)
    exact = mats.double()
    inv, status = ops.damped_cholesky_inverse(mats, damping, backend="triton")
    ref_inv, ref_status = reference.damped_cholesky_inverse(exact.cpu(), damping)
    assert inv.dtype == in_dtype and status.dtype == torch.int32 and inv.shape == mats.shape
    assert torch.equal(status.cpu(), ref_status), f"status {status.tolist()} != {ref_status.tolist()}"
    assert torch.equal(inv, inv.transpose(1, 2)), "inverse not exactly symmetric"
    kappas = damped_condition(exact, damping, 1e-12)
    errs = per_matrix_rel_err(inv, ref_inv)
    for cond, kappa, err in zip(conds, kappas, errs):
        bound = kappa_factor * kappa * EPS32 + STORE_BOUND[in_dtype]
        assert err < bound, f"r={r} cond={cond:.0e} kappa={kappa:.2e}: rel err {err:.3e} >= {bound:.3e}"
    return max(errs)


def check_inverse_fallbacks(R, device=DEVICE):
    """Every branch of the fallback chain, mixed ranks, previous inverses, non-finite inputs."""
    n = 10
    ranks = torch.tensor([R, max(1, R - 3), R, max(1, R // 2), R, R, 1, R, R, R], dtype=torch.int32, device=device)
    mats = spd_with_condition([10.0] * n, R, device).float()
    mats[1, R - 1, 0] = float("nan")  # NaN outside rank 1's block: ignored, matrix 1 is OK if R > 3
    mats[2, 0, min(1, R - 1)] = float("nan")  # NaN in the block: no attempt; previous is valid
    mats[3] = -torch.eye(R, device=device)  # negative definite, no previous: I/lam with lam < 0 -> I
    mats[4] = torch.diag(torch.tensor([1.0] * (R - 1) + [-0.05], device=device))  # retry succeeds
    mats[5] = 0.0  # zero matrix: lam = eps_abs > 0, inverse = I / eps_abs
    mats[6, 0, 0] = float("inf")  # inf in a rank-1 block, no previous valid: lam not finite -> I
    mats[7] = -torch.eye(R, device=device) * 10.0  # negative definite with a valid previous inverse
    mats[8] = mats[8] * 1e30  # large but finite
    mats[9] = mats[9] + torch.triu(torch.randn(R, R, device=device), diagonal=1)  # only the lower triangle counts
    previous = torch.randn(n, R, R, device=device)
    previous = previous + previous.transpose(1, 2)
    previous_valid = torch.tensor([True, False, True, False, False, False, False, True, True, False], device=device)
    mats_in = mats.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous storage, same values
    damping = 0.01
    inv, status = ops.damped_cholesky_inverse(
        mats_in, damping, eps_abs=1e-6, ranks=ranks, previous=previous, previous_valid=previous_valid,
        retry_factor=100.0, backend="triton",
    )
    ref_inv, ref_status = reference.damped_cholesky_inverse(
        mats.double().cpu(), damping, 1e-6, ranks.tolist(), previous.double().cpu(), previous_valid.cpu(), 100.0
    )
    assert torch.equal(status.cpu(), ref_status), f"status {status.tolist()} != {ref_status.tolist()}"
    expected = {
        0: InverseStatus.OK, 2: InverseStatus.KEPT_PREVIOUS, 3: InverseStatus.SCALED_IDENTITY,
        4: InverseStatus.RETRIED, 5: InverseStatus.OK, 6: InverseStatus.SCALED_IDENTITY,
        7: InverseStatus.KEPT_PREVIOUS, 8: InverseStatus.OK,
    }
    if R > 1:
        for i, code in expected.items():
            assert int(status[i]) == code, f"matrix {i}: status {int(status[i])}, expected {code.name}"
    assert torch.isfinite(inv).all(), "non-finite inverse"
    assert torch.equal(inv, inv.transpose(1, 2))
    for i, err in enumerate(per_matrix_rel_err(inv, ref_inv)):
        assert err < 1e-4, f"matrix {i} (rank {int(ranks[i])}, status {int(status[i])}): rel err {err:.3e}"
    # padding is exactly the identity
    for i in range(n):
        r = int(ranks[i])
        pad = inv[i].clone()
        pad[:r, :r] = 0
        eye = torch.eye(R, device=device)
        eye[:r, :r] = 0
        assert torch.equal(pad, eye), f"matrix {i}: padding is not the identity"


def check_precondition(shapes, dtype, device=DEVICE, R=None, noncontiguous=False, compute_dot=True):
    """``shapes``: list of (r, d_in, d_out). Returns the max relative error over all gradients."""
    R = R or max(s[0] for s in shapes)
    M = len(shapes)
    grads_a, grads_b = [], []
    for i, (r, d_in, d_out) in enumerate(shapes):
        if noncontiguous and i % 2 == 0:  # transposed storage (slow path, its own launch)
            grads_a.append(torch.randn(d_in, r, device=device).to(dtype).T)
            grads_b.append(torch.randn(r, d_out, device=device).to(dtype).T)
        elif noncontiguous:  # padded rows (fast path)
            grads_a.append(torch.randn(r, d_in + 5, device=device).to(dtype)[:, 2 : 2 + d_in])
            grads_b.append(torch.randn(d_out, r + 3, device=device).to(dtype)[:, 1 : 1 + r])
        else:
            grads_a.append(torch.randn(r, d_in, device=device).to(dtype))
            grads_b.append(torch.randn(d_out, r, device=device).to(dtype))
    inv_d = spd_with_condition([100.0] * M, R, device).float()
    inv_h = spd_with_condition([100.0] * M, R, device).float()
    ref_a, ref_b, ref_dot = reference.precondition(
        [g.double().cpu() for g in grads_a], [g.double().cpu() for g in grads_b], inv_d.double().cpu(), inv_h.double().cpu()
    )
    raw_norm = sum(float((g.double().cpu() ** 2).sum()) for g in grads_a + grads_b) ** 0.5  # before the in-place op
    dot = ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=compute_dot, backend="triton")
    errs = []
    for g, ref in zip(grads_a + grads_b, ref_a + ref_b):
        assert g.dtype == dtype
        errs.append(rel_err(g, ref))
    worst = max(errs)
    assert worst < STORE_BOUND[dtype], f"precondition {dtype}: rel err {worst:.3e} (per grad {errs})"
    if compute_dot:
        assert dot.dtype == torch.float32 and dot.dim() == 0 and dot.device.type == torch.device(device).type
        # Cauchy-Schwarz scale of the dot product <g_pre, g_raw> (the raw norm: the op overwrote the grads;
        # with the preconditioned norm twice the scale fell below the dot itself when the inverse shrinks)
        scale = sum(float((g.double().cpu() ** 2).sum()) for g in ref_a + ref_b) ** 0.5 * raw_norm
        dot_err = abs(float(dot) - float(ref_dot)) / max(scale, 1e-300)
        assert dot_err < 1e-5, f"dot {float(dot)} vs {float(ref_dot)}"
    else:
        assert dot is None
    return worst


#: a scaled-down Llama layer (d_model 256, kv 64, mlp 704): q, k, v, o, gate, up, down -> (d_in, d_out)
SMALL_LLAMA_LAYER = [(256, 256), (256, 64), (256, 64), (256, 256), (256, 704), (256, 704), (704, 256)]


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gram(fresh_seed, r, dtype):
    check_gram(r, dtype, (3, 173))  # 519 rows: odd, several row blocks


@pytest.mark.parametrize("r", [1, 13, 100])
def test_gram_noncontiguous_and_tiled(fresh_seed, r):
    check_gram(r, torch.float32, (2, 67), noncontiguous=True)  # r=100: 2x2 output tiles of 64


def test_gram_bf16_and_empty(fresh_seed):
    check_gram(16, torch.bfloat16, (1, 257))
    out = torch.zeros(4, 4)
    ops.accumulate_gram_(out, torch.randn(0, 4), backend="triton")
    assert out.abs().sum() == 0


def test_gram_zero_rows_add_nothing_and_weight_zero(fresh_seed):
    out = torch.randn(8, 8)
    before = out.clone()
    ops.accumulate_gram_(out, torch.zeros(33, 8), weight=1.0, backend="triton")
    ops.accumulate_gram_(out, torch.randn(33, 8), weight=0.0, backend="triton")
    assert torch.equal(out, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grams_grouped(fresh_seed, dtype):
    check_grams([(16, 300), (4, 33), (13, 129), (1, 7), (16, 0), (64, 40)], dtype)


def test_grams_grouped_bf16_wide_rank_and_empty(fresh_seed):
    check_grams([(16, 257), (8, 64)], torch.bfloat16, bound=2e-6)
    check_grams([(100, 50), (5, 20)], torch.float32)  # r > 64: that matrix goes through the tiled kernel
    assert ops.accumulate_grams_([], [], backend="triton") == []


@pytest.mark.parametrize("R", [1, 13, 16, 64, 70])
def test_ema_fold(fresh_seed, R):
    check_fold(6, R)  # R=70: 4900 entries, two chunks


def test_ema_fold_noncontiguous(fresh_seed):
    check_fold(6, 16, noncontiguous=True)


@pytest.mark.parametrize("r", RANKS)
def test_inverse_conditioning_sweep(fresh_seed, r):
    conds = [1e1, 1e2, 1e4, 1e6, 1e8] if r >= 32 else [1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
    check_inverse_conditioning(r, 1e-3, conds)


@pytest.mark.parametrize("r", [4, 16])
def test_inverse_small_damping(fresh_seed, r):
    # cond(C + lam I) up to ~1e6 (the bound grows with it); beyond ~1e7 an fp32 Cholesky may fail
    # where the float64 oracle succeeds, and the statuses would differ
    check_inverse_conditioning(r, 1e-6, [1e1, 1e4, 1e6])


def test_inverse_fp16_input(fresh_seed):
    check_inverse_conditioning(8, 1e-2, [1e1, 1e2], in_dtype=torch.float16)


@pytest.mark.parametrize("R", [1, 8, 16, 64])
def test_inverse_fallback_chain(fresh_seed, R):
    check_inverse_fallbacks(R)


def test_inverse_outputs_fully_written(fresh_seed, poisoned_empty):
    """Fresh output buffers are NaN/-7 poisoned: every element must be written by the kernel."""
    mats = spd_with_condition([10.0, 1e3, 1e6], 13).float()
    mats[2, 3, 3] = float("nan")
    inv, status = ops.damped_cholesky_inverse(mats, 1e-3, ranks=torch.tensor([13, 5, 13]), backend="triton")
    assert torch.isfinite(inv).all() and (status >= 0).all()
    assert status.tolist() == [InverseStatus.OK, InverseStatus.OK, InverseStatus.SCALED_IDENTITY]


def test_inverse_zero_matrices(fresh_seed):
    zeros = torch.zeros(3, 4, 4)
    inv, status = ops.damped_cholesky_inverse(zeros, 1e-3, eps_abs=1e-8, backend="triton")
    assert status.tolist() == [InverseStatus.OK] * 3
    assert torch.allclose(inv, torch.eye(4).expand(3, 4, 4) * 1e8, rtol=1e-6)
    # no absolute floor: lam = 0, both attempts fail, no previous -> I (lam not positive)
    inv, status = ops.damped_cholesky_inverse(zeros, 1e-3, eps_abs=0.0, backend="triton")
    assert status.tolist() == [InverseStatus.SCALED_IDENTITY] * 3
    assert torch.equal(inv, torch.eye(4).expand(3, 4, 4))


def test_inverse_large_R_routes_to_torch(fresh_seed):
    mats = spd_with_condition([10.0, 1e4], 70).float()
    inv, status = ops.damped_cholesky_inverse(mats, 1e-3, backend="triton")
    ref_inv, ref_status = reference.damped_cholesky_inverse(mats.double(), 1e-3)
    assert torch.equal(status, ref_status) and rel_err(inv, ref_inv) < 1e-3


def test_inverse_matches_torch_backend_statuses(fresh_seed):
    """Random mixtures of SPD, indefinite and singular matrices: same statuses as the torch path."""
    R = 8
    mats = spd_with_condition([10.0] * 12, R).float()
    sign = torch.where(torch.rand(12, R) < 0.2, -1.0, 1.0)
    q, _ = torch.linalg.qr(torch.randn(12, R, R))
    mats = torch.where(torch.rand(12, 1, 1) < 0.5, mats, (q * (sign * torch.rand(12, R))[:, None, :]) @ q.transpose(1, 2))
    prev_valid = torch.rand(12) < 0.5
    previous = torch.eye(R).repeat(12, 1, 1) * 3
    args = (mats, 0.05, 1e-9, None, previous, prev_valid, 10.0)
    inv_t, st_t = ops.damped_cholesky_inverse(*args, backend="triton")
    inv_r, st_r = ops.damped_cholesky_inverse(*args, backend="torch")
    assert torch.equal(st_t, st_r)
    assert rel_err(inv_t, inv_r) < 1e-4


@pytest.mark.parametrize("r", RANKS + [128])
def test_precondition_per_rank(fresh_seed, r):
    check_precondition([(r, 96, 80), (r, 33, 17)], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_precondition_odd_dims_and_dtypes(fresh_seed, dtype):
    check_precondition([(16, 4097, 3), (16, 5, 4097)], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_precondition_mask_free_variant(fresh_seed, dtype):
    """Rank == tile and lengths multiples of BLOCK: the EVEN / ALIGNED specialisation (no masks)."""
    from grit_kernels.triton import precondition as kernel_module

    block, _ = kernel_module.config(16, dtype.itemsize)
    shapes = [(16, 2 * block, block), (16, block, 3 * block)]
    check_precondition(shapes, dtype)
    grads = [torch.empty(r, d_in, dtype=dtype) for r, d_in, _ in shapes] + [torch.empty(d_out, r, dtype=dtype) for r, _, d_out in shapes]
    plan = kernel_module._plans[kernel_module._layout_key(grads, torch.device("cpu"))]
    assert [(launch.even, launch.strides_aligned) for launch in plan.launches] == [(True, True)]


def test_precondition_mixed_ranks_one_bank(fresh_seed):
    check_precondition([(16, 64, 48), (4, 33, 65), (13, 17, 9), (1, 5, 7), (8, 100, 3)], torch.float32, R=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_precondition_noncontiguous(fresh_seed, dtype):
    check_precondition([(16, 40, 24), (8, 31, 19), (13, 7, 70), (4, 50, 5)], dtype, R=16, noncontiguous=True)


def test_precondition_without_dot_and_empty(fresh_seed):
    check_precondition([(8, 40, 24)], torch.float32, compute_dot=False)
    assert ops.precondition_([], [], torch.eye(4)[None], torch.eye(4)[None], backend="triton") is None


def test_precondition_mixed_dtypes(fresh_seed):
    """fp32 lora_A and bf16 lora_B grads: one launch per dtype, one dot over both."""
    ga = [torch.randn(8, 50), torch.randn(8, 30)]
    gb = [torch.randn(40, 8).bfloat16(), torch.randn(20, 8).bfloat16()]
    inv_d, inv_h = spd_with_condition([10.0] * 2, 8).float(), spd_with_condition([10.0] * 2, 8).float()
    ref_a, ref_b, ref_dot = reference.precondition([g.double() for g in ga], [g.double() for g in gb], inv_d.double(), inv_h.double())
    dot = ops.precondition_(ga, gb, inv_d, inv_h, compute_dot=True, backend="triton")
    assert max(rel_err(g, r) for g, r in zip(ga, ref_a)) < 2e-6
    assert max(rel_err(g, r) for g, r in zip(gb, ref_b)) < 1e-2
    assert abs(float(dot) - float(ref_dot)) < 1e-2 * abs(float(ref_dot)) + 1e-3


@pytest.fixture
def count_uploads(monkeypatch):
    """Record every host->device table copy of the precondition kernel module (``_device.upload_``) and
    fail on any ``torch.tensor(..., device=...)`` (a pageable, blocking copy on CUDA) during the test."""
    from grit_kernels.triton import precondition as kernel_module

    uploads = []
    real_upload, real_tensor = kernel_module.upload_, torch.tensor

    def upload(dst, host):
        uploads.append(host.numel())
        return real_upload(dst, host)

    def tensor(*args, **kwargs):
        assert kwargs.get("device") is None, "blocking torch.tensor(..., device=...) in the precondition path"
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "upload_", upload)
    monkeypatch.setattr(torch, "tensor", tensor)
    return uploads


def _precondition_and_check(ga, gb, inv_d, inv_h):
    ref_a, ref_b, _ = reference.precondition([g.double() for g in ga], [g.double() for g in gb], inv_d.double(), inv_h.double())
    ops.precondition_(ga, gb, inv_d, inv_h, backend="triton")
    assert max(rel_err(g, r) for g, r in zip(ga + gb, ref_a + ref_b)) < 2e-6


def test_precondition_tables_keyed_by_layout(fresh_seed, count_uploads):
    """The static table is built once per layout (shapes, strides, dtypes); new gradient tensors of the
    same layout (zero_grad(set_to_none=True)) only re-upload the pointers; nothing else is copied."""
    from grit_kernels.triton import precondition as kernel_module

    shapes = [(8, 40, 24), (4, 24, 40), (8, 13, 7)]
    inv_d = spd_with_condition([10.0] * 3, 8).float()
    inv_h = spd_with_condition([10.0] * 3, 8).float()
    ga = [torch.randn(r, d) for r, d, _ in shapes]
    gb = [torch.randn(d, r) for r, _, d in shapes]
    _precondition_and_check(ga, gb, inv_d, inv_h)
    plan = kernel_module._plans[kernel_module._layout_key(ga + gb, inv_d.device)]
    assert count_uploads == [plan.static.numel(), 6], count_uploads  # static part once, then 6 pointers
    count_uploads.clear()
    _precondition_and_check(ga, gb, inv_d, inv_h)  # same tensors: nothing uploaded
    assert count_uploads == []
    keep = ga + gb  # keep the old tensors alive so that the new ones get new addresses
    ga = [torch.randn(r, d) for r, d, _ in shapes]
    gb = [torch.randn(d, r) for r, _, d in shapes]
    _precondition_and_check(ga, gb, inv_d, inv_h)
    assert count_uploads == [6], "new addresses, same layout: only the pointers are uploaded"
    assert kernel_module._plans[kernel_module._layout_key(ga + gb, inv_d.device)] is plan
    count_uploads.clear()
    ga = [torch.randn(r, d + 1)[:, :d] for r, d, _ in shapes]  # another layout (row stride d + 1)
    _precondition_and_check(ga, gb, inv_d, inv_h)
    assert kernel_module._plans[kernel_module._layout_key(ga + gb, inv_d.device)] is not plan
    assert len(count_uploads) == 2 and len(keep) == 6


def test_precondition_captured_plans_never_dangle_or_change(fresh_seed, monkeypatch):
    """A plan used under CUDA-graph capture (simulated) is frozen: later calls with other gradients and
    more than _CACHE_SIZE other layouts neither evict it nor rewrite its pointers."""
    from grit_kernels.triton import precondition as kernel_module

    inv = spd_with_condition([10.0] * 2, 4).float()
    ga = [torch.randn(4, 32), torch.randn(4, 48)]
    gb = [torch.randn(16, 4), torch.randn(20, 4)]
    _precondition_and_check(ga, gb, inv, inv)  # eager warm-up
    monkeypatch.setattr(kernel_module, "capturing", lambda device: True)
    ops.precondition_(ga, gb, inv, inv, backend="triton")  # "captured"
    monkeypatch.undo()
    frozen = kernel_module._graph_plans[-1]
    assert frozen.frozen and frozen.uploaded == tuple(g.data_ptr() for g in ga + gb)
    captured_pointers = frozen.pointers.clone()
    ga2 = [torch.randn_like(g) for g in ga]
    gb2 = [torch.randn_like(g) for g in gb]
    _precondition_and_check(ga2, gb2, inv, inv)  # same layout, other tensors: a fork, not a rewrite
    assert kernel_module._plans[kernel_module._layout_key(ga2 + gb2, inv.device)] is not frozen
    for width in range(kernel_module._CACHE_SIZE + 2):  # evict every cached layout
        _precondition_and_check([torch.randn(4, 5 + width)], [torch.randn(3, 4)], inv[:1], inv[:1])
    assert frozen in kernel_module._graph_plans and torch.equal(frozen.pointers, captured_pointers)
    _precondition_and_check(ga, gb, inv, inv)  # the captured tensors still work (same pointers)


def test_precondition_refuses_rank_above_inverse(fresh_seed):
    with pytest.raises(ValueError, match="rank 16 but the inverses are 8 x 8"):
        ops.precondition_([torch.randn(16, 5)], [torch.randn(7, 16)], torch.eye(8)[None], torch.eye(8)[None], backend="triton")


def test_launchers_refuse_tensors_on_another_device(fresh_seed):
    """Every Triton launcher checks devices (and the inverse its shapes) before launching: a tensor on another
    device (here ``meta``; on a GPU machine the CPU or another GPU) would reach the kernel as a foreign pointer."""
    from grit_kernels.triton import fold, gram, inverse
    from grit_kernels.triton import precondition as launcher

    meta = torch.device("meta")
    with pytest.raises(ValueError, match="x is on meta"):
        gram.accumulate_gram_(torch.zeros(4, 4), torch.empty(8, 4, device=meta))
    with pytest.raises(ValueError, match=r"xs\[1\] is on meta"):
        gram.accumulate_grams_([torch.zeros(4, 4), torch.zeros(4, 4)], [torch.randn(8, 4), torch.empty(8, 4, device=meta)])
    with pytest.raises(ValueError, match="weight is on meta"):
        fold.ema_fold_(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.ones(2, device=meta), 0.9, torch.zeros(2, dtype=torch.bool))
    mats = torch.eye(4).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="ranks is on meta"):
        inverse.damped_cholesky_inverse(mats, 1e-3, ranks=torch.tensor([4, 4], device=meta))
    with pytest.raises(ValueError, match="previous must be floating point"):
        inverse.damped_cholesky_inverse(mats, 1e-3, previous=torch.eye(4)[None], previous_valid=torch.ones(1, dtype=torch.bool))
    ga = [torch.randn(4, 19), torch.randn(4, 23)]  # a layout no other test uses: the plan is built (and checked) here
    gb = [torch.randn(29, 4), torch.empty(31, 4, device=meta)]
    before = [g.clone() for g in ga]
    with pytest.raises(ValueError, match=r"grads_b\[1\] is on meta"):
        launcher.precondition_(ga, gb, mats, mats)
    with pytest.raises(ValueError, match="inv_h is on meta"):
        launcher.precondition_(ga, gb[:1] + [torch.randn(31, 4)], mats, mats.to(meta))
    assert all(torch.equal(g, b) for g, b in zip(ga, before))  # nothing was launched


def test_precondition_bank_scale(fresh_seed):
    """14 modules (2 scaled-down Llama layers x 7 targets) of mixed shapes, with inverses from the kernel."""
    r = 16
    shapes = [(r, d_in, d_out) for _ in range(2) for d_in, d_out in SMALL_LLAMA_LAYER]
    M = len(shapes)
    grads_a = [torch.randn(r, d_in) for _, d_in, _ in shapes]
    grads_b = [torch.randn(d_out, r) for _, _, d_out in shapes]
    factors = spd_with_condition([1e3] * (2 * M), r).float()
    inv, status = ops.damped_cholesky_inverse(factors, 1e-3, backend="triton")
    assert (status == InverseStatus.OK).all()
    inv_d, inv_h = inv[:M], inv[M:]
    ref_a, ref_b, ref_dot = reference.precondition(
        [g.double() for g in grads_a], [g.double() for g in grads_b], inv_d.double(), inv_h.double()
    )
    dot = ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend="triton")
    assert max(rel_err(g, r_) for g, r_ in zip(grads_a + grads_b, ref_a + ref_b)) < 2e-6
    assert abs(float(dot) - float(ref_dot)) <= 1e-5 * abs(float(ref_dot))


def test_precondition_nonfinite_grads_stay_local(fresh_seed):
    """A NaN in one module's gradient does not leak into other modules."""
    ga = [torch.randn(8, 30), torch.randn(8, 30)]
    gb = [torch.randn(20, 8), torch.randn(20, 8)]
    ga[0][3, 4] = float("nan")
    inv = torch.eye(8).repeat(2, 1, 1) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops.precondition_(ga, gb, inv, inv, backend="triton")
    assert torch.isfinite(ga[1]).all() and torch.isfinite(gb[0]).all() and torch.isfinite(gb[1]).all()
    assert torch.isnan(ga[0][:, 4]).all()
