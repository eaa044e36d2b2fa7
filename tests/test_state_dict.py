"""Saving and loading: a resumed run continues bit-for-bit like the uninterrupted one."""

import io

import torch
from helpers import small_llama

from grit_kernels import GritConfig, GritOptimizer, GritPreconditioner

CFG = dict(warmup_steps=1, update_freq=2)


def make(seed=7):
    model = small_llama(num_layers=2, seed=seed, random_b=False, dropout=0.1)
    pre = GritPreconditioner(model, GritConfig(**CFG))
    opt = GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    return model, pre, opt


def train(model, opt, batches, seed):
    losses = []
    for i, ids in enumerate(batches):
        torch.manual_seed(seed + i)  # dropout masks depend only on the step
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def lora_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_resume_continues_bit_for_bit():
    batches = list(torch.randint(0, 512, (7, 2, 16), generator=torch.Generator().manual_seed(1)))
    model, pre, opt = make()
    full = train(model, opt, batches, seed=100)

    model2, pre2, opt2 = make()
    first = train(model2, opt2, batches[:4], seed=100)
    buffer = io.BytesIO()
    torch.save({"lora": lora_state(model2), "optimizer": opt2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    model3, pre3, opt3 = make()  # same base weights (the "pretrained" model); adapters scrambled below
    with torch.no_grad():
        for p in pre3.parameters():
            p.normal_()
    model3.load_state_dict(saved["lora"], strict=False)
    opt3.load_state_dict(saved["optimizer"])
    assert pre3.step_count == 4
    rest = train(model3, opt3, batches[4:], seed=104)

    assert first + rest == full  # exact float equality of every loss
    assert all(torch.equal(a, b) for a, b in zip(pre.parameters(), pre3.parameters()))
    assert torch.equal(pre.bank.storage, pre3.bank.storage)


def test_preconditioner_state_round_trip_and_mismatch():
    model, pre, opt = make()
    train(model, opt, list(torch.randint(0, 512, (3, 2, 16))), seed=0)
    state = pre.state_dict()
    _, pre_b, _ = make()
    pre_b.load_state_dict(state)
    assert torch.equal(pre_b.bank.storage, pre.bank.storage) and pre_b.step_count == pre.step_count
    assert pre_b.bank.storage.data_ptr() != state["bank"]["storage"].data_ptr()  # copied onto our device

    other = small_llama(num_layers=1, seed=7)
    pre_c = GritPreconditioner(other, GritConfig())
    try:
        pre_c.load_state_dict(state)
    except ValueError as err:
        assert "module mismatch" in str(err)
    else:
        raise AssertionError("loading a state of another model must fail")
