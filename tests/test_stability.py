"""Stability of GRIT from PEFT's initialisation (B = 0): bounded SGD training with the defaults, the first
step with statistics preconditioned when warm-up is 0, and the KL-clip acting on the step actually
taken (after momentum, with each parameter group's own learning rate)."""

import copy

import pytest
import torch
from conftest import rel_err
from helpers import small_llama

from grit_kernels import GritConfig, GritOptimizer, GritPreconditioner, reference
from grit_kernels.bank import BACKWARD, FORWARD
from grit_kernels.models import build_lora_model, tiny_llama_config


def _lora_params(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("lr", [0.03, 0.1, 0.3])
def test_default_grit_sgd_from_peft_init_trains_and_stays_bounded(lr):
    """224 LoRA modules, B = 0 at start, SGD momentum 0.9, default GritConfig, 30 steps on a fixed batch."""
    torch.manual_seed(0)
    model = build_lora_model(tiny_llama_config(), r=4, seed=0)
    pre = GritPreconditioner(model, GritConfig())
    assert pre.num_modules == 224
    opt = GritOptimizer(torch.optim.SGD(_lora_params(model), lr=lr, momentum=0.9), pre)
    a0 = torch.stack([m.lora_A.detach().norm() for m in pre.modules])
    x = torch.randint(0, 512, (2, 24))
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    a = torch.stack([m.lora_A.detach().norm() for m in pre.modules])
    b = torch.stack([m.lora_B.detach().norm() for m in pre.modules])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05, losses
    assert (a / a0).max() < 5.0, (a / a0).max()  # measured <= 2.6; prior defaults: ||A|| x 3e4 within 30 steps
    assert b.max() < 10.0, b.max()  # measured <= 3.1 (B starts at 0)
    assert pre.preconditioning_active


def test_warmup_zero_preconditions_the_first_step_with_statistics():
    """PEFT's B = 0 makes delta = 0 at step 0: no statistics, gradients unchanged, not active. The next
    step has statistics and is preconditioned with them (not with the identity until the next refresh)."""
    torch.manual_seed(0)
    model = small_llama(num_layers=1, random_b=False).double()
    cfg = GritConfig(warmup_steps=0, update_freq=10, backend="torch", graft=False)
    pre = GritPreconditioner(model, cfg)
    x = torch.randint(0, 512, (2, 16))
    assert not pre.preconditioning_active
    model(input_ids=x, labels=x).loss.backward()
    raw = [p.grad.clone() for p in pre.parameters()]
    pre.step()
    assert max(rel_err(p.grad, r) for r, p in zip(raw, pre.parameters())) < 1e-6  # identity, fp32 products
    assert not pre.preconditioning_active
    with torch.no_grad():
        for p in pre.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    model(input_ids=x, labels=x).loss.backward()
    raw = [p.grad.clone() for p in pre.parameters()]
    pre.step()
    assert pre.preconditioning_active
    bank = pre.bank
    factors = bank.factor.double().reshape(-1, bank.max_rank, bank.max_rank)
    inv, _ = reference.damped_cholesky_inverse(factors, cfg.damping, cfg.eps_abs)
    inv = inv.view(2, -1, bank.max_rank, bank.max_rank)
    for m in pre.modules:
        ga, gb = raw[2 * m.index], raw[2 * m.index + 1]
        assert rel_err(m.lora_A.grad, inv[BACKWARD, m.index] @ ga) < 1e-4
        assert rel_err(m.lora_B.grad, gb @ inv[FORWARD, m.index]) < 1e-4
        assert rel_err(m.lora_A.grad, ga) > 1e-2  # actually changed


def _fisher_quad(pre, deltas):
    """sum_m <D_m dA, dA> + <dB H_m, dB> in float64 from the bank's factors."""
    total = torch.zeros((), dtype=torch.float64)
    for m in pre.modules:
        r = m.lora_A.shape[0]
        d = pre.bank.factor[BACKWARD, m.index, :r, :r].double()
        h = pre.bank.factor[FORWARD, m.index, :r, :r].double()
        da, db = deltas[2 * m.index].double(), deltas[2 * m.index + 1].double()
        total += ((d @ da) * da).sum() + ((db @ h) * db).sum()
    return total


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_kl_clip_bounds_the_step_taken_with_per_group_lrs(momentum):
    """LoRA+-style groups (B's lr 16x A's): each clipped step (the second one carries momentum) has
    Fisher norm exactly kl_clip, and the first is the unclipped step times one common factor, so each
    group's own lr is honoured (not the largest lr over groups)."""
    torch.manual_seed(0)
    base = small_llama(num_layers=1, random_b=True).double()
    x = torch.randint(0, 512, (2, 16))
    kl = 1e-6
    taken = {}
    for clip in (None, kl):
        model = copy.deepcopy(base)
        pre = GritPreconditioner(model, GritConfig(warmup_steps=0, update_freq=1, kl_clip=clip, backend="torch"))
        groups = [{"params": [m.lora_A for m in pre.modules], "lr": 0.01},
                  {"params": [m.lora_B for m in pre.modules], "lr": 0.16}]
        opt = GritOptimizer(torch.optim.SGD(groups, momentum=momentum), pre)
        taken[clip] = []
        for _ in range(2):
            before = [p.detach().clone() for p in pre.parameters()]
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            delta = [p.detach() - q for p, q in zip(pre.parameters(), before)]
            taken[clip].append((delta, _fisher_quad(pre, delta).item()))
    assert taken[None][0][1] > 10 * kl  # the clip is active
    for delta, quad in taken[kl]:
        assert abs(quad / kl - 1) < 1e-3, quad
    ratio = [c.norm() / f.norm() for c, f in zip(taken[kl][0][0], taken[None][0][0]) if f.norm() > 0]
    assert max(ratio) / min(ratio) - 1 < 1e-4
