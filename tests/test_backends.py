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
