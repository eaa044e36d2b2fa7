"""compress_adapter: Fisher-guided truncation to real smaller PEFT adapters; the preconditioner follows."""

import copy

import helpers
import pytest
import torch
from helpers import small_llama

import grit_kernels as gk
from grit_kernels.bank import BACKWARD, FORWARD
from grit_kernels.compress import (
    compress_adapter,
    fisher_weighted_error,
    lora_parameter_count,
    truncation_basis,
)

D_IN, D_OUT, RANK, ROWS = 12, 10, 6, 400


def one_layer_lora(seed):
    return helpers.one_layer_lora(seed, D_IN, D_OUT, RANK)


def anisotropic_inputs(seed, rows=ROWS):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D_IN, D_IN, generator=g) * torch.logspace(0, -1.5, D_IN)
    return torch.randn(rows, D_IN, generator=g) @ mix


def measure_statistics(model, pre, x, out_weight):
    """One pass with a loss linear in the output (so delta does not depend on the LoRA weights);
    ema_decay=0 makes the bank's factors this pass's statistics."""
    loss = (model(x) * out_weight).sum() / x.shape[0]
    loss.backward()
    pre.step()
    model.zero_grad(set_to_none=True)


def layer_weights(model):
    layer = model.base_model.model.fc
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_discarded_energy_is_the_measured_fisher_weighted_error(fresh_seed, energy):
    model = one_layer_lora(fresh_seed)
    pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0, ema_decay=0.0, kl_clip=None))
    x = anisotropic_inputs(fresh_seed)
    measure_statistics(model, pre, x, torch.randn(D_OUT))
    A, B, s = (t.detach().clone() if torch.is_tensor(t) else t for t in layer_weights(model))
    H = pre.bank.factor[FORWARD, 0, :RANK, :RANK].clone()
    spectrum = truncation_basis(A, B, H, s).energies
    ranks = compress_adapter(model, pre, energy=energy)
    k = ranks["fc"]
    kept = spectrum[:k].sum() / spectrum.sum()
    assert kept >= energy - 1e-9 and (k == 1 or spectrum[: k - 1].sum() / spectrum.sum() < energy)
    new_A, new_B, new_s = layer_weights(model)
    assert new_A.shape == (k, D_IN) and new_B.shape == (D_OUT, k) and k < RANK
    measured = fisher_weighted_error(A, B, s, new_A.detach(), new_B.detach(), new_s, x)
    expected = 1.0 - kept.item()
    assert abs(measured - expected) < 1e-4 + 1e-3 * expected, (measured, expected)


def test_energy_one_keeps_outputs_and_ranks_never_grow(fresh_seed):
    model = small_llama(num_layers=2, seed=fresh_seed % 1000, r=8)
    pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0, update_freq=1))
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    ids = torch.randint(0, 512, (2, 12))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ranks = compress_adapter(model, pre, energy=1.0)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).norm() / ref.norm() < 1e-5
    assert len(ranks) == pre.num_modules == 14 and all(1 <= k <= 8 for k in ranks.values())
    lower = compress_adapter(model, pre, energy=0.7)
    assert all(lower[n] <= ranks[n] for n in ranks)


def test_zero_b_compresses_to_min_rank_without_changing_outputs():
    model = small_llama(num_layers=1, random_b=False, r=4)  # PEFT init: B = 0
    ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ranks = compress_adapter(model, None, energy=1.0, min_rank=2)
    assert set(ranks.values()) == {2}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_exported_adapter_round_trips_through_peft(tmp_path, fresh_seed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grit_kernels.models import tiny_llama_config

    cfg = tiny_llama_config(num_layers=2)
    torch.manual_seed(fresh_seed % 1000)
    base = AutoModelForCausalLM.from_config(cfg)
    fresh_base = copy.deepcopy(base)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        base,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    full = lora_parameter_count(model)
    pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0))
    ids = torch.randint(0, 512, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    pre.step()
    model.zero_grad()
    ranks = compress_adapter(model, pre, energy=0.6)
    small = lora_parameter_count(model)
    assert small < full and model.peft_config["default"].rank_pattern == ranks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == small
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path)
    assert lora_parameter_count(loaded) == 0  # inference mode: frozen, but present
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) == small
    for name, module in loaded.named_modules():
        if hasattr(module, "r") and "default" in getattr(module, "r", {}):
            key = name.removeprefix("base_model.model.")
            assert module.r["default"] == ranks[key] == module.lora_A["default"].weight.shape[0]
    with torch.no_grad():
        ref, out = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (out - ref).norm() / ref.norm() < 1e-6


@pytest.mark.parametrize("sides", ["one_sided", "two_sided"])
def test_preconditioner_follows_the_new_basis(fresh_seed, sides):
    """Carried factors (T H T^T, U^T D U) equal the factors measured afresh in the new basis; the step
    then runs at the new rank with an optimizer built before the cut (its state reset, params swapped)."""
    model = one_layer_lora(fresh_seed)
    pre = gk.GritPreconditioner(
        model, gk.GritConfig(warmup_steps=0, ema_decay=0.0, update_freq=1, kl_clip=None)
    )
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    x, w = anisotropic_inputs(fresh_seed), torch.randn(D_OUT)
    (model(x) * w).sum().div(ROWS).backward()
    opt.step()  # the optimizer now has state for the old A, B
    opt.zero_grad()
    measure_statistics(model, pre, x, w)  # factors of the current weights
    ranks = compress_adapter(model, pre, energy=0.9, sides=sides, optimizer=opt)
    k = ranks["fc"]
    assert pre.bank.module_ranks == [k] and pre.modules[0].lora_A.shape == (k, D_IN)
    carried = pre.bank.factor[:, 0, :k, :k].clone()
    new_A, new_B, _ = layer_weights(model)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is new_A for p in params) and any(p is new_B for p in params)
    assert new_A not in opt.state and new_B not in opt.state
    measure_statistics(model, pre, x, w)
    fresh = pre.bank.factor[:, 0, :k, :k]
    for which in (FORWARD, BACKWARD):
        err = (carried[which] - fresh[which]).norm() / fresh[which].norm()
        assert err < 1e-4, (which, err)
    (model(x) * w).sum().div(ROWS).backward()
    opt.step()
    assert new_A in opt.state and torch.isfinite(new_A).all()


def test_budget_allocates_rank_units_by_energy(fresh_seed):
    model = small_llama(num_layers=2, seed=fresh_seed % 1000, r=8)
    spectra = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            spectra[name.removeprefix("base_model.model.")] = truncation_basis(
                A, B, None, module.scaling["default"]
            ).energies
    budget = 40
    uniform = sum(e[budget // len(spectra) :].sum() for e in spectra.values())
    ranks = compress_adapter(model, None, budget=budget, min_rank=2)
    assert sum(ranks.values()) == budget and min(ranks.values()) >= 2 and max(ranks.values()) <= 8
    assert set(ranks) == set(spectra)
    discarded = sum(spectra[n][k:].sum() for n, k in ranks.items())
    assert discarded <= uniform + 1e-9


def test_bad_arguments_raise():
    model = small_llama(num_layers=1, r=4)
    for kwargs in ({"energy": 0.0}, {"energy": 1.5}, {"min_rank": 0}, {"budget": 3}, {"sides": "both"}):
        with pytest.raises(ValueError):
            compress_adapter(model, None, **kwargs)


# --------------------------------------------------------------------------------------------- in training
def train_steps(model, opt, ids, n):
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("sides", ["one_sided", "two_sided"])
def test_reprojection_keeps_the_function(fresh_seed, sides):
    model = small_llama(num_layers=2, seed=fresh_seed % 1000, r=8)
    cfg = gk.GritConfig(
        warmup_steps=0, update_freq=1, reprojection=sides, reprojection_freq=1000, reprojection_start=1000
    )
    pre = gk.GritPreconditioner(model, cfg)
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    ids = torch.randint(0, 512, (2, 12))
    train_steps(model, opt, ids, 2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    old = [m.lora_A for m in pre.modules]
    ranks = pre.rank_adapter.reproject(opt)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).norm() / before.norm() < 1e-5
    assert set(ranks.values()) == {8} and all(m.lora_A is not o for m, o in zip(pre.modules, old))
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in params for p in pre.parameters()) and not any(
        p in opt.state for p in pre.parameters()
    )
    # the re-based forward factor is H' = T H T^T, close to the identity for the two-sided basis too
    train_steps(model, opt, ids, 1)
    assert all(torch.isfinite(p).all() for p in pre.parameters())


@pytest.mark.parametrize("schedule", ["linear", "cosine", "adaptive"])
def test_rank_schedule_shrinks_real_parameters_during_training(schedule):
    model = small_llama(num_layers=1, r=8)
    cfg = gk.GritConfig(
        warmup_steps=0,
        update_freq=1,
        reprojection="one_sided",
        reprojection_freq=1,
        reprojection_start=1,
        rank_schedule=schedule,
        rank_start=1.0,
        rank_end=0.5,
        rank_schedule_steps=3,
        rank_energy=0.999,
    )
    pre = gk.GritPreconditioner(model, cfg)
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    ids = torch.randint(0, 512, (2, 12))
    full = lora_parameter_count(model)
    train_steps(model, opt, ids, 4)
    ranks = [m.lora_A.shape[0] for m in pre.modules]
    assert pre.bank.module_ranks == ranks and model.peft_config["default"].rank_pattern
    if schedule == "adaptive":
        assert all(4 <= k <= 8 for k in ranks)
    else:
        assert ranks == [4] * 7
    assert [k for _, k in pre.rank_adapter.history] == sorted(
        (k for _, k in pre.rank_adapter.history), reverse=True
    )
    assert sum(
        p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad
    ) == lora_parameter_count(model)
    assert lora_parameter_count(model) <= full


def test_schedule_values():
    from grit_kernels.compress import schedule_fraction, scheduled_rank

    assert [schedule_fraction("linear", t) for t in (0, 0.25, 1, 2)] == [0.0, 0.25, 1.0, 1.0]
    assert schedule_fraction("cosine", 0.5) == pytest.approx(0.5) and schedule_fraction("cosine", 0.25) < 0.25
    cfg = gk.GritConfig(
        reprojection="one_sided",
        rank_schedule="linear",
        reprojection_start=10,
        rank_schedule_steps=20,
        rank_start=1.0,
        rank_end=0.25,
    )
    assert [scheduled_rank(16, s, cfg) for s in (0, 10, 15, 20, 99)] == [16, 16, 10, 4, 4]
    with pytest.raises(ValueError):
        gk.GritConfig(reprojection="off", rank_schedule="cosine")
    with pytest.raises(ValueError):
        gk.GritConfig(reprojection="one_sided", rank_schedule="linear", rank_start=0.3, rank_end=0.6)
    with pytest.raises(ValueError):
        gk.GritConfig(reprojection="one_sided", rank_schedule="sqrt")


def test_rotated_optimizer_state_keeps_first_moment_pairings(fresh_seed):
    """``optimizer_state="rotate"``: exp_avg maps like a gradient, so <m', W'> = <m, W> under an exact
    re-basing (energy 1.0, full rank); ``step`` is kept and exp_avg_sq stays non-negative."""
    model = one_layer_lora(fresh_seed)
    pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0, update_freq=1, kl_clip=None))
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    x, w = anisotropic_inputs(fresh_seed), torch.randn(D_OUT)
    for _ in range(2):
        (model(x) * w).sum().div(ROWS).backward()
        opt.step()
        opt.zero_grad()
    A, B, _ = layer_weights(model)
    pairs = [(opt.state[p]["exp_avg"].double() * p.detach().double()).sum() for p in (A, B)]
    steps = [opt.state[p]["step"].clone() for p in (A, B)]
    with pytest.raises(ValueError):
        compress_adapter(model, pre, energy=1.0, optimizer=opt, optimizer_state="keep")
    compress_adapter(model, pre, energy=1.0, optimizer=opt, optimizer_state="rotate")
    new_A, new_B, _ = layer_weights(model)
    assert new_A is not A and new_A.shape == A.shape
    for p, pair, step in zip((new_A, new_B), pairs, steps, strict=True):
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and torch.equal(state["step"], step)
        assert (state["exp_avg_sq"] >= 0).all()
        rotated = (state["exp_avg"].double() * p.detach().double()).sum()
        assert abs(rotated - pair) <= 1e-4 * abs(pair) + 1e-9
    (model(x) * w).sum().div(ROWS).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in (new_A, new_B))


def test_schedule_rebases_only_the_modules_it_cuts():
    model = small_llama(num_layers=1, r=8)
    cfg = gk.GritConfig(
        warmup_steps=0, update_freq=1, reprojection="one_sided", reprojection_freq=1, reprojection_start=1,
        rank_schedule="linear", rank_end=0.5, rank_schedule_steps=20, reprojection_optimizer_state="rotate",
    )
    pre = gk.GritPreconditioner(model, cfg)
    opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), pre)
    ids = torch.randint(0, 512, (2, 12))
    train_steps(model, opt, ids, 1)  # step 1: t = 0, k = r: nothing is re-based
    before = [m.lora_A for m in pre.modules]
    train_steps(model, opt, ids, 1)  # step 2: k = round(8 * (1 - 0.5 / 19)) = 8 still
    assert all(m.lora_A is b for m, b in zip(pre.modules, before, strict=True))
    train_steps(model, opt, ids, 3)  # step 5: k = round(8 * (1 - 0.5 * 4 / 19)) = 7
    assert all(m.lora_A.shape[0] == 7 and m.lora_A in opt.state for m in pre.modules)
    with pytest.raises(ValueError):
        gk.GritConfig(reprojection_optimizer_state="keep")
