"""gk.fuse: block-level fused LoRA agrees with PEFT (forward, loss, every LoRA gradient, GRIT factors), for the
Llama family and Gemma/Gemma2 (whose Functions are tested in test_fused_gemma.py)."""

import pytest
import torch
from helpers import gemma_model, small_llama

import grit_kernels as gk
from grit_kernels.fused import patch
from grit_kernels.models import build_lora_model, tiny_llama_config

FP32_RTOL = 1e-5  # fused vs PEFT, fp32: same math, different summation order
BF16_RTOL = 3e-2  # bf16 base weights: PEFT runs LoRA in fp32, fused in bf16 (the activation dtype)


def tiny_config(arch: str, num_layers: int = 2):
    from transformers import MistralConfig, Qwen2Config

    common = dict(  # noqa: C408 (keyword form mirrors the HF config signature)
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return tiny_llama_config(num_layers=num_layers)
    if arch == "mistral":
        return MistralConfig(sliding_window=8, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)  # q/k/v carry (frozen) biases
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(head_dim=16, **common)  # RMSNorm on q and k over the head dim
    raise ValueError(arch)


def lora_model(arch="llama", num_layers=2, seed=0, **kwargs):
    if arch.startswith("gemma"):  # random norm weights as well (helpers.gemma_model)
        return gemma_model(arch, num_layers, seed, **kwargs)
    kwargs.setdefault("init_lora_weights", False)  # random B: every LoRA gradient is nonzero
    return build_lora_model(tiny_config(arch, num_layers), seed=seed, **kwargs)


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def batch(seed=0, rows=2, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # one padded row
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in lora_params(model).items()}
    return out.logits.detach(), out.loss.detach(), grads


def enable_checkpointing(model, mode):
    if mode is None:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    if mode == "reentrant":
        model.enable_input_require_grads()


CASES = [(a, c) for a in ("llama", "mistral", "qwen2", "gemma", "gemma2") for c in (None, "non-reentrant")] + [
    ("llama", "reentrant"),
    ("gemma2", "reentrant"),
]


@pytest.mark.parametrize("quantize_4bit", [False, True], ids=["plain", "nf4"])
@pytest.mark.parametrize(("arch", "checkpointing"), CASES)
def test_fused_matches_peft(arch, quantize_4bit, checkpointing):
    model = lora_model(arch, quantize_4bit=quantize_4bit)
    model.train()
    enable_checkpointing(model, checkpointing)
    inputs = batch()
    logits, loss, grads = run(model, inputs)
    report = gk.fuse(model)
    assert report.summary == "fused 2/2 blocks (14 LoRA modules)"
    assert report.base_stack_blocks == 2
    calls = []
    original = patch._fused_decoder_body
    try:  # the fused decoder forward runs (recomputed in backward when checkpointing)
        patch._fused_decoder_body = lambda *a, **k: calls.append(1) or original(*a, **k)
        f_logits, f_loss, f_grads = run(model, inputs)
    finally:
        patch._fused_decoder_body = original
    assert len(calls) == (2 if checkpointing is None else 4)
    assert rel(f_loss, loss) < FP32_RTOL
    assert rel(f_logits, logits) < FP32_RTOL
    assert f_grads.keys() == grads.keys() and len(grads) == 28
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert rel(f_grads[name], g) < FP32_RTOL, name
    gk.unfuse(model)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fused_bf16_base_within_bounds(arch):
    model = lora_model(arch, dtype=torch.bfloat16)
    inputs = batch()
    logits, loss, grads = run(model, inputs)
    gk.fuse(model)
    f_logits, f_loss, f_grads = run(model, inputs)
    assert f_logits.dtype == logits.dtype
    assert rel(f_loss, loss) < BF16_RTOL
    assert rel(f_logits.float(), logits.float()) < BF16_RTOL
    for name, g in grads.items():
        assert f_grads[name].dtype == torch.float32
        assert rel(f_grads[name], g) < BF16_RTOL, name


def grit_steps(model, steps=3, seed=0, pre=None):
    """GRIT around SGD: rounding-level differences stay rounding-level over the steps. (Around AdamW,
    whose first steps are ~lr * sign(g), they grow on near-zero gradient entries: measured 3e-4 relative
    after one step for a 1e-7 difference in the gradients, with the fused RMSNorm's backward.)"""
    model.train()
    if pre is None:
        pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0, update_freq=1))
    opt = gk.GritOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), pre)
    stats = []
    for s in range(steps):
        model(**batch(seed + s)).loss.backward()
        stats.append((pre.bank.stat_sum.clone(), pre.bank.rows.clone()))
        opt.step()
        opt.zero_grad()
    return pre, stats


@pytest.mark.parametrize("order", ["fuse-first", "grit-first"])
@pytest.mark.parametrize("quantize_4bit", [False, True], ids=["plain", "nf4"])
def test_grit_factors_and_steps_equal_with_fuse(order, quantize_4bit):
    plain = lora_model("llama", quantize_4bit=quantize_4bit, seed=3)
    fused = lora_model("llama", quantize_4bit=quantize_4bit, seed=3)
    before = {n: p.detach().clone() for n, p in lora_params(fused).items()}
    pre_plain, stats_plain = grit_steps(plain)
    if order == "fuse-first":
        gk.fuse(fused)
        pre_fused, stats_fused = grit_steps(fused)
    else:
        pre_fused = gk.GritPreconditioner(fused, gk.GritConfig(warmup_steps=0, update_freq=1))
        gk.fuse(fused)
        pre_fused, stats_fused = grit_steps(fused, pre=pre_fused)
    for step, ((s_p, r_p), (s_f, r_f)) in enumerate(zip(stats_plain, stats_fused)):
        assert torch.equal(r_f, r_p)
        assert rel(s_f, s_p) < FP32_RTOL, step
    assert rel(pre_fused.bank.factor, pre_plain.bank.factor) < FP32_RTOL
    # the inverse amplifies the factors' rounding by their condition number (measured ~80 here)
    assert rel(pre_fused.bank.inverse, pre_plain.bank.inverse) < 1e-4
    for name, p in lora_params(fused).items():
        assert not torch.equal(p, before[name]), f"{name} did not move"
        assert rel(p, lora_params(plain)[name]) < FP32_RTOL, name


def test_statistics_once_per_micro_batch_under_checkpointing():
    ref = lora_model("llama", seed=5)
    ckpt = lora_model("llama", seed=5)
    enable_checkpointing(ckpt, "non-reentrant")
    for m in (ref, ckpt):
        gk.fuse(m)
    _, stats_ref = grit_steps(ref, steps=1)
    _, stats_ckpt = grit_steps(ckpt, steps=1)
    assert torch.equal(stats_ckpt[0][1], stats_ref[0][1])
    assert stats_ref[0][1].sum() > 0
    assert rel(stats_ckpt[0][0], stats_ref[0][0]) < FP32_RTOL


def test_forward_without_backward_adds_nothing_and_no_grad_works():
    model = lora_model("llama")
    pre = gk.GritPreconditioner(model, gk.GritConfig())
    gk.fuse(model)
    model.eval()
    with torch.no_grad():
        fused_logits = model(**batch()).logits
    model(**batch())  # graph dropped
    assert pre.bank.accumulators.abs().sum() == 0
    gk.unfuse(model)
    with torch.no_grad():
        assert rel(model(**batch()).logits, fused_logits) < FP32_RTOL


def test_report_counts_and_reasons():
    report = gk.fuse(lora_model("llama", num_layers=3))
    assert (len(report.fused_blocks), report.num_blocks, report.fused_modules) == (3, 3, 21)
    assert not report.unfused
    assert (report.base_stack_blocks, report.rms_norms, report.kernels) == (
        3,
        7,
        "torch",
    )  # 2 per block + final
    assert str(report) == (
        "fused 3/3 blocks (21 LoRA modules)\n"
        "  base stack (torch): 7 RMSNorm modules; RoPE and residual adds fused in 3/3 blocks"
    )

    dropout = lora_model("llama", dropout=0.1)
    report = gk.fuse(dropout)
    assert report.summary == "fused 0/2 blocks (0 LoRA modules); 14 LoRA modules keep PEFT's path"
    assert len(report.unfused) == 4 and all("lora_dropout" in r for r in report.unfused.values())
    assert not gk.fused.patch.is_fused(dropout)

    qv = lora_model("llama", targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    report = gk.fuse(qv)
    assert report.fused_modules == 6 and report.fused_blocks == []
    assert all(
        "k_proj has no LoRA adapter" in r for n, r in report.unfused.items() if n.endswith("self_attn")
    )
    assert "2 x k_proj has no LoRA adapter" in str(report)

    dora = lora_model("llama", use_dora=True)
    assert gk.fuse(dora).fused_modules == 0

    with pytest.raises(RuntimeError, match="already fused"):
        gk.fuse(qv)
    assert gk.fuse(torch.nn.Linear(3, 3)).num_blocks == 0


def test_unfuse_round_trip():
    model = lora_model("llama")
    forwards = {n for n, m in model.named_modules() if "forward" in m.__dict__}
    inputs = batch()
    logits, _, grads = run(model, inputs)
    gk.fuse(model)
    assert {n for n, m in model.named_modules() if "forward" in m.__dict__} != forwards
    gk.unfuse(model)
    assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == forwards
    assert not any(k.startswith("_grit") for m in model.modules() for k in m.__dict__)
    u_logits, _, u_grads = run(model, inputs)
    assert torch.equal(u_logits, logits)
    assert all(torch.equal(u_grads[n], g) for n, g in grads.items())
    # a preconditioner keeps capturing after unfuse, and its remove() leaves a fused model fused
    pre = gk.GritPreconditioner(model, gk.GritConfig())
    gk.fuse(model)
    pre.remove()
    assert gk.fused.patch.is_fused(model)
    f_logits, _, _ = run(model, inputs)
    assert rel(f_logits, logits) < FP32_RTOL
    gk.unfuse(model)
    assert not any(k.startswith("_grit") for m in model.modules() for k in m.__dict__)


def test_saved_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora_model("llama", seed=7)
    gk.fuse(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**batch()).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(**batch()).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_config(tiny_config("llama"))
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        got = loaded(**batch()).logits
    assert rel(got, expected) < FP32_RTOL


def test_fused_small_llama_helper_model_trains_with_adamw():
    model = small_llama(num_layers=2, seed=8)
    gk.fuse(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_fused_matches_peft_with_per_module_scales_and_rslora():
    """q/k/v (and gate/up) with different LoRA scales: the scales are folded per block."""
    model = lora_model("llama", alpha_pattern={"k_proj": 8, "up_proj": 4}, use_rslora=True)
    inputs = batch()
    logits, loss, grads = run(model, inputs)
    gk.fuse(model)
    f_logits, f_loss, f_grads = run(model, inputs)
    assert rel(f_loss, loss) < FP32_RTOL and rel(f_logits, logits) < FP32_RTOL
    for name, g in grads.items():
        assert rel(f_grads[name], g) < FP32_RTOL, name


@pytest.mark.parametrize(
    "eager_grams,batched",
    [(True, False), (False, False), (False, True)],
    ids=["op-per-record", "one-op-at-flush (CPU)", "one-pass-at-flush (CUDA)"],
)
def test_recorder_matches_per_module_capture(eager_grams, batched):
    """Every recorder strategy gives the per-module statistics of CaptureSlot.capture (float64 reference)."""
    from grit_kernels.bank import FactorBank
    from grit_kernels.layers import StatsRecorder

    n, r, groups = 40, 4, [(0, 1, 2), (3,), (5, 6), (4,)]  # out of order, like a backward pass
    bank = FactorBank([r] * 7)
    recorder = StatsRecorder(eager_grams=eager_grams, batched=batched)
    recorder._queued = True  # as inside a backward: everything waits for the flush at its end
    expected = torch.zeros(2, 7, r, r, dtype=torch.float64)
    expected_rows = torch.zeros(7, dtype=torch.float64)
    for indices in groups:
        h = torch.randn(n, len(indices) * r)
        delta = torch.randn(n, len(indices) * r)
        delta[: 5 + indices[0]] = 0  # rows without gradient (padding), a different number per group
        delta[-1, :r] = 1e-12  # rounding noise in the first module of the group: no gradient either
        recorder.record(bank, indices, h, delta)
        for j, m in enumerate(indices):
            hm, dm = h[:, j * r : (j + 1) * r].double(), delta[:, j * r : (j + 1) * r].double()
            carries = dm.norm(dim=1) > 1e-6 * dm.norm(dim=1).max()
            expected[0, m] += hm[carries].T @ hm[carries]
            expected[1, m] += dm.T @ dm
            expected_rows[m] += carries.sum()
    recorder.flush()
    assert torch.equal(bank.rows.double(), expected_rows)
    assert rel(bank.stat_sum, expected) < 1e-6


def test_disabled_adapter_and_switched_adapter_take_peft_path():
    model = lora_model("llama")
    model.eval()
    inputs = batch()
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).logits
    gk.fuse(model)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(**inputs).logits, base)
        assert rel(model(**inputs).logits, base) > 1e-3  # the adapter is back on


@pytest.mark.parametrize("quantize_4bit", [False, True], ids=["plain", "nf4"])
def test_fused_under_bf16_autocast_within_bounds(quantize_4bit):
    """fp32 weights under bf16 autocast (the CUDA recipe, on CPU): bf16-level agreement, fp32 LoRA grads."""
    model = lora_model("llama", quantize_4bit=quantize_4bit)
    inputs = batch()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)
        out.loss.backward()
        return out.loss.detach().float(), {n: p.grad.clone() for n, p in lora_params(model).items()}

    loss, grads = step()
    gk.fuse(model)
    pre = gk.GritPreconditioner(model, gk.GritConfig())
    f_loss, f_grads = step()
    assert rel(f_loss, loss) < BF16_RTOL
    for name, g in grads.items():
        assert f_grads[name].dtype == torch.float32 and rel(f_grads[name], g) < BF16_RTOL, name
    assert (pre.bank.rows > 0).all() and torch.isfinite(pre.bank.stat_sum).all()
