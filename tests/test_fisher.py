"""GritConfig(fisher=...): "kfac_full" against explicitly built Kronecker K-FAC and its reduction to
"kfac"; "diagonal" against a float64 reference."""

import helpers
import pytest
import torch
from helpers import small_llama

import grit_kernels as gk

D_IN, D_OUT, RANK, ROWS = 5, 4, 3, 64


def one_layer_lora(seed):
    return helpers.one_layer_lora(seed, D_IN, D_OUT, RANK)


def weights(model):
    layer = model.base_model.model.fc
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]


def config(fisher, **kw):
    # graft=False: the exact preconditioned gradients (grafting rescales each tensor to the raw norm)
    return gk.GritConfig(fisher=fisher, warmup_steps=0, update_freq=1, kl_clip=None, backend="torch", graft=False, **kw)


def backward_linear_loss(model, x, w):
    """loss = sum_t <y_t, w_t> / N: dL/dy_t = w_t / N, independent of the weights."""
    (model(x) * w).sum().div(x.shape[0]).backward()


def damped(c, damping, eps_abs):
    return c + (damping * torch.trace(c) / c.shape[0] + eps_abs) * torch.eye(c.shape[0], dtype=c.dtype)


def test_kfac_full_equals_explicit_kronecker_kfac(fresh_seed):
    damping, eps_abs = 1e-2, 1e-8
    model = one_layer_lora(fresh_seed)
    pre = gk.GritPreconditioner(model, config("kfac_full", damping=damping, eps_abs=eps_abs))
    x, w = torch.randn(ROWS, D_IN), torch.randn(ROWS, D_OUT)
    backward_linear_loss(model, x, w)
    A, B, s = weights(model)
    grad_a, grad_b = A.grad.double().clone(), B.grad.double().clone()
    pre.step()
    # the Kronecker factors, built by hand in float64
    x64, A64, B64, g = x.double(), A.detach().double(), B.detach().double(), w.double() / ROWS
    h = x64 @ A64.T
    delta = s * g @ B64
    X, H = x64.T @ x64 / ROWS, h.T @ h / ROWS
    D, G = ROWS * delta.T @ delta, ROWS * g.T @ g
    F_A = torch.kron(damped(D, damping, eps_abs), damped(X, damping, eps_abs))
    F_B = torch.kron(damped(G, damping, eps_abs), damped(H, damping, eps_abs))
    ref_a = torch.linalg.solve(F_A, grad_a.reshape(-1)).reshape(RANK, D_IN)  # row-major vec
    ref_b = torch.linalg.solve(F_B, grad_b.reshape(-1)).reshape(D_OUT, RANK)
    for out, ref in ((A.grad, ref_a), (B.grad, ref_b)):
        assert (out.double() - ref).norm() / ref.norm() < 1e-4


def test_kfac_full_reduces_to_kfac_with_identity_input_and_output_covariances(fresh_seed):
    """x with E[x x^T] = I and dL/dy with E[g g^T] (per-token Fisher scale) = I: X = G = I, so the full
    K-FAC step is the rank-space one (damping -> 0)."""
    gen = torch.Generator().manual_seed(fresh_seed)
    x = ROWS**0.5 * torch.linalg.qr(torch.randn(ROWS, D_IN, generator=gen, dtype=torch.float64))[0]
    w = ROWS**0.5 * torch.linalg.qr(torch.randn(ROWS, D_OUT, generator=gen, dtype=torch.float64))[0]
    grads = {}
    for fisher in ("kfac", "kfac_full"):
        model = one_layer_lora(fresh_seed)
        pre = gk.GritPreconditioner(model, config(fisher, damping=0.0, eps_abs=1e-6))
        backward_linear_loss(model, x.float(), w.float())
        pre.step()
        A, B, _ = weights(model)
        grads[fisher] = (A.grad.clone(), B.grad.clone())
        if fisher == "kfac_full":
            full = pre._fisher
            assert (full.input_factor[0] - torch.eye(D_IN)).abs().max() < 1e-5
            assert (full.output_factor[0] - torch.eye(D_OUT)).abs().max() < 1e-5
    for a, b in zip(grads["kfac"], grads["kfac_full"]):
        assert (a - b).norm() / a.norm() < 1e-4


def test_kfac_full_refuses_large_models_with_the_memory_it_needs():
    model = small_llama(num_layers=1, r=4)
    with pytest.raises(ValueError, match=r"would need [0-9.]+ MiB"):
        gk.GritPreconditioner(model, gk.GritConfig(fisher="kfac_full", kfac_full_max_bytes=10_000))


def test_diagonal_matches_reference(fresh_seed):
    damping, eps_abs, beta = 1e-2, 1e-10, 0.9
    model = one_layer_lora(fresh_seed)
    pre = gk.GritPreconditioner(model, config("diagonal", damping=damping, eps_abs=eps_abs, ema_decay=beta))
    A, B, _ = weights(model)
    second = None
    for _ in range(3):
        backward_linear_loss(model, torch.randn(ROWS, D_IN), torch.randn(ROWS, D_OUT))
        raw = [A.grad.double().clone(), B.grad.double().clone()]
        pre.step()
        squares = [g * g for g in raw]
        second = squares if second is None else [beta * v + (1 - beta) * s for v, s in zip(second, squares)]
        for p, g, v in zip((A, B), raw, second):
            ref = g / (v + damping * v.mean() + eps_abs)
            assert (p.grad.double() - ref).norm() / ref.norm() < 1e-5
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fisher", ["diagonal", "kfac_full"])
def test_fisher_options_train_a_small_llama(fisher):
    model = small_llama(num_layers=1, r=4)
    pre = gk.GritPreconditioner(model, gk.GritConfig(fisher=fisher, warmup_steps=1, update_freq=2))
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    ids = torch.randint(0, 512, (2, 8))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and pre.step_count == 3
    assert all(torch.isfinite(p).all() for p in pre.parameters())
    pre.remove()
    if fisher == "kfac_full":
        assert pre._fisher._handles == []
