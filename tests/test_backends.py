"""The whole preconditioner step gives the same result with the Triton kernels (CPU interpreter here,
CUDA on a GPU) as with the torch backend."""

import copy

import pytest
import torch
from conftest import rel_err
from helpers import two_layer_lora

from grit_kernels import GritConfig, GritOptimizer, GritPreconditioner, ops

pytestmark = pytest.mark.skipif(
    not ops.triton_available() or not (ops.interpreter_active() or torch.cuda.is_available()),
    reason="needs triton with a GPU or TRITON_INTERPRET=1",
)


def run(model, backend, steps=4):
    pre = GritPreconditioner(model, GritConfig(backend=backend, warmup_steps=1, update_freq=2))
    opt = GritOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), pre)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, t = torch.randn(33, 7, generator=gen), torch.randn(33, 5, generator=gen)
        (0.5 * ((model(x) - t) ** 2).sum(-1).mean()).backward()
        opt.step()
        opt.zero_grad()
    return pre


def test_triton_backend_matches_torch_backend(fresh_seed):
    model = two_layer_lora(r=4, seed=fresh_seed % 1000)
    twin = copy.deepcopy(model)
    ref, got = run(model, "torch"), run(twin, "triton")
    assert got.backend == "triton"
    assert rel_err(got.bank.factor, ref.bank.factor) < 1e-5
    assert rel_err(got.bank.inverse, ref.bank.inverse) < 1e-4
    assert torch.equal(got.bank.status, ref.bank.status)
    assert max(rel_err(a, b) for a, b in zip(got.parameters(), ref.parameters())) < 1e-5


# ------------------------------------------------------------------ op contract on every backend

BACKEND_NAMES = ["torch"] + (["triton"] if ops.triton_available() and (ops.interpreter_active() or torch.cuda.is_available()) else [])


def _spd(n, r):
    a = torch.randn(n, r, r, dtype=torch.float64)
    return (a @ a.transpose(1, 2) / r + torch.eye(r, dtype=torch.float64)).float()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precondition_module_index_and_cpu_chunks(fresh_seed, backend, dtype):
    """``modules=`` picks bank rows (some modules without gradients); CPU gradients larger than a chunk,
    mixed ranks and strided rows give the oracle's result."""
    from grit_kernels import reference
    from grit_kernels.ops import precondition as op_module

    R, n = 8, 5
    inv_d, inv_h = _spd(n, R), _spd(n, R)
    modules = [4, 1, 2]
    d_big = op_module.CPU_CHUNK_ELEMENTS // 8 + 37  # two chunks and a remainder on the CPU path
    grads_a = [torch.randn(8, d_big).to(dtype), torch.randn(3, 50).to(dtype), torch.randn(8, 40 + 3).to(dtype)[:, 3:]]
    grads_b = [torch.randn(d_big, 8).to(dtype), torch.randn(20, 3).to(dtype), torch.randn(30, 8).to(dtype)]
    ref_a, ref_b, ref_dot = reference.precondition(
        [g.double() for g in grads_a], [g.double() for g in grads_b], inv_d[modules].double(), inv_h[modules].double()
    )
    dot = ops.precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=True, backend=backend, modules=modules)
    bound = 2e-6 if dtype == torch.float32 else 1e-2
    assert max(rel_err(g, r) for g, r in zip(grads_a + grads_b, ref_a + ref_b)) < bound
    assert abs(float(dot) - float(ref_dot)) < (1e-5 if dtype == torch.float32 else 1e-2) * abs(float(ref_dot))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_precondition_refuses_bad_ranks_and_indices(backend):
    eye = torch.eye(4).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="rank 6 but the inverses are 4 x 4"):
        ops.precondition_([torch.randn(6, 3)], [torch.randn(5, 6)], eye, eye, backend=backend)
    with pytest.raises(ValueError, match="must be \\[r, d_in\\] and \\[d_out, r\\]"):
        ops.precondition_([torch.randn(4, 3)], [torch.randn(5, 3)], eye, eye, backend=backend)
    with pytest.raises(ValueError, match="module indices must be in"):
        ops.precondition_([torch.randn(4, 3)], [torch.randn(5, 4)], eye, eye, backend=backend, modules=[2])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_grams_grouped_matches_reference(fresh_seed, backend):
    from grit_kernels import reference

    outs = [torch.randn(4, 4), torch.randn(6, 7)[:3, 1:4], torch.randn(2, 2)]
    xs = [torch.randn(11, 4), torch.randn(2, 5, 3).half(), torch.zeros(0, 2)]
    expected = reference.accumulate_grams([o.double() for o in outs], [x.double() for x in xs], 0.25)
    ops.accumulate_grams_(outs, xs, 0.25, backend=backend)
    assert max(rel_err(o, e) for o, e in zip(outs, expected)) < 2e-6


# The GPU script's CPU-side logic (plan, deadline, stubs, the no-CUDA abort): tests/test_run_gpu_all.py
