"""Saving and loading: a resumed run continues bit-for-bit like the uninterrupted one."""

import io

import pytest
import torch
from helpers import small_llama

from grit_kernels import GritConfig, GritOptimizer, GritPreconditioner

CFG = dict(warmup_steps=1, update_freq=2)


def make(seed=7, lora_kwargs=None, **cfg):
    """Model, preconditioner (``CFG`` updated by ``cfg``) and AdamW GritOptimizer; ``lora_kwargs`` go to PEFT."""
    model = small_llama(num_layers=2, seed=seed, random_b=False, dropout=0.1, **(lora_kwargs or {}))
    pre = GritPreconditioner(model, GritConfig(**{**CFG, **cfg}))
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
    assert pre.preconditioning_active and pre_b.preconditioning_active  # derived from the restored bank
    _, pre_fresh, _ = make()
    pre_fresh.load_state_dict(make()[1].state_dict())  # a state saved before any step: nothing preconditioned yet
    assert not pre_fresh.preconditioning_active

    other = small_llama(num_layers=1, seed=7)
    pre_c = GritPreconditioner(other, GritConfig())
    try:
        pre_c.load_state_dict(state)
    except ValueError as err:
        assert "module mismatch" in str(err)
    else:
        raise AssertionError("loading a state of another model must fail")


def save_and_resume(model, opt, seed=7, **cfg):
    """Save LoRA weights and optimizer state through ``torch.save``; load them into a fresh model whose
    adapters are scrambled (built at the saved PEFT ranks) and return it with its preconditioner and optimizer."""
    buffer = io.BytesIO()
    peft_cfg = model.peft_config["default"]
    patterns = {"rank_pattern": dict(peft_cfg.rank_pattern), "alpha_pattern": dict(peft_cfg.alpha_pattern)}
    torch.save({"lora": lora_state(model), "optimizer": opt.state_dict(), "patterns": patterns}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2, pre2, opt2 = make(seed, lora_kwargs=saved["patterns"], **cfg)
    with torch.no_grad():
        for p in pre2.parameters():
            p.normal_()
    model2.load_state_dict(saved["lora"], strict=False)
    opt2.load_state_dict(saved["optimizer"])
    return model2, pre2, opt2


RESUME_CASES = {
    "diagonal": dict(fisher="diagonal"),
    "kfac_full": dict(fisher="kfac_full"),
    "kfac_lowrank": dict(fisher="kfac_lowrank", large_factor_rank=4),
    # cuts at steps 2, 4 and 6: the resumed run must keep the schedule's r0, not the cut ranks
    "rank_schedule": dict(reprojection="one_sided", reprojection_freq=2, reprojection_start=2,
                          rank_schedule="linear", rank_end=0.25, rank_schedule_steps=6),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_bit_for_bit_fisher_options_and_rank_schedule(case):
    cfg = RESUME_CASES[case]
    batches = list(torch.randint(0, 512, (7, 2, 16), generator=torch.Generator().manual_seed(2)))
    model, pre, opt = make(**cfg)
    full = train(model, opt, batches, seed=100)

    model2, pre2, opt2 = make(**cfg)
    first = train(model2, opt2, batches[:4], seed=100)
    model3, pre3, opt3 = save_and_resume(model2, opt2, **cfg)
    assert pre3.step_count == 4
    rest = train(model3, opt3, batches[4:], seed=104)

    assert first + rest == full  # exact float equality of every loss
    assert all(torch.equal(a, b) for a, b in zip(pre.parameters(), pre3.parameters()))
    assert torch.equal(pre.bank.storage, pre3.bank.storage)
    state, state3 = pre.state_dict(), pre3.state_dict()
    if case == "rank_schedule":
        assert state["rank_adapter"] == state3["rank_adapter"]
        assert len(state["rank_adapter"]["history"]) == 3
        assert pre.bank.module_ranks != [16] * pre.num_modules  # the schedule really cut
    else:
        assert state["fisher"] == state3["fisher"] == case
        flat = lambda fs: [t for v in fs.values() for t in (v if isinstance(v, list) else [v]) if torch.is_tensor(t)]
        assert flat(state["fisher_state"]) and all(
            torch.equal(a, b) for a, b in zip(flat(state["fisher_state"]), flat(state3["fisher_state"]))
        )


def test_loading_a_state_of_another_fisher_kind_fails_clearly():
    model, pre, opt = make(fisher="diagonal")
    train(model, opt, list(torch.randint(0, 512, (2, 2, 16))), seed=0)
    state = pre.state_dict()
    for kind in ("kfac", "kfac_full"):
        _, other, _ = make(fisher=kind)
        with pytest.raises(ValueError, match="saved with fisher='diagonal'.*fisher='%s'" % kind):
            other.load_state_dict(state)
    legacy = {k: v for k, v in make()[1].state_dict().items() if k not in ("fisher", "fisher_state")}
    make()[1].load_state_dict(legacy)  # states saved before the "fisher" key are rank-space K-FAC
    with pytest.raises(ValueError, match="saved with fisher='kfac'"):
        make(fisher="diagonal")[1].load_state_dict(legacy)
