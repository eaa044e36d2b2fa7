"""EigenAdamW (Adam in the eigenbasis of the rank-space factors) and GritConfig.damping_floor, against the
slow float64 oracles of grit_kernels/reference.py on fresh random inputs."""

import copy

import pytest
import torch
from conftest import rel_err
from helpers import lora_pairs, two_layer_lora

from grit_kernels import EigenAdamW, FactorBank, GritConfig, GritOptimizer, GritPreconditioner, ops, reference
from grit_kernels.bank import BACKWARD, FORWARD
from grit_kernels.eigen_adam import batched_eigenbasis


def model_and_groups(seed, lr_a=3e-2, lr_b=1e-1, ranks=True):
    """Two LoRA modules of ranks 3 and 2 (padding in the bank), random A and B, LoRA+-style lr groups."""
    model = two_layer_lora(r=3, seed=seed, **({"rank_pattern": {"fc2": 2}} if ranks else {}))
    pairs = lora_pairs(model)
    groups = [{"params": [a for a, _, _ in pairs], "lr": lr_a}, {"params": [b for _, b, _ in pairs], "lr": lr_b}]
    return model, groups


def make_opt(model, groups, backend="torch", kl_clip=None, **kwargs):
    pre = GritPreconditioner(model, GritConfig(kl_clip=kl_clip, backend=backend))
    return GritOptimizer(EigenAdamW(groups, pre, **kwargs), pre), pre


def train_step(model, opt, x, t):
    loss = 0.5 * ((model(x) - t) ** 2).sum(dim=-1).mean()
    loss.backward()
    grads = [(a.grad.double().clone(), b.grad.double().clone()) for a, b, _ in lora_pairs(model)]
    opt.step()
    opt.zero_grad()
    return grads


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("second_moment", ["keep", "rotate"])
def test_matches_reference(fresh_seed, backend, second_moment):
    """Rotations are not symmetric matrices: every backend's grouped product must honour the orientation."""
    if backend == "cpp":
        pytest.importorskip("grit_kernels._C")
    if backend == "triton" and not ops.triton_available():
        pytest.skip("triton unavailable")
    lr_a, lr_b, wd, betas, eps = 3e-2, 1e-1, 0.05, (0.8, 0.95), 1e-6
    model, groups = model_and_groups(fresh_seed % 1000, lr_a, lr_b)
    opt, pre = make_opt(model, groups, backend, betas=betas, eps=eps, weight_decay=wd, basis_freq=2,
                        second_moment=second_moment)
    ref = [(a.detach().double().clone(), b.detach().double().clone()) for a, b, _ in lora_pairs(model)]
    ranks = [a.shape[0] for a, _ in ref]
    state = [{"step": 0, "m_a": torch.zeros_like(a), "v_a": torch.zeros_like(a), "m_b": torch.zeros_like(b),
              "v_b": torch.zeros_like(b)} for a, b in ref]
    bases = [(torch.eye(r, dtype=torch.float64), torch.eye(r, dtype=torch.float64)) for r in ranks]
    for k in range(5):
        x, t = torch.randn(32, 7), torch.randn(32, 5)
        grads = train_step(model, opt, x, t)
        for i, ((a, b), (ga, gb), r) in enumerate(zip(ref, grads, ranks)):
            if k % 2 == 0:  # a refresh: from the factors the step saw (the bank after its fold)
                new = (reference.eigenbasis(pre.bank.factor[BACKWARD, i, :r, :r]),
                       reference.eigenbasis(pre.bank.factor[FORWARD, i, :r, :r]))
                state[i] = reference.eigen_adam_rebase(state[i], bases[i][0], new[0], bases[i][1], new[1], second_moment)
                bases[i] = new
            a, b, state[i] = reference.eigen_adam_step(a, b, ga, gb, *bases[i], state[i], lr_a, lr_b, betas, eps, wd)
            ref[i] = (a, b)
        for (a, b, _), (ra, rb) in zip(lora_pairs(model), ref):
            assert rel_err(a.detach(), ra) < 1e-5 and rel_err(b.detach(), rb) < 1e-5, f"step {k}"


def test_identity_basis_is_adamw(fresh_seed):
    """Bases that stay the identity (no refresh) give torch's AdamW, per-group lrs and weight decay included."""
    model, groups = model_and_groups(fresh_seed % 1000)
    other = copy.deepcopy(model)
    opt, _ = make_opt(model, groups, weight_decay=0.1)
    opt.optimizer.refresh_basis = lambda: None
    pairs = lora_pairs(other)
    adamw = torch.optim.AdamW([{"params": [a for a, _, _ in pairs], "lr": 3e-2},
                               {"params": [b for _, b, _ in pairs], "lr": 1e-1}], weight_decay=0.1)
    for _ in range(4):
        x, t = torch.randn(32, 7), torch.randn(32, 5)
        train_step(model, opt, x, t)
        train_step(other, adamw, x, t)
    for p, q in zip(model.parameters(), other.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-6


def test_basis_change_maps_moments(fresh_seed):
    """A refresh keeps the first moment in the original coordinates (Q_new m_new == Q_old m_old); the second
    moment is kept ("keep") or mapped by the squared transition ("rotate")."""
    for mode in ("keep", "rotate"):
        model, groups = model_and_groups(fresh_seed % 1000)
        opt, pre = make_opt(model, groups, basis_freq=100, second_moment=mode)
        train_step(model, opt, torch.randn(32, 7), torch.randn(32, 5))
        inner = opt.optimizer
        old_basis = inner.basis.clone()
        old = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in inner.state.items()}
        f = torch.randn_like(pre.bank.factor)
        pre.bank.factor.copy_(f @ f.mT)  # a different PSD factor
        inner.refresh_basis()
        assert (inner.basis - old_basis).abs().max() > 1e-2  # the basis did change
        for m in pre.modules:
            r = m.lora_A.shape[0]
            qd0, qd1 = old_basis[BACKWARD, m.index, :r, :r], inner.basis[BACKWARD, m.index, :r, :r]
            qh0, qh1 = old_basis[FORWARD, m.index, :r, :r], inner.basis[FORWARD, m.index, :r, :r]
            sa, sb = inner.state[m.lora_A], inner.state[m.lora_B]
            oa, ob = old[id(m.lora_A)], old[id(m.lora_B)]
            assert rel_err(qd1 @ sa["exp_avg"], qd0 @ oa["exp_avg"]) < 1e-5
            assert rel_err(sb["exp_avg"] @ qh1.T, ob["exp_avg"] @ qh0.T) < 1e-5
            if mode == "keep":
                assert torch.equal(sa["exp_avg_sq"], oa["exp_avg_sq"]) and torch.equal(sb["exp_avg_sq"], ob["exp_avg_sq"])
            else:
                td, th = qd1.T @ qd0, qh1.T @ qh0
                assert rel_err(sa["exp_avg_sq"], (td * td) @ oa["exp_avg_sq"]) < 1e-5
                assert rel_err(sb["exp_avg_sq"], ob["exp_avg_sq"] @ (th * th).T) < 1e-5


def test_batched_eigenbasis_matches_reference(fresh_seed):
    """Padded mixed ranks: the leading r x r block holds the eigenvectors (descending, up to sign), identity padding;
    factors without statistics get the identity."""
    n, R = 6, 5
    ranks = torch.tensor([5, 3, 1, 4, 2, 5], dtype=torch.int32)
    x = torch.randn(n, R, 2 * R)
    mats = (x @ x.mT) * torch.logspace(-8, 4, n)[:, None, None]  # scale-free: tiny and huge factors
    mats[0, 1, 0] = float("nan")  # non-finite: identity
    init = torch.tensor([True, True, True, True, True, False])
    q = batched_eigenbasis(torch.full((n, R, R), float("nan")).copy_(mats), ranks, init)
    eye = torch.eye(R)
    for i in range(n):
        r = int(ranks[i])
        if not init[i] or i == 0:
            assert torch.equal(q[i], eye)
            continue
        ref = reference.eigenbasis(mats[i, :r, :r])
        got = q[i, :r, :r].double()
        assert (got.T @ ref).abs().diagonal().min() > 1 - 1e-5  # same vectors up to sign
        assert torch.equal(q[i, r:, r:], eye[r:, r:]) and not q[i, :r, r:].any() and not q[i, r:, :r].any()


def test_rotation_equivariance(fresh_seed):
    """(A, B) -> (Q A, B Q^T), Q orthogonal: with bases from statistics (random B, refreshed every step) the whole
    trajectory is the same function (s B A per module); with identity bases (plain Adam) it is not."""
    errs = {}
    for refresh in (True, False):
        model, _ = model_and_groups(fresh_seed % 1000, ranks=False)
        other = copy.deepcopy(model)
        with torch.no_grad():
            for a, b, _ in lora_pairs(other):
                q = torch.linalg.qr(torch.randn(a.shape[0], a.shape[0], dtype=torch.float64))[0].float()
                a.copy_(q @ a)
                b.copy_(b @ q.T)
        opts = []
        for m in (model, other):
            opt, _ = make_opt(m, m.parameters(), lr=1e-2, basis_freq=1)
            if not refresh:
                opt.optimizer.refresh_basis = lambda: None
            opts.append(opt)
        for _ in range(6):
            x, t = torch.randn(64, 7), torch.randn(64, 5)
            for m, opt in zip((model, other), opts):
                train_step(m, opt, x, t)
        errs[refresh] = max(rel_err(s * (b @ a).detach(), s2 * (b2 @ a2).detach())
                            for (a, b, s), (a2, b2, s2) in zip(lora_pairs(model), lora_pairs(other)))
    assert errs[True] < 1e-4, errs
    assert errs[False] > 1e-2, errs  # negative control: plain Adam is not rotation-equivariant


def test_state_dict_round_trip_bit_for_bit(fresh_seed):
    model, groups = model_and_groups(fresh_seed % 1000)
    opt, _ = make_opt(model, groups, basis_freq=2, weight_decay=0.01, kl_clip=0.1)
    data = [(torch.randn(32, 7), torch.randn(32, 5)) for _ in range(7)]
    for x, t in data[:3]:
        train_step(model, opt, x, t)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed, groups2 = model_and_groups(fresh_seed % 1000 + 1)
    resumed.load_state_dict(saved_model)
    opt2, _ = make_opt(resumed, groups2, basis_freq=2, weight_decay=0.01, kl_clip=0.1)
    opt2.load_state_dict(saved_opt)
    for x, t in data[3:]:  # crosses a basis refresh
        train_step(model, opt, x, t)
        train_step(resumed, opt2, x, t)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_kl_clip_applies_to_the_step_taken():
    """GritConfig.kl_clip still bounds EigenAdamW's step (GritOptimizer clips the step taken)."""
    torch.manual_seed(0)
    model, groups = model_and_groups(0, lr_a=1.0, lr_b=1.0)
    opt, pre = make_opt(model, groups, kl_clip=1e-6)
    before = [p.detach().clone() for p in pre.parameters()]
    train_step(model, opt, torch.randn(32, 7), torch.randn(32, 5))
    delta = [p.detach() - b for p, b in zip(pre.parameters(), before)]
    quad = sum(float((pre.bank.factor[BACKWARD, m.index, :r, :r] @ da * da).sum() + (db @ pre.bank.factor[FORWARD, m.index, :r, :r] * db).sum())
               for m, da, db, r in zip(pre.modules, delta[0::2], delta[1::2], [d.shape[0] for d in delta[0::2]]))
    assert quad == pytest.approx(1e-6, rel=1e-3)


def test_errors():
    model, groups = model_and_groups(0)
    pre = GritPreconditioner(model, GritConfig())
    with pytest.raises(ValueError, match="basis_freq"):
        EigenAdamW(groups, pre, basis_freq=0)
    with pytest.raises(ValueError, match="second_moment"):
        EigenAdamW(groups, pre, second_moment="reset")
    with pytest.raises(ValueError, match="not in its parameters"):
        EigenAdamW(groups[:1], pre)
    opt = EigenAdamW(groups, pre)
    with pytest.raises(ValueError, match="another GritPreconditioner"):
        GritOptimizer(opt, GritPreconditioner(two_layer_lora(r=3, seed=2), GritConfig()))
    loss = model(torch.randn(4, 7)).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="GritOptimizer"):
        opt.step()  # the factors were not folded for this step
    diag = two_layer_lora(r=3, seed=1)
    with pytest.raises(ValueError, match="fisher='kfac'"):
        EigenAdamW(diag.parameters(), GritPreconditioner(diag, GritConfig(fisher="diagonal")))


# ---------------------------------------------------------------------------------------- damping floor
def test_refresh_with_floor_matches_reference(fresh_seed):
    ranks = [4, 2, 3]
    bank = FactorBank(ranks)
    R, M = 4, 3
    x = torch.randn(2, M, R, 2 * R)
    bank.factor.copy_(x @ x.mT * torch.logspace(-6, 3, 2 * M).view(2, M, 1, 1))
    bank.initialized.fill_(True)
    scale = torch.diagonal(bank.factor, dim1=2, dim2=3).sum(-1) / torch.tensor(ranks, dtype=torch.float32)  # tr(C)/r
    # active where the factor is > 1, inactive where < 1 (by a random margin; a mix of both, every run)
    above = torch.tensor([[True, False, True], [False, True, False]])
    floor = scale * torch.where(above, 1.1 + torch.rand(2, M), 0.9 * torch.rand(2, M))
    damping, eps_abs = 1e-2, 1e-9
    bank.refresh_inverses(damping, eps_abs, 100.0, backend="torch", floor=floor)
    lam = bank.damping_values(damping, eps_abs, floor)
    active = 0
    for w in (FORWARD, BACKWARD):
        for m, r in enumerate(ranks):
            c = bank.factor[w, m, :r, :r].double()
            scale = torch.diagonal(c).sum() / r
            want_lam = damping * max(float(scale), float(floor[w, m])) + eps_abs
            active += float(floor[w, m]) > float(scale)
            assert float(lam[w, m]) == pytest.approx(want_lam, rel=1e-5)
            want = torch.linalg.inv(c + want_lam * torch.eye(r, dtype=torch.float64))
            assert rel_err(bank.inverse[w, m, :r, :r], want) < 1e-4
    assert 0 < active < 2 * M


def test_floor_tracks_running_max_and_is_inert_while_inactive(fresh_seed):
    """damping_floor=f: lam = damping * max(tr/r, f * running max of tr/r over refreshes); while the traces grow the
    floor is inactive and the inverses are bit-identical to damping_floor=0."""
    models = [two_layer_lora(r=3, seed=fresh_seed % 1000) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfgs = [GritConfig(warmup_steps=0, kl_clip=None, backend="torch", ema_decay=0.0, damping_floor=f) for f in (0.0, 0.5)]
    pres = [GritPreconditioner(m, c) for m, c in zip(models, cfgs)]
    running = None
    for k, scale in enumerate([1.0, 2.0, 4.0, 1.0, 0.3, 0.1]):  # inputs grow, then shrink: the floor activates
        x, t = scale * torch.randn(32, 7), torch.randn(32, 5)
        for m, p in zip(models, pres):
            m.zero_grad()
            (0.5 * ((m(x) - t) ** 2).sum(-1).mean()).backward()
            p.step()
        bank = pres[1].bank
        now = torch.stack([torch.stack([torch.diagonal(bank.factor[w, i, :r, :r]).sum() / r
                                        for i, r in enumerate(bank.module_ranks)]) for w in (0, 1)])
        running = now if running is None else torch.maximum(running, now)
        assert torch.equal(pres[1]._scale_max, running)
        active = (0.5 * running > now).any()
        same = torch.equal(pres[0].bank.inverse, pres[1].bank.inverse)
        assert same == (not bool(active)), f"step {k}"
        for w in (0, 1):
            for i, r in enumerate(bank.module_ranks):
                lam = reference.floored_damping(bank.factor[w, i, :r, :r].double(), 1e-3, 1e-12, 0.5, float(running[w, i]))
                want = torch.linalg.inv(bank.factor[w, i, :r, :r].double() + lam * torch.eye(r, dtype=torch.float64))
                assert rel_err(bank.inverse[w, i, :r, :r], want) < 1e-4
    assert active  # the last steps exercised an active floor
    state = pres[1].state_dict()
    fresh = GritPreconditioner(two_layer_lora(r=3, seed=1), cfgs[1])
    fresh.load_state_dict(state)
    assert torch.equal(fresh._scale_max, pres[1]._scale_max)


def test_floor_keeps_rotation_invariance(fresh_seed):
    """Rotations keep every trace, so the floored step stays invariant under (A, B) -> (QA, BQ^T) over a
    trajectory whose floor is active (SGD on the natural gradient, no graft)."""
    model = two_layer_lora(r=3, seed=fresh_seed % 1000).double()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for a, b, _ in lora_pairs(other):
            q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
            a.copy_(q @ a)
            b.copy_(b @ q.T)
    cfg = GritConfig(warmup_steps=0, kl_clip=None, graft=False, backend="torch", damping=1e-3, damping_floor=1.0)
    pres = [GritPreconditioner(m, cfg) for m in (model, other)]
    for scale in (2.0, 1.0, 0.5, 0.25):  # shrinking inputs: the floor is active after the first step
        x, t = scale * torch.randn(32, 7, dtype=torch.float64), torch.randn(32, 5, dtype=torch.float64)
        for m, p in zip((model, other), pres):
            m.zero_grad()
            (0.5 * ((m(x) - t) ** 2).sum(-1).mean()).backward()
            p.step()
            with torch.no_grad():
                for a, b, _ in lora_pairs(m):
                    a.sub_(1e-3 * a.grad)
                    b.sub_(1e-3 * b.grad)
    assert bool((pres[0]._scale_max > pres[0].bank._scale().view(2, -1)).any())  # active
    for (a, b, s), (a2, b2, _) in zip(lora_pairs(model), lora_pairs(other)):
        assert rel_err(b2 @ a2, b @ a) < 1e-5


def test_floor_config_errors():
    with pytest.raises(ValueError, match="damping_floor"):
        GritConfig(damping_floor=1.5)
    with pytest.raises(ValueError, match="damping_floor needs fisher='kfac'"):
        GritConfig(damping_floor=0.1, fisher="diagonal")


def test_bench_variant_builds_eigen_adam_with_loraplus_groups():
    """bench_convergence --variant name=eigen_loraplus:{...}: EigenAdamW (its kwargs under "optimizer") inside
    GritOptimizer, lora_B at ratio x lr, the LoRA+ lr grid by default."""
    from grit_kernels import cli

    bench = cli.load_bench_module("bench_convergence")
    name, arm = bench._parse_variant('e=eigen_loraplus:{"kl_clip":null,"optimizer":{"basis_freq":1}}')
    assert name == "e" and arm.lrs == bench.ARMS["grit_loraplus"].lrs
    model = two_layer_lora(r=3, seed=0)
    opt, inner = bench.make_optimizer(model, arm, 1e-3, bench.RunConfig())
    assert isinstance(opt, GritOptimizer) and isinstance(inner, EigenAdamW) and inner.basis_freq == 1
    assert opt.preconditioner.config.kl_clip is None
    lrs = {id(p): g["lr"] for g in inner.param_groups for p in g["params"]}
    for a, b, _ in lora_pairs(model):
        assert lrs[id(a)] == 1e-3 and lrs[id(b)] == pytest.approx(1e-3 * bench.RunConfig().loraplus_ratio)
