"""GritConfig(fisher=...): "kfac_full" against explicitly built Kronecker K-FAC and its reduction to
"kfac"; "diagonal" and "kfac_lowrank" against float64 references."""

import helpers
import pytest
import torch
from helpers import small_llama

import grit_kernels as gk
from grit_kernels import reference
from grit_kernels.fisher import nystrom_eigenpairs, sketch_test_matrix

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


@pytest.mark.parametrize("fisher", ["diagonal", "kfac_full", "kfac_lowrank"])
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
    if fisher != "diagonal":
        assert pre._fisher._handles == []


# ---------------------------------------------------------------------------- fisher="kfac_lowrank"
def psd_with_decaying_spectrum(d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    values = torch.rand(d, generator=gen, dtype=torch.float64) * torch.logspace(2, -2, d, dtype=torch.float64)
    return q @ torch.diag(values) @ q.T


def test_nystrom_eigenpairs_match_the_reference_approximation(fresh_seed):
    d, m, k = 40, 12, 6
    c = psd_with_decaying_spectrum(d, fresh_seed)
    test = sketch_test_matrix(d, m).double()
    values, vectors = nystrom_eigenpairs((c @ test).float(), test.float(), k)
    ref_values, ref_vectors = torch.linalg.eigh(reference.nystrom_approximation(c, test))
    ref_values, ref_vectors = ref_values.flip(0)[:k], ref_vectors.flip(1)[:, :k]
    assert values.shape == (k,) and vectors.shape == (d, k)
    assert (values.double() - ref_values).norm() / ref_values.norm() < 1e-5
    vectors = vectors.double()
    projector = vectors @ vectors.T
    assert (projector - ref_vectors @ ref_vectors.T).norm() / k**0.5 < 1e-3
    assert (vectors.T @ vectors.double() - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-5  # fp32 math


def test_nystrom_with_a_full_sketch_is_the_eigendecomposition(fresh_seed):
    d, k = 16, 5
    c = psd_with_decaying_spectrum(d, fresh_seed)
    test = sketch_test_matrix(d, d).double()
    values, _ = nystrom_eigenpairs(c @ test, test, k)
    exact = torch.linalg.eigvalsh(c).flip(0)[:k]
    assert (values.double() - exact).norm() / exact.norm() < 1e-5  # float32 math


def lowrank_config(**kw):
    return config("kfac_lowrank", **kw)


def test_kfac_lowrank_step_matches_the_reference(fresh_seed):
    """Three steps with EMA: the preconditioned grads equal ``(D + lam)^-1 grad_A Xinv`` and
    ``Ginv grad_B (H + lam)^-1`` with ``Xinv``/``Ginv`` from reference.low_rank_damped_inverse of the Nystrom
    approximation of the float64 EMA factors."""
    d_in, d_out, rank, m, k = 12, 10, 3, 6, 3
    damping, eps_abs, beta = 1e-2, 1e-8, 0.9
    model = helpers.one_layer_lora(fresh_seed, d_in, d_out, rank)
    cfg = lowrank_config(damping=damping, eps_abs=eps_abs, ema_decay=beta, large_factor_rank=k, large_factor_sketch=m)
    pre = gk.GritPreconditioner(model, cfg)
    A, B, s = weights(model)
    x_factor = g_factor = d_factor = h_factor = None
    ema = lambda old, new: new if old is None else beta * old + (1 - beta) * new
    for _ in range(3):
        x, w = torch.randn(ROWS, d_in) * torch.linspace(0.2, 3.0, d_in), torch.randn(ROWS, d_out)
        backward_linear_loss(model, x, w)
        grad_a, grad_b = A.grad.double().clone(), B.grad.double().clone()
        x64, g = x.double(), w.double() / ROWS
        h, delta = x64 @ A.detach().double().T, s * g @ B.detach().double()
        x_factor, g_factor = ema(x_factor, x64.T @ x64 / ROWS), ema(g_factor, ROWS * g.T @ g)
        d_factor, h_factor = ema(d_factor, ROWS * delta.T @ delta), ema(h_factor, h.T @ h / ROWS)
        pre.step()
        inverses = []
        for c in (x_factor, g_factor):
            test = sketch_test_matrix(c.shape[0], m).double()
            approx = reference.nystrom_approximation(c, test)
            inverses.append(reference.low_rank_damped_inverse(approx, torch.trace(c), k, damping, eps_abs))
        ref_a = torch.linalg.inv(damped(d_factor, damping, eps_abs)) @ grad_a @ inverses[0]
        ref_b = inverses[1] @ grad_b @ torch.linalg.inv(damped(h_factor, damping, eps_abs))
        for out, ref in ((A.grad, ref_a), (B.grad, ref_b)):
            assert (out.double() - ref).norm() / ref.norm() < 1e-4
        model.zero_grad(set_to_none=True)


def test_kfac_lowrank_batched_over_widths_matches_the_per_module_reference(fresh_seed):
    """A 2-layer Llama (14 modules of three input and three output widths, q/k/v and gate/up sharing their
    input): every module's preconditioned grads equal the float64 reference built from its own ``x`` and ``g``
    (caught by the test's own hooks), so the batched fold/refresh/precondition pick each module's state."""
    damping, eps_abs, k = 1e-2, 1e-8, 4
    model = small_llama(num_layers=2, seed=fresh_seed % 1000)
    pre = gk.GritPreconditioner(model, config("kfac_lowrank", damping=damping, eps_abs=eps_abs, large_factor_rank=k))
    caught, handles = {}, []

    def catch_x(index):
        def hook(module, args, out):
            caught[("x", index)] = args[0].detach().double()
        return hook

    def catch_g(index, scaling):
        def hook(module, args, out):
            out.register_hook(lambda g: caught.__setitem__(("g", index), g.double() / scaling))
        return hook

    for m in pre.modules:
        handles.append(m.layer.lora_A["default"].register_forward_hook(catch_x(m.index)))
        handles.append(m.layer.lora_B["default"].register_forward_hook(catch_g(m.index, m.layer.scaling["default"])))
    ids = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(fresh_seed))
    model(input_ids=ids, labels=ids).loss.backward()
    raw = [(m.lora_A.grad.double().clone(), m.lora_B.grad.double().clone()) for m in pre.modules]
    pre.step()
    inverse = pre.bank.inverse.double()
    widths = {(d, m) for shapes in (pre._fisher._input_shapes, pre._fisher._output_shapes) for d, m, _ in shapes}
    assert len({d for d, _ in widths}) >= 2
    for m, (grad_a, grad_b) in zip(pre.modules, raw):
        x, g = caught[("x", m.index)].reshape(-1, m.lora_A.shape[1]), caught[("g", m.index)].reshape(-1, m.lora_B.shape[0])
        carries = g.norm(dim=1) > 1e-6 * g.norm(dim=1).max()
        rows = carries.sum()
        factors = [x[carries].T @ x[carries] / rows, rows * g.T @ g]
        large = []
        for c in factors:
            d = c.shape[0]
            test = sketch_test_matrix(d, min(2 * k, d)).double()
            approx = reference.nystrom_approximation(c, test)
            large.append(reference.low_rank_damped_inverse(approx, torch.trace(c), min(k, d - 1), damping, eps_abs))
        r = m.lora_A.shape[0]
        ref_a = inverse[1, m.index, :r, :r] @ grad_a @ large[0]
        ref_b = large[1] @ grad_b @ inverse[0, m.index, :r, :r]
        for out, ref in ((m.lora_A.grad, ref_a), (m.lora_B.grad, ref_b)):  # fp32 Nystrom: up to 2e-4 seen
            assert (out.double() - ref).norm() / ref.norm() < 1e-3, m.index
    for h in handles:
        h.remove()


def test_kfac_lowrank_with_a_full_sketch_equals_kfac_full(fresh_seed):
    """``m = d`` and ``k = d - 1`` (both cut from larger requests): the sketch is exact and nothing is dropped."""
    grads = {}
    for fisher, extra in (("kfac_full", {}), ("kfac_lowrank", {"large_factor_rank": 64, "large_factor_sketch": 64})):
        model = one_layer_lora(fresh_seed)
        pre = gk.GritPreconditioner(model, config(fisher, damping=1e-2, eps_abs=1e-8, **extra))
        gen = torch.Generator().manual_seed(fresh_seed)
        for _ in range(2):
            backward_linear_loss(model, torch.randn(ROWS, D_IN, generator=gen), torch.randn(ROWS, D_OUT, generator=gen))
            pre.step()
            A, B, _ = weights(model)
            grads.setdefault(fisher, []).extend([A.grad.clone(), B.grad.clone()])
            model.zero_grad(set_to_none=True)
    for a, b in zip(grads["kfac_full"], grads["kfac_lowrank"]):
        assert (a - b).norm() / a.norm() < 1e-4


def test_kfac_lowrank_memory_is_linear_in_the_width():
    model = small_llama(num_layers=1, r=4)
    pre = gk.GritPreconditioner(model, gk.GritConfig(fisher="kfac_lowrank", large_factor_rank=4, large_factor_sketch=6))
    low = pre._fisher
    for name in low._STATE_LISTS:
        for t, (d, m, k) in zip(getattr(low, name), getattr(low, "_input_shapes" if "input" in name else "_output_shapes")):
            assert t.numel() <= d * m and (m, k) == (6, 4)
    dims = [(mod.lora_A.shape[1], mod.lora_B.shape[0]) for mod in pre.modules]
    assert low.memory_bytes < 4 * sum(a * a + b * b for a, b in dims)


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
@pytest.mark.parametrize("fisher", ["kfac_full", "kfac_lowrank"])
def test_large_factor_fishers_under_fuse_match_peft(fisher, checkpointing):
    """gk.fuse computes the LoRA layers in fused blocks (no lora_A / lora_B module calls): their backward hands x
    and dL/dy to the large-factor capture, so two GRIT+SGD steps give PEFT's path's factors and adapters."""
    results = {}
    for fused in (False, True):
        model = checkpointed_llama(checkpointing)
        pre = gk.GritPreconditioner(model, gk.GritConfig(fisher=fisher, warmup_steps=0, large_factor_rank=4))
        if fused:
            assert gk.fuse(model).fused_modules == 14
        opt = gk.GritOptimizer(torch.optim.SGD(pre.parameters(), lr=1e-2), pre)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            ids = torch.randint(0, 512, (2, 12), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = pre._fisher.state_dict()
        names = ("input_factor", "output_factor", "input_sketch", "output_sketch", "input_trace", "output_trace")
        results[fused] = ([t for name in names for t in state.get(name, [])], [p.detach().clone() for p in pre.parameters()])
    factors, params = results[False]
    assert len(factors) >= 28 and all(t.abs().max() > 0 for t in factors)
    for a, b in zip(results[True][0], factors):
        assert (a - b).norm() <= 1e-5 * b.norm()
    for a, b in zip(results[True][1], params):
        assert (a - b).norm() <= 1e-4 * b.norm()


def test_large_factor_options_are_validated():
    with pytest.raises(ValueError, match="large_factor_rank"):
        gk.GritConfig(fisher="kfac_lowrank", large_factor_rank=0)
    with pytest.raises(ValueError, match="large_factor_sketch must be an integer >= 8"):
        gk.GritConfig(fisher="kfac_lowrank", large_factor_rank=8, large_factor_sketch=4)


def test_nystrom_eigenpairs_of_a_broken_sketch_are_empty_not_nan():
    """A non-finite or indefinite sketch gives zero eigenpairs (the factor is then isotropic), no NaN."""
    test = sketch_test_matrix(16, 8)
    sketches = torch.stack([torch.full((16, 8), float("nan")), -test, test @ torch.diag(torch.arange(1.0, 9.0))])
    values, vectors = nystrom_eigenpairs(sketches, test, 4)
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()
    assert values[0].abs().max() == 0 and vectors[0].abs().max() == 0
    assert values[1].abs().max() == 0  # indefinite: V^T Y = -I
    assert (values[2].double() - torch.tensor([8.0, 7.0, 6.0, 5.0], dtype=torch.float64)).abs().max() < 1e-4


def checkpointed_llama(mode):
    model = small_llama(num_layers=2, r=4)
    if mode is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        model.enable_input_require_grads()
    return model.train()


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("fisher", ["kfac_full", "kfac_lowrank"])
def test_large_factor_sums_are_counted_once_under_activation_checkpointing(fisher, mode):
    """Two micro-batches (so recomputed inputs never meet another micro-batch's gradient): the same sums on
    both sides with and without checkpointing."""
    sums = {}
    for checkpointing in (None, mode):
        model = checkpointed_llama(checkpointing)
        pre = gk.GritPreconditioner(model, gk.GritConfig(fisher=fisher, warmup_steps=0, large_factor_rank=4))
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            ids = torch.randint(0, 512, (2, 8), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
        state = pre._fisher.state_dict()
        names = ("input_sum", "output_sum", "input_sketch_sum", "output_sketch_sum", "input_trace_sum")
        sums[checkpointing] = [state["rows"]] + [t for name in names for t in state.get(name, [])]
        assert pre._fisher._meeting == {} and pre._fisher._inputs == {}
    assert sums[None][0].sum() > 0 and len(sums[None]) > 28
    for a, b in zip(sums[None], sums[mode]):
        assert (a - b).norm() <= 1e-5 * a.norm()


def test_large_factor_sums_with_two_forwards_and_one_backward_under_checkpointing():
    """Two checkpointed forwards, then one backward of their weighted sum: each recomputed input meets its own
    micro-batch's gradient (the engine runs one graph's nodes before the other's), as without checkpointing."""
    sums = {}
    for mode in (None, "non-reentrant"):
        model = checkpointed_llama(mode)
        pre = gk.GritPreconditioner(model, gk.GritConfig(fisher="kfac_lowrank", warmup_steps=0, large_factor_rank=4))
        gen = torch.Generator().manual_seed(0)
        losses = [model(input_ids=ids, labels=ids).loss for ids in torch.randint(0, 512, (2, 2, 8), generator=gen)]
        (losses[0] + 3.0 * losses[1]).backward()
        state = pre._fisher.state_dict()
        sums[mode] = [t for name in ("input_sketch_sum", "output_sketch_sum") for t in state[name]]
    for a, b in zip(sums[None], sums["non-reentrant"]):
        assert (a - b).norm() <= 1e-5 * a.norm()


@pytest.mark.parametrize("fisher", ["kfac_full", "kfac_lowrank"])
def test_large_factor_capture_holds_no_input_between_forward_and_backward_under_checkpointing(fisher):
    """Non-reentrant checkpointing frees a block's activations after forward; the capture must not keep the LoRA
    inputs alive (it takes them from the recomputation), or checkpointing saves nothing."""
    import gc
    import weakref

    model = checkpointed_llama("non-reentrant")
    pre = gk.GritPreconditioner(model, gk.GritConfig(fisher=fisher, warmup_steps=0, large_factor_rank=4))
    seen = []
    handle = pre.modules[0].layer.lora_A["default"].register_forward_hook(
        lambda module, args, output: seen.append(weakref.ref(args[0])) if not seen else None
    )
    ids = torch.randint(0, 512, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    assert seen and seen[0]() is None, "the LoRA input of layer 0 is still alive after forward"
    loss.backward()
    handle.remove()
    assert (pre._fisher.rows > 0).all()


def test_kfac_lowrank_skips_a_module_with_non_finite_sums_and_keeps_the_rest():
    model = small_llama(num_layers=1, r=4)
    pre = gk.GritPreconditioner(model, gk.GritConfig(fisher="kfac_lowrank", warmup_steps=0, large_factor_rank=4))
    ids = torch.randint(0, 512, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    low = pre._fisher
    low.output_sketch_sum[0][0, 0] = float("nan")
    pre.step()
    assert low.initialized
    assert low.input_sketch[0].abs().max() == 0 and low.output_trace[0] == 0  # module 0: nothing folded
    assert all(s.abs().max() > 0 for s in low.input_sketch[1:]) and all(t > 0 for t in low.output_trace[1:])
    assert all(torch.isfinite(t).all() for name in low._STATE_LISTS for t in getattr(low, name))
    assert all(torch.isfinite(p.grad).all() for p in pre.parameters())


def lowrank_state_after_one_step(micro_batches, loss_scale=1.0):
    """Large-factor EMAs (first step: the step's factors) and preconditioned grads after one step over
    ``micro_batches`` (mean loss each, divided by their count, as gradient accumulation does)."""
    model = small_llama(num_layers=2, seed=3)
    pre = gk.GritPreconditioner(model, lowrank_config(large_factor_rank=4))
    for ids in micro_batches:
        (model(input_ids=ids, labels=ids).loss / len(micro_batches) * loss_scale).backward()
    for p in pre.parameters():  # what GradScaler.unscale_ does before optimizer.step
        p.grad.div_(loss_scale)
    pre.step(loss_scale=loss_scale if loss_scale != 1.0 else None)
    state = pre._fisher.state_dict()
    factors = [t for name in ("input_sketch", "output_sketch", "input_trace", "output_trace") for t in state[name]]
    return factors, [p.grad.clone() for p in pre.parameters()]


@pytest.mark.parametrize("case", ["accumulation_split", "batch_duplication", "loss_scale"])
def test_kfac_lowrank_factors_invariant_to_bookkeeping(case):
    ids = torch.randint(0, 512, (8, 24), generator=torch.Generator().manual_seed(11))
    ref = lowrank_state_after_one_step([ids])
    got = {
        "accumulation_split": lambda: lowrank_state_after_one_step(list(ids.split(2))),
        "batch_duplication": lambda: lowrank_state_after_one_step([torch.cat([ids, ids])]),
        "loss_scale": lambda: lowrank_state_after_one_step([ids], loss_scale=2.0**14),
    }[case]()
    for a, b in zip(got[0], ref[0]):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-30
    for a, b in zip(got[1], ref[1]):
        assert (a - b).norm() <= 1e-4 * b.norm()
