"""Properties of the GRIT math (docs/design.md §2): pairing, reparametrisation invariance, equality with
explicit dense K-FAC, and invariance of the factors to bookkeeping."""

import copy

import pytest
import torch
from conftest import rel_err
from helpers import lora_pairs, small_llama, two_layer_lora

from grit_kernels import GritConfig, GritPreconditioner
from grit_kernels.bank import BACKWARD, FORWARD

# the natural-gradient step itself: grafting (a per-tensor norm taken from the raw gradient) trades the
# reparametrisation invariance for stability from PEFT's B = 0 (GritConfig.graft); these properties hold without it
EXACT = dict(warmup_steps=0, update_freq=1, backend="torch", graft=False)


def preconditioned_update(model, x, target, cfg, lr=0.1):
    """One GRIT step's first-order update s(B dA + dB A) per LoRA module (SGD, dA = -lr * P grad_A)."""
    pre = GritPreconditioner(model, cfg)
    loss = 0.5 * ((model(x) - target) ** 2).sum(dim=-1).mean()
    loss.backward()
    pre.step(lr=lr)
    updates = [s * (b @ (-lr * a.grad) + (-lr * b.grad) @ a) for a, b, s in lora_pairs(model)]
    return updates, pre


def reparametrise(model, qs):
    """(A, B) -> (Q A, B Q^-1) in every LoRA module, in place."""
    with torch.no_grad():
        for (a, b, _), q in zip(lora_pairs(model), qs):
            a.copy_(q @ a)
            b.copy_(b @ torch.linalg.inv(q))


def invariance_case(fresh_seed, make_q, damping):
    model = two_layer_lora(r=3, seed=fresh_seed % 1000).double()
    other = copy.deepcopy(model)
    qs = [make_q(a.shape[0]) for a, _, _ in lora_pairs(model)]
    reparametrise(other, qs)
    x, t = torch.randn(64, 7, dtype=torch.float64), torch.randn(64, 5, dtype=torch.float64)
    cfg = GritConfig(damping=damping, eps_abs=1e-30, **EXACT)
    ref, _ = preconditioned_update(model, x, t, cfg)
    got, _ = preconditioned_update(other, x, t, cfg)
    return max(rel_err(g, r) for g, r in zip(got, ref))


def fp32_bank_bound(r, damping):
    """Exact in real arithmetic; the bank and its inverses are fp32 (docs/design.md §2), so the update is
    off by at most cond(C + lam I) * eps32, and cond <= 1 + r / damping with lam = damping * tr(C) / r.
    (Observed over 200 seeds: median 8e-7, max 1.1e-5; the swapped pairing is off by > 10.)"""
    return (1 + r / damping) * torch.finfo(torch.float32).eps


def test_invariant_to_scaling(fresh_seed):
    err = invariance_case(fresh_seed, lambda r: 7.3 * torch.eye(r, dtype=torch.float64), 1e-3)
    assert err < fp32_bank_bound(3, 1e-3)


def test_invariant_to_rotation(fresh_seed):
    rotation = lambda r: torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))[0]
    assert invariance_case(fresh_seed, rotation, 1e-3) < fp32_bank_bound(3, 1e-3)


def test_invariant_to_general_invertible_q_as_damping_vanishes(fresh_seed):
    general = lambda r: torch.eye(r, dtype=torch.float64) + 0.4 * torch.randn(r, r, dtype=torch.float64)
    assert invariance_case(fresh_seed, general, 1e-7) < 1e-3


def test_swapped_pairing_is_not_invariant(fresh_seed):
    """The published pairing (A with H, B with D) changes the update by orders of magnitude."""
    def swapped_update(model):
        pre = GritPreconditioner(model, GritConfig(**EXACT))
        loss = 0.5 * ((model(x) - t) ** 2).sum(dim=-1).mean()
        loss.backward()
        pre.step()  # folds and inverts; grads now preconditioned the right way: recompute them raw
        model.zero_grad()
        pre.bank.reset_accumulators()
        (0.5 * ((model(x) - t) ** 2).sum(dim=-1).mean()).backward()
        out = []
        for i, (a, b, s) in enumerate(lora_pairs(model)):
            r = a.shape[0]
            inv_h = pre.bank.inverse[FORWARD, i, :r, :r].double()
            inv_d = pre.bank.inverse[BACKWARD, i, :r, :r].double()
            out.append(s * (b @ (-(inv_h @ a.grad)) + (-(b.grad @ inv_d)) @ a))
        return out

    model = two_layer_lora(r=3, seed=1).double()
    other = copy.deepcopy(model)
    reparametrise(other, [20.0 * torch.eye(3, dtype=torch.float64)] * 2)
    x, t = torch.randn(64, 7, dtype=torch.float64), torch.randn(64, 5, dtype=torch.float64)
    ref, got = swapped_update(model), swapped_update(other)
    assert max(rel_err(g, r) for g, r in zip(got, ref)) > 10.0


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_equals_explicit_dense_kfac(fresh_seed, use_rslora):
    """Rank-space K-FAC == dense K-FAC with Kronecker factors I (x) (D + lam I) and (H + lam I) (x) I."""
    model = two_layer_lora(r=3, seed=fresh_seed % 1000, use_rslora=use_rslora).double()
    layer = model.base_model.model.fc2
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    assert s == (6 / 3**0.5 if use_rslora else 2.0)  # alpha / sqrt(r) with rsLoRA, alpha / r without
    x, t = torch.randn(50, 7, dtype=torch.float64), torch.randn(50, 5, dtype=torch.float64)
    n = x.shape[0]
    damping = 1e-2
    with torch.no_grad():  # everything by hand for fc2
        z = torch.tanh(model.base_model.model.fc1(x))
        h = z @ a.T
        y = model(x)
        dl_dy = (y - t) / n  # loss = 0.5 * sum_j ||y_t - target_t||^2 / n
        delta = s * dl_dy @ b
        grad_a = delta.T @ z
        grad_b = s * dl_dy.T @ h
        H = h.T @ h / n
        D = n * delta.T @ delta
        r, d_in, d_out = 3, z.shape[1], y.shape[1]
        lam_h, lam_d = damping * H.trace() / r, damping * D.trace() / r
        fisher_a = torch.kron(torch.eye(d_in, dtype=torch.float64), D + lam_d * torch.eye(r, dtype=torch.float64))
        fisher_b = torch.kron(H + lam_h * torch.eye(r, dtype=torch.float64), torch.eye(d_out, dtype=torch.float64))
        vec = lambda m: m.T.reshape(-1)
        unvec = lambda v, rows, cols: v.reshape(cols, rows).T
        expected_a = unvec(torch.linalg.solve(fisher_a, vec(grad_a)), r, d_in)
        expected_b = unvec(torch.linalg.solve(fisher_b, vec(grad_b)), d_out, r)

    pre = GritPreconditioner(model, GritConfig(damping=damping, eps_abs=0.0, kl_clip=None, **EXACT))
    (0.5 * ((model(x) - t) ** 2).sum(dim=-1).mean()).backward()
    assert rel_err(a.grad, grad_a) < 1e-10 and rel_err(b.grad, grad_b) < 1e-10  # the hand derivation
    pre.step()
    i = [m.name for m in pre.modules].index(next(m.name for m in pre.modules if m.name.endswith("fc2")))
    assert rel_err(pre.bank.factor[FORWARD, i], H) < 1e-6
    assert rel_err(pre.bank.factor[BACKWARD, i], D) < 1e-6
    assert rel_err(a.grad, expected_a) < 1e-5
    assert rel_err(b.grad, expected_b) < 1e-5


# ---------------------------------------------------------------- bookkeeping invariances on a tiny Llama
def llama_step(micro_batches, loss_scale=1.0, checkpointing=None):
    """Factors and preconditioned grads after one optimizer step over ``micro_batches`` (mean loss each,
    divided by their count, as Trainer's gradient accumulation does)."""
    model = small_llama(num_layers=2, seed=3)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    pre = GritPreconditioner(model, GritConfig(**EXACT))
    for ids in micro_batches:
        loss = model(input_ids=ids, labels=ids).loss / len(micro_batches)
        (loss * loss_scale).backward()
    if loss_scale != 1.0:  # what GradScaler.unscale_ does before optimizer.step
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(loss_scale)
    pre.step(lr=1e-3, loss_scale=loss_scale if loss_scale != 1.0 else None)
    grads = [p.grad.clone() for p in pre.parameters()]
    return pre.bank.factor.clone(), grads


@pytest.fixture(scope="module")
def llama_reference():
    torch.manual_seed(11)
    ids = torch.randint(0, 512, (8, 24))
    return ids, llama_step([ids])


def assert_same_step(got, ref, tol=1e-5):
    assert rel_err(got[0][FORWARD], ref[0][FORWARD]) < tol
    assert rel_err(got[0][BACKWARD], ref[0][BACKWARD]) < tol
    assert max(rel_err(g, r) for g, r in zip(got[1], ref[1])) < 10 * tol


def test_factors_invariant_to_accumulation_split(llama_reference):
    ids, ref = llama_reference
    assert_same_step(llama_step(list(ids.split(2))), ref)


def test_factors_invariant_to_batch_duplication(llama_reference):
    ids, ref = llama_reference
    assert_same_step(llama_step([torch.cat([ids, ids])]), ref)


def test_factors_invariant_to_loss_scale(llama_reference):
    ids, ref = llama_reference
    assert_same_step(llama_step([ids], loss_scale=2.0**14), ref)


@pytest.mark.parametrize("reentrant", [True, False])
def test_factors_counted_once_under_activation_checkpointing(llama_reference, reentrant):
    ids, ref = llama_reference
    assert_same_step(llama_step([ids], checkpointing=reentrant), ref)
