"""gk.fuse's base stack: the RMSNorm, RoPE and SwiGLU Functions and the packed (per-sequence) attention
against HF's modules and the float64 oracles in grit_kernels.reference; whole fused decoder blocks of
Llama, Mistral, Qwen2 and Qwen3 against PEFT (padded and packed batches); activation checkpointing."""

import pytest
import torch
from test_fused import FP32_RTOL, enable_checkpointing, lora_model, lora_params, rel, run

import grit_kernels as gk
from grit_kernels import reference
from grit_kernels.fused import base_stack, patch

BF16_RTOL = 2e-2
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def autograd_of(fn, inputs, grad_out):
    """``fn(*inputs)`` and the gradients of ``<fn(*inputs), grad_out>`` w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf_and_float64(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    d, eps = 48, 1e-5
    x = (torch.randn(3, 7, d) * 3 + 0.5).to(dtype)
    w = (torch.randn(d) + 1).to(dtype)
    g = torch.randn(3, 7, d)
    hf = LlamaRMSNorm(d, eps=eps).to(dtype)

    def hf_fn(x, w):
        hf.weight = torch.nn.Parameter(w)
        return hf(x)

    y, (gx, gw) = autograd_of(lambda x, w: base_stack.RMSNormFunction.apply(x, w, eps), [x, w], g)
    y_hf, (gx_hf, gw_hf) = autograd_of(lambda x, w: hf.__class__.forward(_Holder(w, eps), x), [x, w], g)
    y64, (gx64, gw64) = autograd_of(
        lambda x, w: reference.rms_norm(x, w, eps), [x.double(), w.double()], g.double()
    )
    assert y.dtype == y_hf.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    bound = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
    if dtype == torch.float32:
        assert torch.equal(y, y_hf)  # same fp32 ops in the same order
    for ours, hf_, ref in ((y, y_hf, y64), (gx, gx_hf, gx64), (gw, gw_hf, gw64)):
        assert rel(ours, hf_) < bound
        assert rel(ours, ref) < bound
    assert hf_fn is not None


class _Holder(torch.nn.Module):
    """A bare RMSNorm 'self' (weight + variance_epsilon) to call HF's forward with a given weight."""

    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.variance_epsilon = weight, eps


def test_rms_norm_weight_gradient_only_when_needed():
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(16)  # frozen (LoRA): no gradient formed
    base_stack.RMSNormFunction.apply(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is None


def rope_inputs(batch=2, hq=4, hk=2, seq=9, dim=16, seed=0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    g = torch.Generator().manual_seed(seed)
    config = LlamaConfig(hidden_size=hq * dim, num_attention_heads=hq, num_key_value_heads=hk)
    pos = torch.randint(0, 200, (batch, seq), generator=g)
    q = torch.randn(batch, hq, seq, dim, generator=g)
    k = torch.randn(batch, hk, seq, dim, generator=g)
    cos, sin = LlamaRotaryEmbedding(config)(q, pos)
    return q, k, cos, sin


def test_rotary_matches_hf_and_float64():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = rope_inputs()
    gq, gk_ = torch.randn_like(q), torch.randn_like(k)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k)]
        out_q, out_k = fn(*leaves, cos.to(dtype), sin.to(dtype))
        torch.autograd.backward([out_q, out_k], [gq.to(dtype), gk_.to(dtype)])
        return out_q.detach(), out_k.detach(), leaves[0].grad, leaves[1].grad

    ours = grads(base_stack.rotary, torch.float32)
    hf = grads(apply_rotary_pos_emb, torch.float32)

    def ref(q, k, cos, sin):
        return reference.rotary(q, cos.unsqueeze(1), sin.unsqueeze(1)), reference.rotary(
            k, cos.unsqueeze(1), sin.unsqueeze(1)
        )

    ref64 = grads(ref, torch.float64)
    for o, h, r in zip(ours, hf, ref64):
        assert rel(o, h) < FP32_RTOL
        assert rel(o, r) < FP32_RTOL


def test_rotate_writes_every_element_and_unrotate_is_its_transpose_and_inverse():
    q, _, cos, sin = rope_inputs(seed=1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    out = torch.full_like(q, float("nan"))
    base_stack.rotate_(out, q, c, s)
    assert torch.isfinite(out).all()
    g = torch.randn_like(q)
    back = torch.full_like(q, float("nan"))
    base_stack.unrotate_(back, g, c, s)
    assert torch.isfinite(back).all()
    # <unrotate(g), q> == <g, rotate(q)>  (transpose) and unrotate(rotate(q)) == q  (a rotation)
    assert abs((back * q).sum() - (g * out).sum()) < 1e-4 * (g.norm() * q.norm())
    again = torch.full_like(q, float("nan"))
    assert rel(base_stack.unrotate_(again, out, c, s), q) < FP32_RTOL


def check_fused_mlp(model, mlp, reference_mlp):
    """``mlp``'s output and its input and LoRA gradients after ``gk.fuse(model)`` equal HF + PEFT's before it
    and ``reference_mlp(x, gate, up, down)`` (grit_kernels.reference, float64) to FP32_RTOL; none is zero."""
    x = torch.randn(2, 6, 64)
    g = torch.randn(2, 6, 64)
    params = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]

    def grads_of():
        xl = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        y = mlp(xl)
        y.backward(g)
        lora = [p.grad.clone() for m in params for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
        return y.detach(), xl.grad, lora

    y_hf, gx_hf, lora_hf = grads_of()
    gk.fuse(model)
    assert "_grit_fused" in mlp.__dict__
    y, gx, lora = grads_of()

    def ref_fn(x, *ab):
        projs = [
            (m.base_layer.weight.double(), ab[2 * i], ab[2 * i + 1], m.scaling["default"])
            for i, m in enumerate(params)
        ]
        return reference_mlp(x, *projs)

    ab = [t.double() for m in params for t in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    y64, (gx64, *lora64) = autograd_of(ref_fn, [x.double(), *ab], g.double())
    for ours, hf, ref in ((y, y_hf, y64), (gx, gx_hf, gx64), *zip(lora, lora_hf, lora64)):
        assert ours.abs().sum() > 0
        assert rel(ours, hf) < FP32_RTOL
        assert rel(ours, ref) < FP32_RTOL


def test_fused_swiglu_matches_hf_mlp_and_float64():
    model = lora_model("llama", num_layers=1, seed=4)
    check_fused_mlp(model, model.base_model.model.model.layers[0].mlp, reference.swiglu_mlp)


def packed_positions(lengths_per_row):
    rows = [torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row]
    return torch.stack(rows)


def block_causal_mask(position_ids, window=None):
    seg = torch.cumsum(position_ids == 0, dim=-1)
    n = position_ids.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = (seg[:, :, None] == seg[:, None, :]) & (j <= i)
    if window is not None:
        mask &= (i - j) < window
    return mask[:, None]


def test_packed_attention_matches_masked_sdpa_and_float64():
    pos = packed_positions([[5, 9, 2], [16]])
    mask = block_causal_mask(pos)
    segments = base_stack.packed_segments(mask, pos)
    assert segments == [[(0, 5), (5, 14), (14, 16)], [(0, 16)]]
    assert base_stack.packed_segments(mask, pos) is segments  # validated once per mask object
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    g = torch.randn(2, 16, 4, 8)
    scale = 8**-0.5

    def masked(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2)

    out, grads = autograd_of(
        lambda q, k, v: base_stack.packed_causal_attention(q, k, v, segments, scale), [q, k, v], g
    )
    out_m, grads_m = autograd_of(masked, [q, k, v], g)
    seg = torch.cumsum(pos == 0, dim=-1)
    out64, grads64 = autograd_of(
        lambda q, k, v: reference.packed_causal_attention(q, k, v, seg, scale).transpose(1, 2),
        [q.double(), k.double(), v.double()],
        g.double(),
    )
    for ours, m, r in ((out, out_m, out64), *zip(grads, grads_m, grads64)):
        assert rel(ours, m) < FP32_RTOL
        assert rel(ours, r) < FP32_RTOL


def test_packed_segments_refuses_other_masks():
    pos = packed_positions([[6, 10]])
    assert base_stack.packed_segments(block_causal_mask(pos, window=4), pos) is None  # sliding window bites
    padded = block_causal_mask(pos).clone()
    padded[..., 15] = False  # a padded key
    assert base_stack.packed_segments(padded, pos) is None
    assert base_stack.packed_segments(block_causal_mask(pos).float(), pos) is None  # additive (eager) masks
    assert base_stack.packed_segments(None, pos) is None


def packed_batch(seed=0, lengths=(7, 12, 5)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (1, sum(lengths)), generator=g)
    labels = ids.clone()
    labels[0, 0] = -100
    # use_cache=False as data.PackedCollator sets it: with a cache transformers does not detect packing
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": packed_positions([lengths]),
        "use_cache": False,
    }


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


@pytest.mark.parametrize("inputs", ["padded", "packed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_decoder_blocks_match_peft(arch, inputs):
    model = lora_model(arch, seed=2)
    model.train()
    batch = packed_batch() if inputs == "packed" else padded_batch()
    logits, loss, grads = run(model, batch)
    report = gk.fuse(model)
    assert report.base_stack_blocks == 2 and report.rms_norms == 5 + (4 if arch == "qwen3" else 0)
    calls = []
    original = base_stack.packed_causal_attention
    try:  # the packed batch takes the per-sequence attention (the mask is the block-causal one)
        patch.packed_causal_attention = lambda *a: calls.append(1) or original(*a)
        f_logits, f_loss, f_grads = run(model, batch)
    finally:
        patch.packed_causal_attention = original
    if arch == "mistral":
        assert len(calls) == 0  # sliding_window=8 < 12-token sequence: the mask is not block-causal
    else:
        assert len(calls) == (2 if inputs == "packed" else 0)
    assert rel(f_loss, loss) < FP32_RTOL
    assert rel(f_logits, logits) < FP32_RTOL
    assert len(grads) == 28
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert rel(f_grads[name], g) < FP32_RTOL, name
    gk.unfuse(model)
    assert not any(k.startswith("_grit") for m in model.modules() for k in m.__dict__)
    u_logits, _, u_grads = run(model, batch)
    assert torch.equal(u_logits, logits)
    assert all(torch.equal(u_grads[n], g) for n, g in grads.items())


@pytest.mark.parametrize("mode", [None, "non-reentrant", "reentrant"])
def test_fused_decoder_checkpoints_and_counts_statistics_once(mode):
    ref = lora_model("llama", seed=6)
    model = lora_model("llama", seed=6)
    enable_checkpointing(model, mode)
    for m in (ref, model):
        m.train()
        gk.fuse(m)
    pres = [gk.GritPreconditioner(m, gk.GritConfig(warmup_steps=0)) for m in (ref, model)]
    calls = []
    original = patch._fused_decoder_body
    try:
        patch._fused_decoder_body = lambda *a, **k: calls.append(1) or original(*a, **k)
        _, loss, grads = run(model, packed_batch(3))
    finally:
        patch._fused_decoder_body = original
    assert len(calls) == (2 if mode is None else 4)  # 2 blocks; recomputed in backward when checkpointing
    _, ref_loss, ref_grads = run(ref, packed_batch(3))
    assert rel(loss, ref_loss) < FP32_RTOL
    for name, g in ref_grads.items():
        assert rel(grads[name], g) < FP32_RTOL, name
    (bank, rows), (ref_bank, ref_rows) = ((p.bank.stat_sum, p.bank.rows) for p in reversed(pres))
    assert ref_rows.sum() > 0 and torch.equal(rows, ref_rows)
    assert rel(bank, ref_bank) < FP32_RTOL


def test_hooks_on_attention_take_the_part_level_path():
    model = lora_model("llama", seed=1)
    model.train()
    logits, _, grads = run(model, padded_batch())
    gk.fuse(model)
    seen = []
    model.base_model.model.model.layers[0].self_attn.register_forward_hook(
        lambda m, a, o: seen.append(o[0].shape)
    )
    f_logits, _, f_grads = run(model, padded_batch())
    assert seen == [torch.Size([2, 12, 64])]
    assert rel(f_logits, logits) < FP32_RTOL
    assert all(rel(f_grads[n], g) < FP32_RTOL for n, g in grads.items())
    assert lora_params(model)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gemma2"])
def test_trainable_norm_weights_get_peft_gradients(arch):
    """RMSNorm weights trained alongside the adapters (e.g. modules_to_save): the norms inside the
    fused Functions give them the same gradients as HF's modules."""
    model = lora_model(arch, seed=8)
    model.train()
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    for p in norms.values():
        p.requires_grad_(True)
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    batch = packed_batch(5)
    run(model, batch)
    ref = {n: p.grad.clone() for n, p in norms.items()}
    gk.fuse(model)
    run(model, batch)
    assert len(ref) == (9 if arch in ("qwen3", "gemma2") else 5)  # + q/k norms (Qwen3), sandwich norms (Gemma2)
    for name, p in norms.items():
        assert ref[name].abs().sum() > 0, name
        assert rel(p.grad, ref[name]) < FP32_RTOL, name


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_decoder_generates_with_kv_cache_like_peft(arch):
    model = lora_model(arch, seed=3).eval()
    ids = torch.randint(0, 512, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)  # noqa: C408
    with torch.no_grad():
        expected = model.generate(input_ids=ids, **kwargs)
        gk.fuse(model)
        got = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(got, expected)
