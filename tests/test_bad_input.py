"""Bad input gets a clear error or a documented skip, and never corrupts the bank or the adapters."""

import warnings

import pytest
import torch
from helpers import small_llama, two_layer_lora

from grit_kernels import GritConfig, GritOptimizer, GritPreconditioner, InverseStatus
from grit_kernels.bank import BACKWARD, FORWARD


def trained_setup(policy="skip", steps=3):
    model = small_llama(num_layers=1, seed=5)
    pre = GritPreconditioner(model, GritConfig(warmup_steps=0, update_freq=1, nonfinite_grads=policy))
    opt = GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    ids = torch.randint(0, 512, (2, 16))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, pre, opt, ids


def snapshot(pre, opt):
    params = [p.detach().clone() for p in pre.parameters()]
    state = {k: v.clone() for p in pre.parameters() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    return params, state, pre.bank.state_dict()


def assert_unchanged(before, pre, opt):
    params, state, bank = before
    assert all(torch.equal(a, b) for a, b in zip(params, pre.parameters()))
    now = {k: v for p in pre.parameters() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    assert all(torch.equal(state[k], now[k]) for k in state)
    assert torch.equal(bank["storage"][pre.bank.accumulators.numel():], pre.bank.storage[pre.bank.accumulators.numel():])
    assert torch.equal(bank["status"], pre.bank.status)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_step(bad):
    model, pre, opt, ids = trained_setup()
    before = snapshot(pre, opt)
    model(input_ids=ids, labels=ids).loss.backward()
    pre.modules[3].lora_A.grad[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and pre.step_count == 3
    assert_unchanged(before, pre, opt)
    assert pre.bank.accumulators.abs().sum() == 0  # the bad step's statistics were discarded
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()  # training continues normally
    opt.step()
    assert pre.step_count == 4 and torch.isfinite(pre.bank.storage).all()


def test_nonfinite_gradient_raise_policy():
    model, pre, opt, ids = trained_setup(policy="raise")
    before = snapshot(pre, opt)
    model(input_ids=ids, labels=ids).loss.backward()
    pre.modules[0].lora_B.grad.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        opt.step()
    assert_unchanged(before, pre, opt)


def test_all_labels_masked_batch_is_skipped():
    """Mean cross-entropy over zero supervised tokens is NaN: the step is skipped, nothing changes."""
    model, pre, opt, ids = trained_setup()
    before = snapshot(pre, opt)
    loss = model(input_ids=ids, labels=torch.full_like(ids, -100)).loss
    loss.backward()
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert_unchanged(before, pre, opt)


def test_nonfinite_statistics_are_not_folded():
    """An overflowed statistic (e.g. fp16 delta) leaves that factor unchanged; the others fold."""
    model, pre, opt, ids = trained_setup()
    factor_before = pre.bank.factor.clone()
    model(input_ids=ids, labels=ids).loss.backward()
    pre.bank.stat_sum[BACKWARD, 2, 0, 0] = float("inf")
    opt.step()
    assert torch.equal(pre.bank.factor[BACKWARD, 2], factor_before[BACKWARD, 2])
    assert not torch.equal(pre.bank.factor[BACKWARD, 1], factor_before[BACKWARD, 1])
    assert torch.isfinite(pre.bank.storage).all()


def test_empty_statistics_step_leaves_factors():
    model, pre, opt, ids = trained_setup()
    factor_before = pre.bank.factor.clone()
    pre.bank.fold(0.95)  # a step in which no module saw a row
    assert torch.equal(pre.bank.factor, factor_before)


@pytest.mark.parametrize("kind", ["singular", "indefinite", "nan"])
def test_singular_indefinite_nonfinite_factors(kind):
    model, pre, opt, ids = trained_setup()
    bank = pre.bank
    r = bank.module_ranks[0]
    if kind == "singular":
        bank.factor[FORWARD, 0] = 0.0
    elif kind == "indefinite":
        bank.factor[FORWARD, 0, :r, :r] = -torch.eye(r)
    else:
        bank.factor[FORWARD, 0, 0, 1] = float("nan")
    bank.refresh_inverses(1e-3, 1e-12, 100.0)
    expected = InverseStatus.OK if kind == "singular" else InverseStatus.KEPT_PREVIOUS
    assert bank.status[FORWARD, 0] == expected
    assert torch.isfinite(bank.inverse).all()
    model(input_ids=ids, labels=ids).loss.backward()
    pre._precondition_grads(lr=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in pre.parameters())


def test_unsupported_layers_are_listed_or_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from grit_kernels.models import tiny_llama_config

    base = AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=1))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with pytest.warns(UserWarning, match="Embedding LoRA is not supported"):
        pre = GritPreconditioner(model)
    assert pre.num_modules == 1 and len(pre.skipped) == 1

    dora = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=1)),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="none of the model's 1 LoRA layer.* DoRA"):
            GritPreconditioner(dora)

    with pytest.raises(ValueError, match="no supported PEFT LoRA layer"):
        GritPreconditioner(torch.nn.Linear(3, 3))


def test_patch_twice_and_remove():
    model = two_layer_lora()
    x = torch.randn(4, 7)
    expected = model(x)
    pre = GritPreconditioner(model)
    with pytest.raises(RuntimeError, match="already patched"):
        GritPreconditioner(model)
    assert torch.allclose(model(x), expected)
    pre.remove()
    assert all("forward" not in m.layer.__dict__ for m in pre.modules)
    with pytest.raises(RuntimeError, match="removed"):
        pre.step()
    GritPreconditioner(model)  # can be patched again


def test_optimizer_must_own_the_lora_params():
    model = two_layer_lora()
    pre = GritPreconditioner(model)
    with pytest.raises(ValueError, match="not in the optimizer"):
        GritOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), pre)
