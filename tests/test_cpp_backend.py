"""The C++ CPU backend (``csrc/grit_cpu.cpp``, ``backend="cpp"``) against :mod:`grit_kernels.reference`,
the torch backend over whole GritPreconditioner steps, torch.compile over the ops, and the optional build.

Skipped (with the reason) where the extension is not built: ``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from grit_kernels import _ext, ops
from grit_kernels import reference as ref
from grit_kernels.status import InverseStatus

REPO = Path(__file__).resolve().parent.parent
needs_cpp = pytest.mark.skipif(
    not _ext.cpu_available(), reason=f"C++ extension not built: {_ext.load_error()}"
)
BOUND = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def _spd(n: int, r: int, rows: int = 64, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(n, rows, r, dtype=dtype)
    return x.transpose(1, 2) @ x / rows


@needs_cpp
@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_gram(fresh_seed, x_dtype):
    out_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
    R, r = 24, 20  # a bank slice: non-contiguous [r, r] view, r not a multiple of the 16-wide tiles
    bank = torch.full((R, R), float("nan"), dtype=out_dtype)
    bank[:r, :r] = torch.randn(r, r, dtype=out_dtype)
    out = bank[:r, :r]
    x = torch.randn(3, 411, r).to(x_dtype)  # 1233 rows: several 512-row chunks and a ragged one
    expected = ref.accumulate_gram(out.double(), x.double(), 0.25)
    torch.ops.grit_kernels_cpp.accumulate_gram_(
        out, x, 0.25
    )  # the C++ kernel (backend "cpp" uses addmm on CPU)
    assert rel_err(out, expected) < BOUND[x_dtype]
    assert torch.isnan(bank[r:]).all() and torch.isnan(bank[:, r:]).all()  # outside the slice untouched


@needs_cpp
def test_accumulate_gram_empty_and_symmetric(fresh_seed):
    out = torch.zeros(16, 16)
    torch.ops.grit_kernels_cpp.accumulate_gram_(out, torch.randn(0, 16), 1.0)
    assert torch.equal(out, torch.zeros(16, 16))
    torch.ops.grit_kernels_cpp.accumulate_gram_(out, torch.randn(1000, 16), 1.0)
    assert torch.equal(out, out.T)
    other = torch.zeros(16, 16)
    ops.accumulate_gram_(other, torch.randn(1000, 16), backend="cpp")
    assert other.abs().sum() > 0


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ema_fold(fresh_seed, dtype):
    n, R = 9, 8
    factor = _spd(n, R, dtype=dtype)
    stat = _spd(n, R, dtype=dtype) * 50
    stat[2, 1, 3] = float("nan")  # non-finite statistic: skipped
    stat[5, 0, 0] = float("inf")
    weight = torch.rand(n, dtype=dtype) + 0.1
    weight[4] = 0  # no rows this step: skipped
    init = torch.tensor([True, False] * 4 + [True])
    exp_factor, exp_init = ref.ema_fold(factor.double(), stat.double(), weight.double(), 0.9, init)
    ops.ema_fold_(factor, stat, weight, 0.9, init, backend="cpp")
    assert rel_err(factor, exp_factor) < BOUND[dtype]
    assert torch.equal(init, exp_init)


def _inverse_cases(dtype):
    """Factors that exercise every status code: OK, RETRIED, KEPT_PREVIOUS, SCALED_IDENTITY."""
    n, R = 10, 16
    mats = _spd(n, R, dtype=dtype)
    ranks = torch.tensor([16, 8, 16, 16, 16, 3, 16, 16, 12, 1], dtype=torch.int32)
    mats[1, 8:, :] = float("nan")  # padding outside rank 8: ignored
    retry = torch.eye(R, dtype=dtype)
    retry[-1, -1] = -1e-2  # fails at lam ~ 9e-4, succeeds at 100 * lam
    mats[2] = retry
    mats[3] = -torch.eye(R, dtype=dtype)  # indefinite; previous valid -> kept
    mats[4, 0, 1] = float("nan")  # non-finite, no previous -> I / lam
    mats[6] = -torch.eye(R, dtype=dtype)  # indefinite, negative lam, no previous -> I
    mats[7] = 0  # all zero: lam = eps_abs, inverse 1/eps_abs
    previous = torch.randn(n, R, R, dtype=dtype)
    previous = previous + previous.transpose(1, 2)
    valid = torch.zeros(n, dtype=torch.bool)
    valid[[3, 5]] = True
    return mats, ranks, previous, valid


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_damped_cholesky_inverse(fresh_seed, dtype):
    mats, ranks, previous, valid = _inverse_cases(dtype)
    inv, status = ops.damped_cholesky_inverse(mats, 1e-3, 1e-6, ranks, previous, valid, 100.0, backend="cpp")
    exp_inv, exp_status = ref.damped_cholesky_inverse(
        mats.double(), 1e-3, 1e-6, ranks.tolist(), previous.double(), valid, 100.0
    )
    assert status.dtype == torch.int32 and status.tolist() == exp_status.tolist()
    codes = set(status.tolist())
    assert {int(s) for s in InverseStatus} <= codes
    assert inv.dtype == dtype and torch.isfinite(inv).all()
    assert torch.equal(inv, inv.transpose(1, 2))
    for i in range(mats.shape[0]):
        assert rel_err(inv[i], exp_inv[i]) < (1e-10 if dtype == torch.float64 else 1e-4), i


@needs_cpp
def test_damped_cholesky_inverse_blocks_of_16_equal_one_by_one(fresh_seed):
    """float32 factors of one rank go through 16 vector lanes at a time: every matrix's inverse and status are
    those of a call on that matrix alone (scalar chain) bit for bit, failing lanes included, and the oracle's."""
    n, R = 37, 16
    mats = _spd(n, R, dtype=torch.float32)
    ranks = torch.full((n,), R, dtype=torch.int32)
    ranks[33:] = 12  # a last, mixed-rank block: scalar
    retry = torch.eye(R)
    retry[-1, -1] = -1e-2  # fails at lam, succeeds at 100 * lam
    mats[2] = retry
    mats[3] = -torch.eye(R)  # indefinite; previous valid -> kept
    mats[4, 0, 1] = float("nan")
    mats[5, 2, 9] = float("inf")  # upper triangle only: still a non-finite input
    mats[20] = 0
    previous = torch.randn(n, R, R)
    previous = previous + previous.transpose(1, 2)
    valid = torch.rand(n) > 0.5
    valid[3], valid[4], valid[5] = True, False, False  # kept / I / lam / I / lam
    inv, status = ops.damped_cholesky_inverse(mats, 1e-3, 1e-6, ranks, previous, valid, 100.0, backend="cpp")
    for i in range(n):
        one_inv, one_status = ops.damped_cholesky_inverse(
            mats[i : i + 1],
            1e-3,
            1e-6,
            ranks[i : i + 1],
            previous[i : i + 1],
            valid[i : i + 1],
            100.0,
            backend="cpp",
        )
        assert torch.equal(inv[i], one_inv[0]) and status[i] == one_status[0], i
    exp_inv, exp_status = ref.damped_cholesky_inverse(
        mats.double(), 1e-3, 1e-6, ranks.tolist(), previous.double(), valid, 100.0
    )
    assert status.tolist() == exp_status.tolist()
    assert {int(s) for s in InverseStatus} <= set(status.tolist())
    for i in range(n):
        assert rel_err(inv[i], exp_inv[i]) < 1e-4, i


@needs_cpp
def test_damped_cholesky_inverse_matches_torch_backend(fresh_seed):
    mats, ranks, previous, valid = _inverse_cases(torch.float32)
    a = ops.damped_cholesky_inverse(mats, 1e-3, 1e-6, ranks, previous, valid, 100.0, backend="cpp")
    b = ops.damped_cholesky_inverse(mats, 1e-3, 1e-6, ranks, previous, valid, 100.0, backend="torch")
    assert torch.equal(a[1], b[1])
    assert rel_err(a[0], b[0]) < 1e-5
    plain = _spd(7, 16, dtype=torch.float32)  # no ranks / previous
    a = ops.damped_cholesky_inverse(plain, 1e-2, backend="cpp")
    b = ops.damped_cholesky_inverse(plain, 1e-2, backend="torch")
    assert torch.equal(a[1], b[1]) and rel_err(a[0], b[0]) < 1e-5


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_precondition(fresh_seed, dtype):
    shapes = [(16, 100, 77), (8, 333, 50), (16, 31, 9), (5, 64, 1000), (16, 4100, 16)]  # (r, d_in, d_out)
    R = 16
    inv_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grads_a = [torch.randn(r, d_in).to(dtype) for r, d_in, _ in shapes]
    grads_b = [torch.randn(d_out, r).to(dtype) for r, _, d_out in shapes]
    inv_d = torch.randn(len(shapes), R, R, dtype=inv_dtype)
    inv_h = torch.randn(len(shapes), R, R, dtype=inv_dtype)
    new_a, new_b, exp_dot = ref.precondition(grads_a, grads_b, inv_d, inv_h)
    dot = ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend="cpp")
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for got, exp in zip(grads_a + grads_b, new_a + new_b):
        assert got.dtype == dtype and rel_err(got, exp) < tol
    assert dot.dtype == torch.float32 and dot.shape == ()
    assert abs(dot.item() - exp_dot.item()) <= 1e-4 * exp_dot.abs().item() + 1e-3
    assert ops.precondition_(grads_a[:1], grads_b[:1], inv_d, inv_h, backend="cpp") is None


@needs_cpp
def test_precondition_strided_gradient_falls_back(fresh_seed):
    base = torch.randn(40, 16)
    ga = [base.T]  # [16, 40] with column stride 16: not taken by the kernel, done by torch instead
    gb = [torch.randn(30, 16)]
    inv = torch.randn(1, 16, 16)
    exp_a, exp_b, _ = ref.precondition([ga[0].clone()], [gb[0].clone()], inv, inv)
    ops.precondition_(ga, gb, inv, inv, backend="cpp")
    assert rel_err(base.T, exp_a[0]) < 1e-6 and rel_err(gb[0], exp_b[0]) < 1e-6


@needs_cpp
def test_results_do_not_depend_on_threads(fresh_seed):
    grads = [torch.randn(16, 9000) for _ in range(4)] + [torch.randn(9000, 16) for _ in range(4)]
    inv = torch.randn(4, 16, 16)
    x = torch.randn(5000, 16)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            g = [t_.clone() for t_ in grads]
            dot = ops.precondition_(g[:4], g[4:], inv, inv, compute_dot=True, backend="cpp")
            out = torch.zeros(16, 16)
            torch.ops.grit_kernels_cpp.accumulate_gram_(out, x, 1.0)
            results.append((g, dot, out))
    finally:
        torch.set_num_threads(threads)
    (g1, d1, o1), (g2, d2, o2) = results
    assert all(torch.equal(a, b) for a, b in zip(g1, g2)) and torch.equal(d1, d2) and torch.equal(o1, o2)


def _train(backend: str, steps: int, seed: int):
    import grit_kernels as gk
    from grit_kernels.models import build_lora_model, tiny_llama_config

    # init_lora_weights=False: B != 0, so the first step already has both factors and preconditions
    model = build_lora_model(
        tiny_llama_config(num_layers=2, hidden=32, vocab=64), r=8, seed=seed, init_lora_weights=False
    )
    cfg = gk.GritConfig(backend=backend, warmup_steps=0, update_freq=2, kl_clip=1e-2)
    pre = gk.GritPreconditioner(model, cfg)
    opt = gk.GritOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3), pre)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return pre, [p.detach().clone() for p in pre.parameters()]


@needs_cpp
def test_preconditioner_steps_match_torch_backend(fresh_seed):
    """A whole GritPreconditioner step (statistics, fold, inversion, preconditioning, KL-clip, SGD) from the
    same state gives the same bank and adapters to rounding. (Over several steps the trajectories drift
    apart by more: the row-selection threshold and the clip amplify rounding, so one step is compared.)"""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    pre_cpp, params_cpp = _train("cpp", 1, seed)
    pre_torch, params_torch = _train("torch", 1, seed)
    assert pre_cpp.backend == "cpp" and pre_torch.backend == "torch"
    assert pre_cpp.bank.initialized.all() and torch.equal(pre_cpp.bank.status, pre_torch.bank.status)
    assert rel_err(pre_cpp.bank.factor, pre_torch.bank.factor) < 1e-6
    assert rel_err(pre_cpp.bank.inverse, pre_torch.bank.inverse) < 1e-4
    for a, b in zip(params_cpp, params_torch):
        assert rel_err(a, b) < 2e-5


@needs_cpp
def test_ops_compile_without_graph_break(fresh_seed):
    """Fake implementations let torch.compile trace every op in one graph (fullgraph=True)."""
    cpp = torch.ops.grit_kernels_cpp

    def step(stat, x, factor, weight, init, ranks, ga, gb):
        cpp.accumulate_gram_(stat, x, 1.0)
        cpp.ema_fold_(factor, stat.unsqueeze(0).expand_as(factor).contiguous(), weight, 0.9, init)
        inv, status = cpp.damped_cholesky_inverse(factor, 1e-3, 1e-6, ranks, None, None, 100.0)
        dot = cpp.precondition_([ga], [gb], inv, inv, True)
        return inv, status, dot

    def inputs():
        torch.manual_seed(1)
        return (
            torch.zeros(8, 8),
            torch.randn(50, 8),
            torch.zeros(1, 8, 8),
            torch.ones(1),
            torch.zeros(1, dtype=torch.bool),
            torch.full((1,), 8, dtype=torch.int32),
            torch.randn(8, 20),
            torch.randn(30, 8),
        )

    eager_in, compiled_in = inputs(), inputs()
    eager = step(*eager_in)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_in)
    for a, b in zip(eager + eager_in, compiled + compiled_in):
        assert torch.equal(a, b)


def test_auto_backend_on_cpu():
    from grit_kernels.ops import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == ("cpp" if _ext.cpu_available() else "torch")
    with pytest.raises(RuntimeError, match="needs cuda tensors"):
        resolve_backend("cuda", torch.device("cpu"))


# ------------------------------------------------------------------------------ the build
def _setup_py(tmp_path: Path, env: dict, *args: str, preamble: str = "") -> subprocess.CompletedProcess:
    """Run the repo's setup.py on a scratch copy (the tree is never written)."""
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "grit_cpu.cpp").write_text((REPO / "csrc" / "grit_cpu.cpp").read_text())
    (tmp_path / "grit_kernels").mkdir()
    (tmp_path / "grit_kernels" / "__init__.py").write_text("")
    (tmp_path / "setup.py").write_text((REPO / "setup.py").read_text())
    code = preamble + "import sys; sys.argv = ['setup.py', *sys.argv[1:]]; exec(open('setup.py').read())"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env={**os.environ, "GRIT_KERNELS_BUILD_CUDA": "0", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_setup_without_compiler_still_installs(tmp_path):
    """No working C++ compiler: build_ext reports one notice and succeeds without the extension."""
    res = _setup_py(tmp_path, {"CC": "/bin/false", "CXX": "/bin/false"}, "-q", "build_ext", "--inplace")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "grit-kernels: compiling grit_kernels._C failed" in res.stderr
    assert not list((tmp_path / "grit_kernels").glob("_C*.so"))


def test_setup_without_torch_in_build_env(tmp_path):
    """pip build isolation (no torch importable): metadata still builds, the notice says what to do."""
    res = _setup_py(tmp_path, {}, "--name", preamble="import sys; sys.modules['torch'] = None; ")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch not importable" in res.stderr and "--no-build-isolation" in res.stderr


def test_without_the_extension_torch_is_used():
    """Extension absent and no JIT: auto falls back to torch, an explicit 'cpp' says how to build it."""
    code = """
import sys; sys.modules['grit_kernels._C'] = None
import torch
from grit_kernels import _ext
from grit_kernels.ops import resolve_backend
assert not _ext.cpu_available() and _ext.load_error()
assert resolve_backend('auto', torch.device('cpu')) == 'torch'
try:
    resolve_backend('cpp', torch.device('cpu'))
except RuntimeError as exc:
    assert 'GRIT_KERNELS_JIT=1' in str(exc), exc
else:
    raise AssertionError('cpp backend resolved without the extension')
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "GRIT_KERNELS_JIT"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


# ------------------------------------------------------------------------------ CUDA kernels
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.cuda_available()),
    reason="CUDA kernels of csrc/ not built or no GPU",
)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_kernels_against_reference(fresh_seed, dtype):
    dev = "cuda"
    # inversion: every status code, warp path (R = 16) and block path (R = 48)
    mats, ranks, previous, valid = _inverse_cases(dtype)
    inv, status = ops.damped_cholesky_inverse(
        mats.to(dev), 1e-3, 1e-6, ranks.to(dev), previous.to(dev), valid.to(dev), 100.0, backend="cuda"
    )
    exp_inv, exp_status = ref.damped_cholesky_inverse(
        mats.double(), 1e-3, 1e-6, ranks.tolist(), previous.double(), valid, 100.0
    )
    assert status.cpu().tolist() == exp_status.tolist()
    assert rel_err(inv, exp_inv) < (1e-10 if dtype == torch.float64 else 1e-4)
    big = _spd(5, 48, dtype=dtype)
    inv, status = ops.damped_cholesky_inverse(big.to(dev), 1e-3, backend="cuda")
    exp_inv, _ = ref.damped_cholesky_inverse(big.double(), 1e-3)
    assert (status == 0).all() and rel_err(inv, exp_inv) < (1e-10 if dtype == torch.float64 else 1e-4)
    # Gram into a bank slice
    bank = torch.full((24, 24), float("nan"), dtype=dtype, device=dev)
    bank[:20, :20] = 0
    x = torch.randn(3000, 20, dtype=dtype, device=dev)
    ops.accumulate_gram_(bank[:20, :20], x, 0.5, backend="cuda")
    assert rel_err(bank[:20, :20], 0.5 * x.double().T @ x.double()) < BOUND[dtype] * 10
    assert torch.isnan(bank[20:]).all()
    # fold
    factor, stat = _spd(6, 8, dtype=dtype), _spd(6, 8, dtype=dtype)
    stat[1, 0, 0] = float("nan")
    weight, init = torch.rand(6, dtype=dtype), torch.tensor([True, False] * 3)
    exp_f, exp_i = ref.ema_fold(factor.double(), stat.double(), weight.double(), 0.9, init)
    f, i = factor.to(dev), init.to(dev)
    ops.ema_fold_(f, stat.to(dev), weight.to(dev), 0.9, i, backend="cuda")
    assert rel_err(f, exp_f) < BOUND[dtype] and torch.equal(i.cpu(), exp_i)
    # grouped precondition, more gradients than one launch table holds
    shapes = [(16, 300, 77), (8, 5000, 50), (5, 64, 1000)] * 40
    grads_a = [torch.randn(r, d, dtype=dtype, device=dev) for r, d, _ in shapes]
    grads_b = [torch.randn(d, r, dtype=dtype, device=dev) for r, _, d in shapes]
    inv_d = torch.randn(len(shapes), 16, 16, dtype=dtype, device=dev)
    inv_h = torch.randn(len(shapes), 16, 16, dtype=dtype, device=dev)
    new_a, new_b, exp_dot = ref.precondition(
        [g.cpu() for g in grads_a], [g.cpu() for g in grads_b], inv_d.cpu(), inv_h.cpu()
    )
    dot = ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend="cuda")
    for got, exp in zip(grads_a + grads_b, new_a + new_b):
        assert rel_err(got, exp) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert abs(dot.item() - exp_dot.item()) <= 1e-4 * abs(exp_dot.item()) + 1e-3


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_precondition_bf16_and_graph_capture(fresh_seed):
    dev = "cuda"
    grads_a = [torch.randn(16, 4096, device=dev).bfloat16() for _ in range(3)]
    grads_b = [torch.randn(1024, 16, device=dev).bfloat16() for _ in range(3)]
    inv = torch.randn(3, 16, 16, device=dev)
    new_a, new_b, _ = ref.precondition(
        [g.cpu() for g in grads_a], [g.cpu() for g in grads_b], inv.cpu(), inv.cpu()
    )
    ops.precondition_(grads_a, grads_b, inv, inv, backend="cuda")
    for got, exp in zip(grads_a + grads_b, new_a + new_b):
        assert rel_err(got, exp) < 1e-2
    # captured once, replayed: same result as eager on fresh data
    ga, gb = [torch.randn(16, 512, device=dev)], [torch.randn(256, 16, device=dev)]
    eager_a, eager_b = [g.clone() for g in ga], [g.clone() for g in gb]
    ops.precondition_(eager_a, eager_b, inv[:1], inv[:1], backend="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    work_a, work_b = [torch.empty_like(ga[0])], [torch.empty_like(gb[0])]
    with torch.cuda.graph(graph):
        ops.precondition_(work_a, work_b, inv[:1], inv[:1], compute_dot=True, backend="cuda")
    work_a[0].copy_(ga[0])
    work_b[0].copy_(gb[0])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(work_a[0], eager_a[0]) and torch.equal(work_b[0], eager_b[0])


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_ops_refuse_tensors_on_another_device(fresh_seed):
    """A CPU tensor among an op's CUDA tensors is refused before anything is launched (it used to reach a
    kernel as a host pointer: an illegal address that breaks every later CUDA call of the process)."""
    dev, cpp = "cuda", torch.ops.grit_kernels_cpp
    M, r = 100, 16  # > 96 gradients per launch table: the old code launched a first batch before the check
    grads_a = [torch.randn(r, 64, device=dev) for _ in range(M)]
    grads_b = [torch.randn(32, r, device=dev) for _ in range(M - 1)] + [torch.randn(32, r)]  # the last on the CPU
    inv = torch.eye(r, device=dev).repeat(M, 1, 1) * 2
    before = [g.clone() for g in grads_a + grads_b]
    with pytest.raises(RuntimeError, match="lora_B gradient 99 is on cpu"):
        cpp.precondition_(grads_a, grads_b, inv, inv, False)
    torch.cuda.synchronize()
    assert all(torch.equal(g, b) for g, b in zip(grads_a + grads_b, before))  # nothing was preconditioned
    with pytest.raises(RuntimeError, match="ranks is on cpu"):
        cpp.damped_cholesky_inverse(inv, 1e-3, 1e-12, torch.full((M,), r), None, None, 100.0)
    with pytest.raises(RuntimeError, match="previous must be floating point and shaped like mats"):
        ranks = torch.full((M,), r, device=dev)
        cpp.damped_cholesky_inverse(inv, 1e-3, 1e-12, ranks, inv[:1], torch.ones(1, dtype=torch.bool, device=dev), 100.0)
    with pytest.raises(RuntimeError, match="x is on cpu"):
        cpp.accumulate_gram_(torch.zeros(r, r, device=dev), torch.randn(8, r), 1.0)
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        cpp.ema_fold_(inv.clone(), inv, torch.ones(M), 0.9, torch.zeros(M, dtype=torch.bool, device=dev))
    # the context is intact: the same op on valid tensors works and matches the oracle
    grads_b[-1] = grads_b[-1].to(dev)
    cpp.precondition_(grads_a, grads_b, inv, inv, False)
    assert torch.equal(grads_a[0], 2 * before[0]) and torch.equal(grads_b[-1], 2 * before[-1].to(dev))
