"""torch.compile: the public ops are torch.library custom ops (namespace ``grit_kernels``) with fake
implementations, and a compiled GRIT step gives the adapters of the eager one (CPU, torch backend)."""

import copy

import pytest
import torch
from conftest import rel_err
from helpers import small_llama, two_layer_lora
from torch._dynamo.backends.debugging import ExplainWithBackend
from torch._dynamo.utils import counters

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
        "accumulate_grams_": (
            [torch.zeros(r, r), torch.zeros(2, 2)],
            [torch.randn(9, r), torch.randn(5, 2)],
            0.5,
            "torch",
        ),
        "ema_fold_": (
            _spd(n, r),
            _spd(n, r),
            torch.rand(n) + 0.1,
            0.9,
            torch.tensor([True, False, True]),
            "torch",
        ),
        "damped_cholesky_inverse": (
            _spd(n, r),
            1e-3,
            1e-12,
            torch.tensor([4, 2, 3], dtype=torch.int32),
            torch.eye(r).repeat(n, 1, 1),
            torch.tensor([True, False, True]),
            100.0,
            "torch",
        ),
        "precondition_": (
            [torch.randn(r, 6), torch.randn(r, 5)],
            [torch.randn(7, r), torch.randn(3, r)],
            _spd(2, r),
            _spd(2, r),
            True,
            "torch",
        ),
    }
    for name, args in checks.items():
        torch.library.opcheck(
            getattr(LIB, name),
            args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )


def _train(model, steps, compiled):
    cfg = gk.GritConfig(
        backend="torch", warmup_steps=1, update_freq=2, nonfinite_grads="ignore", kl_clip=1e-2
    )
    pre = gk.GritPreconditioner(model, cfg)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
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
    assert compiled.step_count == 4 and compiled.bank.refresh_count == eager.bank.refresh_count >= 2
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


def _train_llama(model, steps, compiled, fused):
    cfg = gk.GritConfig(
        backend="torch", warmup_steps=1, update_freq=2, nonfinite_grads="ignore", kl_clip=1e-2
    )
    pre = gk.GritPreconditioner(model, cfg)
    if fused:
        assert len(gk.fuse(model).fused_blocks) == 2
    opt = gk.GritOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), pre)
    # fullgraph=True: any graph break -- in our capture (layers.py, fused/) or elsewhere -- raises
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    # torch.optim's own step graph-breaks on purpose (Optimizer._use_grad): record the breaks instead
    step = torch.compile(opt.step, backend=compiled) if compiled else opt.step
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 9), generator=gen)
        labels = ids.clone()
        labels[0, :4] = -100  # rows without gradient: the capture's row mask must agree with eager
        forward(input_ids=ids, labels=labels).loss.backward()
        step()
        opt.zero_grad()
    return pre


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fused", [False, True], ids=["patched", "fused"])
def test_compiled_llama_training_step_has_no_graph_break(fresh_seed, fused):
    """A compiled PEFT LoRA Llama traces as one graph with the statistics capture inside its backward
    (plain patched layers and fused blocks); a compiled GritOptimizer.step breaks only in torch.optim;
    both give the eager factors and adapters."""
    torch._dynamo.reset()
    model = small_llama(num_layers=2, seed=fresh_seed % 1000)
    twin = copy.deepcopy(model)
    explain = ExplainWithBackend("aot_eager")
    counters.clear()
    eager, compiled = _train_llama(model, 3, None, fused), _train_llama(twin, 3, explain, fused)
    # every kind of break dynamo counted has a located instance (no frame silently skipped), and the
    # frame each happens in is not ours (today: only torch.optim's deliberate breaks around its step)
    assert set(counters["graph_break"]) <= {b.reason for b in explain.break_reasons}
    where = [f"{b.user_stack[-1].filename}:{b.user_stack[-1].lineno}" for b in explain.break_reasons]
    assert not [w for w in where if "grit_kernels" in w], where
    assert compiled.step_count == 3 and compiled.bank.refresh_count == eager.bank.refresh_count >= 2
    assert torch.equal(compiled.bank.initialized, eager.bank.initialized) and bool(
        eager.bank.initialized.all()
    )
    assert rel_err(compiled.bank.factor, eager.bank.factor) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(compiled.parameters(), eager.parameters())) < 1e-5
