"""torch.compile: the public ops are torch.library custom ops (namespace ``grit_kernels``) with fake
implementations, and a compiled GRIT step gives the adapters of the eager one (CPU, torch backend)."""

import copy

import pytest
import torch
from conftest import rel_err
from helpers import two_layer_lora

import grit_kernels as gk
from grit_kernels import ops

LIB = torch.ops.grit_kernels


def _spd(n, r):
    a = torch.randn(n, r, r)
    return a @ a.transpose(1, 2) / r + torch.eye(r)


def test_custom_ops_pass_opcheck(fresh_seed):
    """Schemas, mutation annotations and fake implementations agree with the real kernels."""
    r, n = 4, 3
    checks = {
        "accumulate_gram_": (torch.zeros(r, r), torch.randn(9, r), 0.5, "torch"),
        "accumulate_grams_": ([torch.zeros(r, r), torch.zeros(2, 2)], [torch.randn(9, r), torch.randn(5, 2)], 0.5, "torch"),
        "ema_fold_": (_spd(n, r), _spd(n, r), torch.rand(n) + 0.1, 0.9, torch.tensor([True, False, True]), "torch"),
        "damped_cholesky_inverse": (
            _spd(n, r), 1e-3, 1e-12, torch.tensor([4, 2, 3], dtype=torch.int32), torch.eye(r).repeat(n, 1, 1),
            torch.tensor([True, False, True]), 100.0, "torch",
        ),
        "precondition_": ([torch.randn(r, 6), torch.randn(r, 5)], [torch.randn(7, r), torch.randn(3, r)], _spd(2, r), _spd(2, r), True, "torch"),
    }
    for name, args in checks.items():
        torch.library.opcheck(getattr(LIB, name), args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _train(model, steps, compiled):
    cfg = gk.GritConfig(backend="torch", warmup_steps=1, update_freq=2, nonfinite_grads="ignore", kl_clip=1e-2)
    pre = gk.GritPreconditioner(model, cfg)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    # our whole step -- EMA fold, batched inversion, grouped preconditioning, KL-clip -- in one graph:
    # fullgraph=True fails on any graph break
    grit_step = torch.compile(pre.step, backend="aot_eager", fullgraph=True) if compiled else pre.step
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, t = torch.randn(33, 7, generator=gen), torch.randn(33, 5, generator=gen)
        (0.5 * ((forward(x) - t) ** 2).sum(-1).mean()).backward()
        grit_step(lr=0.05)
        inner.step()
        inner.zero_grad()
    return pre


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_training_step_matches_eager(fresh_seed):
    torch._dynamo.reset()
    model = two_layer_lora(r=4, seed=fresh_seed % 1000)
    twin = copy.deepcopy(model)
    eager, compiled = _train(model, 4, compiled=False), _train(twin, 4, compiled=True)
    assert compiled.step_count == 4 and compiled.bank.refresh_count == eager.bank.refresh_count == 2
    assert rel_err(compiled.bank.factor, eager.bank.factor) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(compiled.parameters(), eager.parameters())) < 1e-5


def test_ops_trace_without_graph_breaks(fresh_seed):
    """Each public op, called from a compiled function, is one custom-op node (no graph break)."""
    r, n = 4, 2
    grads_a, grads_b = [torch.randn(r, 6), torch.randn(r, 5)], [torch.randn(7, r), torch.randn(3, r)]
    factor, stats, init = _spd(2 * n, r), _spd(2 * n, r), torch.zeros(2 * n, dtype=torch.bool)

    def step(factor, stats, init, x):
        ops.accumulate_grams_([stats[0], stats[1]], [x, 2 * x], 0.5, backend="torch")
        ops.accumulate_gram_(stats[2], x, 1.0, backend="torch")
        ops.ema_fold_(factor, stats, torch.ones(2 * n), 0.9, init, backend="torch")
        inv, status = ops.damped_cholesky_inverse(factor, 1e-3, backend="torch")
        dot = ops.precondition_(grads_a, grads_b, inv[:n], inv[n:], compute_dot=True, backend="torch")
        return inv, status, dot

    x = torch.randn(10, r)
    explanation = torch._dynamo.explain(step)(factor.clone(), stats.clone(), init.clone(), x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ref_a, ref_b = [g.clone() for g in grads_a], [g.clone() for g in grads_b]
    f_ref, s_ref, i_ref = factor.clone(), stats.clone(), init.clone()
    inv_e, status_e, dot_e = step(f_ref, s_ref, i_ref, x)
    got_a, got_b = grads_a, grads_b
    grads_a, grads_b = [g.clone() for g in ref_a], [g.clone() for g in ref_b]  # the compiled run's inputs
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    inv_c, status_c, dot_c = compiled(factor, stats, init, x)
    assert torch.equal(status_c, status_e) and rel_err(inv_c, inv_e) < 1e-6 and rel_err(dot_c, dot_e) < 1e-6
    assert rel_err(factor, f_ref) < 1e-6 and torch.equal(init, i_ref)
    assert max(rel_err(a, b) for a, b in zip(grads_a + grads_b, got_a + got_b)) < 1e-6
