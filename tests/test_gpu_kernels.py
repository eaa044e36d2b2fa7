"""Triton kernels on CUDA against the float64 oracle: the checks of test_triton_kernels.py on the device,
Llama-3-8B-sized banks, no host synchronisation, and CUDA-graph capture.

Run on a GPU machine with the interpreter off: ``TRITON_INTERPRET=0 python -m pytest -m gpu -q tests/``
(bench/run_gpu_all.sh does this, one pytest process per file). tests/conftest.py defaults ``TRITON_INTERPRET`` to 1 for CPU runs; under
the interpreter these tests skip.
"""


import pytest
import test_triton_kernels as checks
import torch
from conftest import rel_err
from test_triton_kernels import poisoned_empty  # noqa: F401  (fixture)

from grit_kernels import ops, reference
from grit_kernels.ops import interpreter_active
from grit_kernels.status import InverseStatus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        interpreter_active(), reason="TRITON_INTERPRET=1: run GPU tests with TRITON_INTERPRET=0 (bench/run_gpu_all.sh)"
    ),
]

CUDA = "cuda"
RANKS = checks.RANKS

#: Llama-3-8B LoRA targets (d_in, d_out): q, k, v, o, gate, up, down; 32 layers -> 224 modules
LLAMA3_8B_LAYER = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
LLAMA3_8B_LAYERS = 32


def llama3_8b_grads(r=16, dtype=torch.bfloat16, layers=LLAMA3_8B_LAYERS):
    grads_a, grads_b = [], []
    for _ in range(layers):
        for d_in, d_out in LLAMA3_8B_LAYER:
            grads_a.append(torch.randn(r, d_in, device=CUDA).to(dtype))
            grads_b.append(torch.randn(d_out, r, device=CUDA).to(dtype))
    return grads_a, grads_b


# ------------------------------------------------------------------------------ op-level checks


@pytest.mark.parametrize("r", RANKS + [128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gram_gpu(fresh_seed, r, dtype):
    # 16382 rows: many programs and atomics; half-precision tiles go through the tensor cores
    checks.check_gram(r, dtype, (2, 8191), device=CUDA, bound=2e-5)


@pytest.mark.parametrize("r", [1, 13, 100])
def test_gram_gpu_noncontiguous(fresh_seed, r):
    checks.check_gram(r, torch.bfloat16, (3, 1001), device=CUDA, noncontiguous=True, bound=2e-5)


@pytest.mark.parametrize("R", [1, 13, 16, 64, 70])
def test_ema_fold_gpu(fresh_seed, R):
    checks.check_fold(448, R, device=CUDA)
    checks.check_fold(8, R, device=CUDA, noncontiguous=True)


@pytest.mark.parametrize("r", RANKS)
def test_inverse_conditioning_gpu(fresh_seed, r):
    checks.check_inverse_conditioning(r, 1e-3, [1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8], device=CUDA)
    # small damping: cond(C + lam I) up to ~1e6, where fp32 Cholesky still succeeds like the oracle's
    checks.check_inverse_conditioning(r, 1e-6, [1e1, 1e4, 1e6], device=CUDA)


@pytest.mark.parametrize("R", [1, 8, 16, 32, 64])
def test_inverse_fallbacks_gpu(fresh_seed, R):
    checks.check_inverse_fallbacks(R, device=CUDA)


def test_inverse_outputs_fully_written_gpu(fresh_seed, poisoned_empty):
    mats = checks.spd_with_condition([10.0] * 447 + [1e6], 16, CUDA).float()
    mats[5, 2, 2] = float("nan")
    inv, status = ops.damped_cholesky_inverse(mats, 1e-3, backend="triton")
    assert torch.isfinite(inv).all()
    assert int(status[5]) == InverseStatus.SCALED_IDENTITY and int((status == InverseStatus.OK).sum()) == 447


def test_inverse_llama3_8b_bank(fresh_seed):
    """448 factors r=16 (both factors of 224 modules) in one launch, against the oracle and torch."""
    mats = checks.spd_with_condition(torch.logspace(1, 8, 448).tolist(), 16, CUDA).float()
    inv, status = ops.damped_cholesky_inverse(mats, 1e-3, backend="triton")
    ref_inv, ref_status = reference.damped_cholesky_inverse(mats.double().cpu(), 1e-3)
    assert torch.equal(status.cpu(), ref_status)
    kappas = checks.damped_condition(mats.double(), 1e-3, 1e-12)
    for i, (kappa, err) in enumerate(zip(kappas, checks.per_matrix_rel_err(inv, ref_inv))):
        assert err < 8 * kappa * checks.EPS32 + 2e-6, f"matrix {i}: rel err {err:.3e}, kappa {kappa:.2e}"
    torch_inv, torch_status = ops.damped_cholesky_inverse(mats, 1e-3, backend="torch")
    assert torch.equal(status, torch_status)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precondition_llama3_8b_even_variant(fresh_seed, dtype):
    """Llama shapes take the mask-free, aligned kernel (rank == tile, lengths multiples of BLOCK)."""
    from grit_kernels.triton import precondition as kernel_module

    shapes = [(16, d_in, d_out) for d_in, d_out in LLAMA3_8B_LAYER]
    checks.check_precondition(shapes, dtype, device=CUDA)
    grads = [torch.empty(16, d_in, device=CUDA, dtype=dtype) for _, d_in, _ in shapes]
    grads += [torch.empty(d_out, 16, device=CUDA, dtype=dtype) for _, _, d_out in shapes]
    plan = kernel_module._plans[kernel_module._layout_key(grads, grads[0].device)]
    assert all(launch.even and launch.strides_aligned for launch in plan.launches)


@pytest.mark.parametrize("r", RANKS + [128])
def test_precondition_gpu(fresh_seed, r):
    checks.check_precondition([(r, 4097, 4095), (r, 1024, 14336), (r, 33, 1)], torch.float32, device=CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_precondition_gpu_mixed_and_noncontiguous(fresh_seed, dtype):
    shapes = [(16, 4096, 1024), (4, 333, 65), (13, 17, 4097), (1, 5, 7), (64, 100, 3)]
    checks.check_precondition(shapes, dtype, device=CUDA, R=64)
    checks.check_precondition(shapes, dtype, device=CUDA, R=64, noncontiguous=True)


def test_precondition_llama3_8b_bank(fresh_seed):
    """224 modules of Llama-3-8B (41.9M LoRA parameters at r=16), bf16 grads, one launch."""
    r = 16
    grads_a, grads_b = llama3_8b_grads(r)
    assert sum(g.numel() for g in grads_a + grads_b) == 41_943_040
    M = len(grads_a)
    inv, status = ops.damped_cholesky_inverse(checks.spd_with_condition([1e3] * (2 * M), r, CUDA).float(), 1e-3)
    assert (status == InverseStatus.OK).all()
    inv_d, inv_h = inv[:M], inv[M:]
    ref_a, ref_b, ref_dot = reference.precondition(
        [g.double().cpu() for g in grads_a], [g.double().cpu() for g in grads_b], inv_d.double().cpu(), inv_h.double().cpu()
    )
    dot = ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend="triton")
    worst = max(rel_err(g, ref) for g, ref in zip(grads_a + grads_b, ref_a + ref_b))
    assert worst < checks.STORE_BOUND[torch.bfloat16], worst
    assert abs(float(dot) - float(ref_dot)) < 1e-4 * abs(float(ref_dot))


# ---------------------------------------------------------------------- no host sync, graphs


def _sync_free_step(M, r, width):
    """Tensors and one call of every op (the grouped Gram op included) for a fresh gradient layout."""
    grads_a = [torch.randn(r, width, device=CUDA) for _ in range(M)]
    grads_b = [torch.randn(width + 64, r, device=CUDA) for _ in range(M)]
    bank = torch.zeros(2 * M, r, r, device=CUDA)
    factor = torch.zeros_like(bank)
    init = torch.zeros(2 * M, dtype=torch.bool, device=CUDA)
    weight = torch.full((2 * M,), 1e-3, device=CUDA)
    prev = torch.eye(r, device=CUDA).repeat(2 * M, 1, 1)
    prev_valid = torch.ones(2 * M, dtype=torch.bool, device=CUDA)
    ranks = torch.full((2 * M,), r, dtype=torch.int32, device=CUDA)
    xs = [torch.randn(8, 512, r, device=CUDA, dtype=torch.bfloat16) for _ in range(2 * M)]

    def step():
        ops.accumulate_grams_(list(bank.unbind(0)), xs, 1.0 / 4096, backend="triton")
        ops.accumulate_gram_(bank[0], xs[0], 1.0 / 4096, backend="triton")
        ops.ema_fold_(factor, bank, weight, 0.95, init, backend="triton")
        inv, status = ops.damped_cholesky_inverse(factor, 1e-3, 1e-12, ranks, prev, prev_valid, 100.0, backend="triton")
        dot = ops.precondition_(grads_a, grads_b, inv[:M], inv[M:], compute_dot=True, backend="triton", modules=list(range(M))[::-1])
        return dot, status

    return step


def test_ops_do_not_synchronize(fresh_seed):
    """Every op under torch.cuda.set_sync_debug_mode('error'), the FIRST call of a new gradient layout
    included (table build and upload), then again with reallocated gradients (set_to_none)."""
    _sync_free_step(6, 16, 128)()  # compiles the kernels on another layout
    torch.cuda.synchronize()
    step = _sync_free_step(14, 16, 256)
    torch.cuda.set_sync_debug_mode("error")
    try:
        dot, status = step()  # first call of this layout: builds and uploads its tables
        dot2, status2 = _sync_free_step(14, 16, 256)()  # same layout, new tensors: pointer upload only
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(dot) and torch.isfinite(dot2) and (status == InverseStatus.OK).all()


def test_optimizer_steps_do_not_synchronize(fresh_seed):
    """20 real GritOptimizer steps (backward, step with inversions, zero_grad(set_to_none=True)) under
    set_sync_debug_mode('error'); the forward of the HF model runs outside (it is not ours)."""
    from helpers import small_llama

    import grit_kernels as gk

    model = small_llama(num_layers=2).to(CUDA)
    cfg = gk.GritConfig(warmup_steps=1, update_freq=5, nonfinite_grads="ignore")
    pre = gk.GritPreconditioner(model, cfg)
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    ids = torch.randint(0, 500, (2, 64), device=CUDA)

    def step(check):
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.set_sync_debug_mode("error" if check else "default")
        try:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    for _ in range(2):  # compile kernels
        step(False)
    for _ in range(20):
        step(True)
    assert pre.bank.refresh_count >= 4 and torch.isfinite(pre.bank.inverse).all()


def test_grams_grouped_gpu(fresh_seed):
    for dtype in (torch.float32, torch.bfloat16):
        checks.check_grams([(16, 8191), (4, 333), (13, 1290), (1, 7), (64, 4000), (32, 2048)], dtype, device=CUDA, bound=2e-5)


def test_cuda_graph_inverse_and_precondition(fresh_seed):
    """Capture inversion + preconditioning in one CUDA graph; replay on new data equals eager."""
    M, r = 28, 16
    shapes = [(d_in, d_out) for d_in, d_out in LLAMA3_8B_LAYER for _ in range(4)]
    static_factors = checks.spd_with_condition([1e2] * (2 * M), r, CUDA).float()
    static_prev = torch.eye(r, device=CUDA).repeat(2 * M, 1, 1)
    static_prev_valid = torch.zeros(2 * M, dtype=torch.bool, device=CUDA)
    grads_a = [torch.randn(r, d_in, device=CUDA, dtype=torch.bfloat16) for d_in, _ in shapes]
    grads_b = [torch.randn(d_out, r, device=CUDA, dtype=torch.bfloat16) for _, d_out in shapes]

    def body():
        inv, status = ops.damped_cholesky_inverse(
            static_factors, 1e-3, 1e-12, None, static_prev, static_prev_valid, 100.0, backend="triton"
        )
        dot = ops.precondition_(grads_a, grads_b, inv[:M], inv[M:], compute_dot=True, backend="triton")
        return inv, status, dot

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, build tables
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_inv, g_status, g_dot = body()

    # eager calls on other tensors of the same layout after capture: they must not redirect the graph
    other_a, other_b = [g.clone() for g in grads_a], [g.clone() for g in grads_b]
    ops.precondition_(other_a, other_b, static_prev[:M], static_prev[M:], backend="triton")

    for trial in range(2):
        new_factors = checks.spd_with_condition([10.0 ** (trial + 1)] * (2 * M), r, CUDA).float()
        new_factors[3, 0, 0] = float("nan")  # one failing matrix: its fallback is decided in the graph
        new_a = [torch.randn_like(g) for g in grads_a]
        new_b = [torch.randn_like(g) for g in grads_b]
        static_factors.copy_(new_factors)
        for g, n in zip(grads_a + grads_b, new_a + new_b):
            g.copy_(n)
        graph.replay()
        torch.cuda.synchronize()
        replay_a = [g.clone() for g in grads_a]
        replay_b = [g.clone() for g in grads_b]
        replay_inv, replay_status, replay_dot = g_inv.clone(), g_status.clone(), g_dot.clone()

        for g, n in zip(grads_a + grads_b, new_a + new_b):
            g.copy_(n)
        eager_inv, eager_status, eager_dot = body()
        assert torch.equal(replay_status, eager_status)
        assert int(replay_status[3]) == InverseStatus.SCALED_IDENTITY
        assert torch.equal(replay_inv, eager_inv)
        for replayed, eager in zip(replay_a + replay_b, grads_a + grads_b):
            assert torch.equal(replayed, eager)
        assert torch.equal(replay_dot, eager_dot)
