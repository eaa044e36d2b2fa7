"""gk.fuse on Gemma and Gemma2: the (1 + w) fp32 RMSNorm Function and the GeGLU MLP Function against HF's
modules and the float64 oracles in grit_kernels.reference; whole fused decoder blocks (Gemma2: sandwich
norms, soft-capped sliding-window attention kept as HF's code) against PEFT, plain and NF4, with and
without checkpointing, padded and packed; GRIT's factors with and without fuse; the report; unfuse."""

import functools
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_GEMMA2, gemma_model
from test_fused import (
    FP32_RTOL,
    batch,
    enable_checkpointing,
    grit_steps,
    lora_params,
    rel,
    run,
)
from test_fused_base_stack import (
    autograd_of,
    block_causal_mask,
    check_fused_mlp,
    packed_batch,
    packed_positions,
    padded_batch,
)

import grit_kernels as gk
from grit_kernels import reference
from grit_kernels.fused import base_stack, patch
from grit_kernels.models import build_lora_model

ARCHS = ["gemma", "gemma2"]


def blocks(model):
    return model.base_model.model.model.layers


# ----------------------------------------------------------------------------- the Functions
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_matches_hf_and_float64(dtype, residual):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    d, eps = 48, 1e-6
    x = (torch.randn(3, 7, d) * 3 + 0.5).to(dtype)
    res = torch.randn(3, 7, d).to(dtype) if residual else None
    g = torch.randn(3, 7, d)
    hf = GemmaRMSNorm(d, eps=eps).to(dtype)
    with torch.no_grad():
        hf.weight.normal_()
    w = hf.weight.detach()

    def ours(x, w, *r):
        return base_stack.gemma_rms_norm(x, w, eps, *r)

    def theirs(x, w, *r):
        out = torch.func.functional_call(hf, {"weight": w}, (x,))
        return out + r[0] if r else out

    inputs = [x, w] + ([res] if residual else [])
    y, grads = autograd_of(ours, inputs, g)
    y_hf, grads_hf = autograd_of(theirs, inputs, g)
    assert y.dtype == dtype and all(a.dtype == dtype for a in grads)
    y64, grads64 = autograd_of(
        lambda x, w, *r: reference.rms_norm(x, 1 + w, eps) + (r[0] if r else 0),
        [t.double() for t in inputs],
        g.double(),
    )
    for ours_t, hf_t, ref_t in ((y, y_hf, y64), *zip(grads, grads_hf, grads64)):
        assert ours_t.abs().sum() > 0
        if dtype == torch.float32:
            assert rel(ours_t, hf_t) < FP32_RTOL
            assert rel(ours_t, ref_t) < FP32_RTOL
        else:  # the forward does HF's ops in HF's order; the backward rounds once, in fp32
            assert rel(ours_t.float(), hf_t.float()) < 1e-2
            assert rel(ours_t.float(), ref_t) < 1e-2
    if dtype == torch.bfloat16:
        assert torch.equal(y, y_hf)


def test_gemma_rms_norm_weight_gradient_only_when_needed():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16)
    base_stack.gemma_rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is None


@pytest.mark.parametrize(
    ("act", "kind"),
    [("hf", "gelu_tanh"), (torch.nn.GELU(approximate="tanh"), "gelu_tanh"), (torch.nn.GELU(), "gelu")],
    ids=["GELUTanh", "nn.GELU-tanh", "nn.GELU-erf"],
)
def test_fused_geglu_matches_hf_mlp_and_float64(act, kind):
    model = gemma_model("gemma", num_layers=1, seed=4)
    mlp = blocks(model)[0].mlp
    if act != "hf":
        mlp.act_fn = act
    assert patch._activation(mlp.act_fn) == kind
    approximate = "tanh" if kind == "gelu_tanh" else "none"
    check_fused_mlp(model, mlp, functools.partial(reference.geglu_mlp, approximate=approximate))


def test_activations_that_are_not_computed_exactly_keep_peft_path():
    from transformers.activations import ACT2FN, GELUTanh

    assert patch._activation(ACT2FN["gelu_new"]) is None  # tanh GELU written out: other rounding
    assert patch._activation(GELUTanh(use_gelu_tanh_python=True)) is None
    assert patch._activation(ACT2FN["gelu"]) == "gelu" and patch._activation(ACT2FN["silu"]) == "silu"
    model = gemma_model("gemma", config_overrides={"hidden_act": "gelu_new"})
    report = gk.fuse(model)
    assert report.summary == "fused 0/2 blocks (8 LoRA modules); 6 LoRA modules keep PEFT's path"
    assert set(report.unfused) == {f"base_model.model.model.layers.{i}.mlp" for i in range(2)}
    assert all("activation NewGELUActivation" in r for r in report.unfused.values())
    assert report.base_stack_blocks == 0 and report.rms_norms == 5  # attention part-level, norms fused
    inputs = batch()
    gk.unfuse(model)
    logits, loss, grads = run(model, inputs)
    gk.fuse(model)
    f_logits, f_loss, f_grads = run(model, inputs)
    assert rel(f_loss, loss) < FP32_RTOL and rel(f_logits, logits) < FP32_RTOL
    assert all(rel(f_grads[n], g) < FP32_RTOL for n, g in grads.items())


def test_packed_eager_attention_matches_hf_eager_and_float64():
    """Per-sequence eager attention (with and without Gemma2's soft-capping) against HF's Gemma2
    eager_attention_forward over the whole packed row with its additive block-causal mask."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    pos = packed_positions([[5, 9, 2], [16]])
    allowed = block_causal_mask(pos)
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    segments = base_stack.packed_segments(mask, pos)
    assert segments == [[(0, 5), (5, 14), (14, 16)], [(0, 16)]]
    q, k, v = 3 * torch.randn(2, 4, 16, 8), 3 * torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    g = torch.randn(2, 16, 4, 8)
    scale, seg = 8**-0.5, torch.cumsum(pos == 0, dim=-1)
    module = SimpleNamespace(num_key_value_groups=2, training=False)
    for softcap in (None, 2.0):  # 2.0: the scores (|z| up to ~20) are capped hard

        def ours(q, k, v, softcap=softcap):
            return base_stack.packed_eager_attention(q, k, v, segments, scale, softcap)

        def theirs(q, k, v, softcap=softcap):
            return eager_attention_forward(module, q, k, v, mask, scaling=scale, softcap=softcap)[0]

        def oracle(q, k, v, softcap=softcap):
            return reference.packed_causal_attention(q, k, v, seg, scale, softcap).transpose(1, 2)

        out, grads = autograd_of(ours, [q, k, v], g)
        out_hf, grads_hf = autograd_of(theirs, [q, k, v], g)
        out64, grads64 = autograd_of(oracle, [q.double(), k.double(), v.double()], g.double())
        for mine, hf, ref in ((out, out_hf, out64), *zip(grads, grads_hf, grads64)):
            assert mine.abs().sum() > 0
            assert rel(mine, hf) < FP32_RTOL, softcap
            assert rel(mine, ref) < FP32_RTOL, softcap
    capped = base_stack.packed_eager_attention(q, k, v, segments, scale, 2.0)
    assert rel(capped, base_stack.packed_eager_attention(q, k, v, segments, scale)) > 1e-2  # it bites


def test_packed_segments_takes_additive_masks_of_zero_and_minimum_only():
    pos = packed_positions([[6, 10]])
    allowed = block_causal_mask(pos)
    lowest = torch.finfo(torch.float32).min
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, lowest)
    assert base_stack.packed_segments(mask, pos) == [[(0, 6), (6, 16)]]
    biased = mask.clone()
    biased[..., 3, 1] = -0.5  # an attention bias (ALiBi-like): not a pure mask
    assert base_stack.packed_segments(biased, pos) is None
    window = block_causal_mask(pos, window=4)
    assert base_stack.packed_segments(torch.zeros(window.shape).masked_fill_(~window, lowest), pos) is None
    assert base_stack.packed_segments(mask.masked_fill(~allowed, float("-inf")), pos) is None


# ----------------------------------------------------------------------------- whole models vs PEFT
#: (arch, attention implementation) -> packed-row attention calls per forward (SDPA, eager): per sequence
#: in every layer, except Gemma2's sliding layer 0 (window 8 < the 12-token sequence: its mask is not
#: block-causal, so HF's masked eager attention runs there)
PACKED_CALLS = {("gemma", "sdpa"): (2, 0), ("gemma", "eager"): (0, 2), ("gemma2", "eager"): (0, 1)}


@pytest.mark.parametrize("inputs", ["padded", "packed"])
@pytest.mark.parametrize(("arch", "impl"), list(PACKED_CALLS))
def test_fused_gemma_decoder_blocks_match_peft_and_unfuse_round_trips(arch, impl, inputs):
    model = gemma_model(arch, seed=2, config_overrides={"attn_implementation": impl})
    assert model.base_model.model.config._attn_implementation == impl
    model.train()
    forwards = {n for n, m in model.named_modules() if "forward" in m.__dict__}
    data = packed_batch() if inputs == "packed" else padded_batch()
    logits, loss, grads = run(model, data)
    report = gk.fuse(model)
    assert report.base_stack_blocks == 2 and report.rms_norms == (9 if arch == "gemma2" else 5)
    calls = {"sdpa": [], "eager": []}
    originals = base_stack.packed_causal_attention, base_stack.packed_eager_attention
    try:
        patch.packed_causal_attention = lambda *a: calls["sdpa"].append(1) or originals[0](*a)
        patch.packed_eager_attention = lambda *a: calls["eager"].append(1) or originals[1](*a)
        f_logits, f_loss, f_grads = run(model, data)
    finally:
        patch.packed_causal_attention, patch.packed_eager_attention = originals
    expected = PACKED_CALLS[arch, impl] if inputs == "packed" else (0, 0)
    assert (len(calls["sdpa"]), len(calls["eager"])) == expected
    assert rel(f_loss, loss) < FP32_RTOL
    assert rel(f_logits, logits) < FP32_RTOL
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert rel(f_grads[name], g) < FP32_RTOL, name
    gk.unfuse(model)
    assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == forwards
    assert not any(k.startswith("_grit") for m in model.modules() for k in m.__dict__)
    u_logits, _, u_grads = run(model, data)
    assert torch.equal(u_logits, logits)
    assert all(torch.equal(u_grads[n], g) for n, g in grads.items())


def test_gemma2_without_soft_capping_and_window_matches_peft():
    """Gemma2 with attn_logit_softcapping=None and full attention in every layer: other attention kwargs."""
    overrides = {"attn_logit_softcapping": None, "layer_types": ["full_attention"] * 2}
    model = gemma_model("gemma2", seed=9, config_overrides=overrides)
    assert all(b.self_attn.sliding_window is None for b in blocks(model))
    logits, loss, grads = run(model, batch())
    gk.fuse(model)
    f_logits, f_loss, f_grads = run(model, batch())
    assert rel(f_loss, loss) < FP32_RTOL and rel(f_logits, logits) < FP32_RTOL
    assert all(rel(f_grads[n], g) < FP32_RTOL for n, g in grads.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_gemma_generates_with_kv_cache_like_peft(arch):
    model = gemma_model(arch, seed=3).eval()
    ids = torch.randint(0, 512, (2, 7))
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(input_ids=ids, **kwargs)
        gk.fuse(model)
        got = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- GRIT, report
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
@pytest.mark.parametrize("arch", ARCHS)
def test_grit_factors_and_steps_equal_with_fuse(arch, checkpointing):
    plain = gemma_model(arch, seed=3)
    fused = gemma_model(arch, seed=3)
    enable_checkpointing(fused, checkpointing)
    before = {n: p.detach().clone() for n, p in lora_params(fused).items()}
    pre_plain, stats_plain = grit_steps(plain)
    gk.fuse(fused)
    pre_fused, stats_fused = grit_steps(fused)
    for step, ((s_p, r_p), (s_f, r_f)) in enumerate(zip(stats_plain, stats_fused)):
        assert r_p.sum() > 0 and torch.equal(r_f, r_p), step  # once per micro-batch under checkpointing too
        assert rel(s_f, s_p) < FP32_RTOL, step
    assert rel(pre_fused.bank.factor, pre_plain.bank.factor) < FP32_RTOL
    assert rel(pre_fused.bank.inverse, pre_plain.bank.inverse) < 1e-4  # as test_fused: cond(factor) ~ 1e2
    for name, p in lora_params(fused).items():
        assert not torch.equal(p, before[name]), f"{name} did not move"
        assert rel(p, lora_params(plain)[name]) < FP32_RTOL, name


def test_gemma_report_counts_and_reasons():
    report = gk.fuse(gemma_model("gemma2", num_layers=3))
    assert (len(report.fused_blocks), report.num_blocks, report.fused_modules) == (3, 3, 21)
    assert not report.unfused
    assert str(report) == (
        "fused 3/3 blocks (21 LoRA modules)\n"
        "  base stack (torch): 13 RMSNorm modules; RoPE and residual adds fused in 3/3 blocks"
    )  # 4 per Gemma2 block + final
    report = gk.fuse(gemma_model("gemma", num_layers=3))
    assert (report.base_stack_blocks, report.rms_norms, report.fused_modules) == (3, 7, 21)

    dropout = gemma_model("gemma", dropout=0.1)
    report = gk.fuse(dropout)
    assert report.summary == "fused 0/2 blocks (0 LoRA modules); 14 LoRA modules keep PEFT's path"
    assert all("lora_dropout" in r for r in report.unfused.values()) and len(report.unfused) == 4

    model = gemma_model("gemma2", targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    report = gk.fuse(model)
    assert report.fused_modules == 8 and report.fused_blocks == [] and report.base_stack_blocks == 0
    assert "2 x gate_proj has no LoRA adapter" in str(report)


def test_gemma3_fuses_attention_and_mlp_parts_only():
    """Gemma3 (q/k norms, its own block layout) is not a base-stack family: its attention and GeGLU MLP
    parts are fused inside HF's block forward, and the model still matches PEFT."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(**{k: v for k, v in TINY_GEMMA2.items() if k != "attn_logit_softcapping"})
    model = build_lora_model(config, seed=5, init_lora_weights=False)
    logits, loss, grads = run(model, batch())
    report = gk.fuse(model)
    assert report.summary == "fused 2/2 blocks (14 LoRA modules)"
    assert (report.base_stack_blocks, report.rms_norms) == (0, 0)
    f_logits, f_loss, f_grads = run(model, batch())
    assert rel(f_loss, loss) < FP32_RTOL and rel(f_logits, logits) < FP32_RTOL
    for name, g in grads.items():
        assert g.abs().sum() > 0 and rel(f_grads[name], g) < FP32_RTOL, name


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_fused_gemma2_is_one_graph_with_eager_gradients():
    """torch.compile(fullgraph=True) traces the fused Gemma2 block (GeGLU Function, Gemma RMSNorm
    Function, soft-capped attention) without a graph break, and gives the eager loss and gradients."""
    torch._dynamo.reset()
    model = gemma_model("gemma2", seed=1)
    gk.fuse(model)
    logits, loss, grads = run(model, batch())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    c_logits, c_loss, c_grads = run(compiled, batch())
    assert rel(c_loss, loss) < FP32_RTOL and rel(c_logits, logits) < FP32_RTOL
    assert len(c_grads) == len(grads) == 28
    for name, g in grads.items():
        assert rel(c_grads["_orig_mod." + name], g) < FP32_RTOL, name


@pytest.mark.parametrize(("arch", "per_sequence"), [("llama", 2), ("qwen3", 2), ("mistral", 0)])
def test_llama_family_packed_rows_under_eager_attention_match_peft(arch, per_sequence):
    """The per-sequence eager path serves every fused family under attn_implementation="eager" (Mistral's
    sliding window 8 bites on the 12-token sequence: HF's masked attention there)."""
    from test_fused import tiny_config

    config = tiny_config(arch)
    config._attn_implementation = "eager"
    model = build_lora_model(config, seed=4, init_lora_weights=False)
    logits, loss, grads = run(model, packed_batch(1))
    gk.fuse(model)
    calls = []
    original = base_stack.packed_eager_attention
    try:
        patch.packed_eager_attention = lambda *a: calls.append(1) or original(*a)
        f_logits, f_loss, f_grads = run(model, packed_batch(1))
    finally:
        patch.packed_eager_attention = original
    assert len(calls) == per_sequence
    assert rel(f_loss, loss) < FP32_RTOL and rel(f_logits, logits) < FP32_RTOL
    for name, g in grads.items():
        assert g.abs().sum() > 0 and rel(f_grads[name], g) < FP32_RTOL, name
