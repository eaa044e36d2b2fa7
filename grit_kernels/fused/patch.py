"""``fuse`` / ``unfuse``: route Llama-family decoder blocks through the fused Functions.

A decoder block is a module with a ``self_attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) and an
``mlp`` (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``), as in Llama, Mistral, Qwen2/Qwen3 (SiLU:
SwiGLU) and Gemma/Gemma2 (tanh-approximate GELU: GeGLU). An MLP whose activation the fused MLP would not
compute exactly (e.g. ``gelu_new``, a Python GELU formula) keeps PEFT's path.
Per block, the attention part and the MLP part are fused independently when all their projections
are supported PEFT LoRA layers:

* attention: the attention module's forward first computes q, k, v with one
  :class:`~.functions.FusedProjections` call and leaves each output with its LoRA layer, then runs the
  model's own attention code (RoPE, q/k norms, the attention kernel are untouched); the q/k/v layers
  return the precomputed outputs when called with that very input. ``o_proj`` runs its own
  :class:`~.functions.FusedProjections`.
* MLP: the MLP's forward becomes one :class:`~.functions.FusedSwiGLU` call.
* base stack: every Llama/Mistral/Qwen2/Qwen3 ``RMSNorm`` module runs :func:`~.base_stack.rms_norm`,
  every Gemma/Gemma2 one :func:`~.base_stack.gemma_rms_norm` (one node each). Where the whole decoder
  block is fused and is one of those six families (transformers 5 layout), the block's forward is
  replaced too: :class:`~.functions.FusedQKV` (input RMSNorm and RoPE of q and k inside) -> [Qwen3: q/k
  RMSNorm, then :func:`~.base_stack.rotary`] -> the model's attention function (on CPU with
  padding-free packed rows: causal attention per packed sequence, :func:`~.base_stack.packed_causal_attention`
  under SDPA, :func:`~.base_stack.packed_eager_attention` under eager attention) -> o projection with
  the residual add inside its Function -> :class:`~.functions.FusedSwiGLU` with the post-attention
  RMSNorm and the residual add inside. On CUDA with liger-kernel installed, RMSNorm and RoPE run
  liger's Triton kernels.
  Gemma: the same, but its ``(1 + w)`` fp32 RMSNorm runs as its own Function before FusedQKV /
  FusedSwiGLU (their built-in norm is Llama's). Gemma2: FusedQKV (RoPE inside) -> HF's attention
  function with its soft-capping and sliding window (eager by default; on packed rows whose layer mask
  is block-causal, HF's eager math per sequence, soft-capping included) -> o projection ->
  post-attention norm + residual (one node) -> pre-feedforward norm -> GeGLU MLP -> post-feedforward
  norm + residual (one node).
  The block keeps HF's path (with the part-level fusion above) when module hooks sit on its attention
  or MLP (e.g. output capture), and honours gradient checkpointing itself (transformers checkpoints
  the class ``forward``, which an instance forward would bypass).

Adapters stay plain PEFT parameters (save/load with PEFT as usual). Statistics go to whichever
:class:`~grit_kernels.GritPreconditioner` patched the layers, looked up at backward time, so ``fuse``
and the preconditioner can be created in either order.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import install_dispatch_forward, is_lora_layer, release_dispatch_forward, unsupported_reason
from .base_stack import (
    gemma_rms_norm,
    packed_causal_attention,
    packed_eager_attention,
    packed_segments,
    rms_norm,
    rotary,
    uses_liger,
)
from .functions import FusedProjections, FusedQKV, FusedSwiGLU, ProjectionGroup
from .weights import BlockWeights, clear_cache, weights_unsupported_reason

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: decoder blocks whose whole forward fuse() replaces (transformers 5 layout; others: part-level only)
BASE_STACK_DECODERS = (
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
    "GemmaDecoderLayer",
    "Gemma2DecoderLayer",
)
#: RMSNorm classes routed through the fused RMSNorm: Llama's ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``,
#: or for the names in GEMMA_RMS_NORMS Gemma's ``(x * rsqrt(mean(x^2) + eps) * (1 + weight)).to(dtype)``
RMS_NORMS = (
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "GemmaRMSNorm",
    "Gemma2RMSNorm",
)
GEMMA_RMS_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm")  #: fp32 throughout, scale ``1 + weight``


@dataclass
class FusionReport:
    """What :func:`fuse` did.

    Attributes:
        fused_blocks: names of decoder blocks whose attention and MLP are both fused.
        unfused: ``{block or part name: reason}`` for every block part left on PEFT's path.
        fused_modules: LoRA modules now computed by fused Functions.
        lora_modules: LoRA layers in the model.
        num_blocks: decoder blocks found.
        base_stack_blocks: fused blocks whose whole forward is fused (RMSNorm, RoPE, residual adds).
        rms_norms: RMSNorm modules routed through the fused RMSNorm.
        kernels: what runs RMSNorm / RoPE: ``"torch"`` (our autograd Functions) or ``"liger"``.
    """

    fused_blocks: list[str] = field(default_factory=list)
    unfused: dict[str, str] = field(default_factory=dict)
    fused_modules: int = 0
    lora_modules: int = 0
    num_blocks: int = 0
    base_stack_blocks: int = 0
    rms_norms: int = 0
    kernels: str = "torch"

    @property
    def summary(self) -> str:
        """One line, e.g. ``fused 32/32 blocks (224 LoRA modules)``."""
        line = f"fused {len(self.fused_blocks)}/{self.num_blocks} blocks ({self.fused_modules} LoRA modules)"
        if self.fused_modules < self.lora_modules:
            line += f"; {self.lora_modules - self.fused_modules} LoRA modules keep PEFT's path"
        return line

    def __str__(self) -> str:
        lines = [self.summary]
        if self.rms_norms or self.base_stack_blocks:
            lines.append(
                f"  base stack ({self.kernels}): {self.rms_norms} RMSNorm modules; RoPE and residual adds "
                f"fused in {self.base_stack_blocks}/{self.num_blocks} blocks"
            )
        for reason, count in Counter(self.unfused.values()).items():
            example = next(n for n, r in self.unfused.items() if r == reason)
            lines.append(f"  {count} x {reason} (e.g. {example})")
        return "\n".join(lines)


def _projection_reason(parent: nn.Module, name: str) -> str | None:
    layer = getattr(parent, name, None)
    if layer is None:
        return f"no {name}"
    if not is_lora_layer(layer):
        return f"{name} has no LoRA adapter (fuse needs LoRA on {', '.join(ATTENTION_PROJECTIONS + MLP_PROJECTIONS)})"
    if type(layer).__name__ not in ("Linear", "Linear4bit"):
        return f"{name} is a {type(layer).__name__} LoRA layer (fuse supports Linear and Linear4bit)"
    reason = unsupported_reason(layer)
    if reason is not None:
        return f"{name}: {reason}"
    adapter = layer.active_adapters[0]
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) > 0:
        return f"{name}: lora_dropout > 0 (fuse needs lora_dropout=0)"
    if layer.lora_B[adapter].bias is not None:
        return f"{name}: LoRA bias (lora_bias=True) is not supported"
    if layer.merged:
        return f"{name}: adapter is merged"
    return None


def _part_reason(parent: nn.Module, names: tuple[str, ...]) -> str | None:
    for name in names:
        reason = _projection_reason(parent, name)
        if reason is not None:
            return reason
    layers = [getattr(parent, n) for n in names]
    if len({layer.active_adapters[0] for layer in layers}) != 1:
        return "different active adapters"
    return None


def _activation(act: nn.Module | None) -> str | None:
    """``act``'s kind for :class:`~.functions.FusedSwiGLU` (``"silu"``, ``"gelu_tanh"``, ``"gelu"``), or
    ``None`` when the fused MLP would not compute exactly what ``act`` computes."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if isinstance(act, nn.GELU):
        return {"tanh": "gelu_tanh", "none": "gelu"}.get(act.approximate)
    fn = getattr(act, "act", None)  # transformers' GELUTanh / GELUActivation: F.gelu, or a Python formula
    if name in ("GELUTanh", "PytorchGELUTanh") and isinstance(fn, partial) and fn.func is F.gelu:
        return "gelu_tanh" if fn.keywords == {"approximate": "tanh"} and not fn.args else None
    if name == "GELUActivation" and fn is F.gelu:
        return "gelu"
    return None


def _same_rank(layers) -> bool:
    return len({layer.r[layer.active_adapters[0]] for layer in layers}) == 1


class _StashedOutput:
    """``_grit_fused`` of a q/k/v layer: the output the attention forward computed for input ``x``."""

    def __init__(self):
        self.pending = None

    def __call__(self, layer: nn.Module, x):
        pending = self.pending
        return pending[1] if pending is not None and pending[0] is x else None


class _FusedSingle:
    """``_grit_fused`` of o_proj: its own :class:`FusedProjections` call."""

    def __init__(self, group: ProjectionGroup):
        self.group = group

    def __call__(self, layer: nn.Module, x):
        if not self.group.active():
            return None
        return FusedProjections.apply(x, None, self.group, *self.group.lora_weights())


class _AttentionState:
    def __init__(self, qkv: ProjectionGroup, stashes: list[_StashedOutput]):
        self.qkv, self.stashes = qkv, stashes


def _fused_attention_forward(self: nn.Module, *args, **kwargs):
    state = self.__dict__["_grit_fused"]
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if not state.qkv.active():
        return self._grit_previous_forward(*args, **kwargs)
    qkv = FusedProjections.apply(hidden, None, state.qkv, *state.qkv.lora_weights())
    for stash, out in zip(state.stashes, qkv.split(state.qkv.out_features, dim=-1)):
        stash.pending = (hidden, out)
    try:
        return self._grit_previous_forward(*args, **kwargs)
    finally:
        for stash in state.stashes:
            stash.pending = None


def _fused_mlp_forward(self: nn.Module, x, *args, **kwargs):
    gate_up, down = self.__dict__["_grit_fused"]
    if args or kwargs or not (gate_up.active() and down.active()):
        return self._grit_previous_forward(x, *args, **kwargs)
    return FusedSwiGLU.apply(
        x, None, None, None, gate_up, down, *gate_up.lora_weights(), *down.lora_weights()
    )


def _fused_rms_norm_forward(self: nn.Module, hidden_states):
    return rms_norm(hidden_states, self._parameters["weight"], self.variance_epsilon)


def _fused_gemma_rms_norm_forward(self: nn.Module, x):
    return gemma_rms_norm(x, self._parameters["weight"], self.eps)


class _NormState:
    """``_grit_fused`` of an RMSNorm module routed through :func:`~.base_stack.rms_norm`."""


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class _DecoderState:
    """``_grit_fused`` of a decoder block whose whole forward is fused (see the module docstring)."""

    def __init__(self, block: nn.Module, groups: dict[str, ProjectionGroup]):
        attn = block.self_attn
        self.qkv, self.o, self.gate_up, self.down = (groups[k] for k in ("qkv", "o", "gate_up", "down"))
        d = attn.head_dim
        q_out, k_out, _ = self.qkv.out_features
        self.heads = (q_out // d, k_out // d, d)
        self.norms = (block.input_layernorm, block.post_attention_layernorm)
        #: Gemma2: the attention and MLP outputs are normalised too, before their residual adds
        self.sandwich = hasattr(block, "pre_feedforward_layernorm")
        if self.sandwich:
            self.norms += (block.pre_feedforward_layernorm, block.post_feedforward_layernorm)
        #: Gemma's ``1 + weight`` RMSNorm runs as its own Function (:func:`~.base_stack.gemma_rms_norm`)
        #: before the projections instead of inside FusedQKV / FusedSwiGLU (whose norm is Llama's)
        self.gemma_norms = type(block.input_layernorm).__name__ in GEMMA_RMS_NORMS
        self.softcap = getattr(attn, "attn_logit_softcapping", None)  # Gemma2: tanh soft-capped logits
        self.qk_norms = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else None
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        modeling = sys.modules[type(attn).__module__]
        self.eager_attention = modeling.eager_attention_forward
        self.attention_functions = ALL_ATTENTION_FUNCTIONS
        self.liger = uses_liger(block.input_layernorm.weight.device)  # liger's RMSNorm / RoPE (CUDA)
        self.inner_rope = not hasattr(attn, "q_norm") and not self.liger  # RoPE inside FusedQKV
        self.mistral_window = type(attn).__name__.startswith("Mistral")  # Mistral: config.sliding_window

    def active(self) -> bool:
        return self.qkv.active() and self.o.active() and self.gate_up.active() and self.down.active()

    def attention_kwargs(self, attn: nn.Module) -> dict:
        """The attention function's ``sliding_window`` (and Gemma2's ``softcap``) keywords as the HF
        attention passes them (or none)."""
        kwargs = {}
        if self.mistral_window:
            kwargs["sliding_window"] = getattr(attn.config, "sliding_window", None)
        elif hasattr(attn, "sliding_window"):
            kwargs["sliding_window"] = attn.sliding_window
        if hasattr(attn, "attn_logit_softcapping"):
            kwargs["softcap"] = self.softcap
        return kwargs

    def input_norm(self, i: int, x: torch.Tensor):
        """``(group input, (norm_weight, eps))`` for a Function fed from ``x`` through ``self.norms[i]``:
        the norm goes inside the Function (Llama's RMSNorm on CPU) or runs here first (liger, Gemma)."""
        module = self.norms[i]
        weight = module._parameters["weight"]
        if self.gemma_norms:
            return gemma_rms_norm(x, weight, module.eps), (None, None)
        if self.liger:  # liger's Triton RMSNorm, then the projections
            return rms_norm(x, weight, module.variance_epsilon), (None, None)
        return x, (weight, module.variance_epsilon)


def _model_class(module: nn.Module) -> type:
    """The module's own class: FSDP2's ``fully_shard`` swaps it for a subclass ``FSDP<Name>(FSDPModule, <Name>)``."""
    return next(c for c in type(module).__mro__ if not any(b.__name__ == "FSDPModule" for b in c.__mro__))


def _base_stack_reason(block: nn.Module) -> str | None:
    """``None`` if ``block``'s whole forward can be fused, else why not."""
    cls = _model_class(block)
    if cls.__name__ not in BASE_STACK_DECODERS:
        return f"{cls.__name__} is not one of {', '.join(BASE_STACK_DECODERS)}"
    norms = [getattr(block, "input_layernorm", None), getattr(block, "post_attention_layernorm", None)]
    attn = block.self_attn
    if hasattr(attn, "q_norm"):
        norms += [attn.q_norm, getattr(attn, "k_norm", None)]
    sandwich = hasattr(block, "pre_feedforward_layernorm")
    if sandwich:
        norms += [block.pre_feedforward_layernorm, getattr(block, "post_feedforward_layernorm", None)]
    names = [type(n).__name__ for n in norms]
    if not all(n in RMS_NORMS for n in names):
        return "a norm that is not a standard RMSNorm"
    gemma = {n in GEMMA_RMS_NORMS for n in names}
    if len(gemma) > 1:
        return "Gemma and Llama RMSNorms mixed in one block"
    if (sandwich or hasattr(attn, "attn_logit_softcapping")) and gemma != {True}:
        return "a Gemma2-style block without Gemma RMSNorms"
    params = inspect.signature(cls.forward).parameters
    if "position_embeddings" not in params or "cache" not in params:
        return "decoder forward without (position_embeddings, cache): not the transformers 5 layout"
    if not hasattr(sys.modules[type(attn).__module__], "eager_attention_forward"):
        return "no eager_attention_forward in the model's module"
    return None


def _fused_decoder_forward(self: nn.Module, hidden_states, *args, **kwargs):
    state = self.__dict__["_grit_fused"]
    if args or _hooked(self.self_attn, self.mlp) or not state.active():
        return self._grit_previous_forward(hidden_states, *args, **kwargs)
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
        # what transformers' GradientCheckpointingLayer does around the class forward
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(self, "_can_checkpoint_with_cache", False) and kwargs.get("cache") is not None:
            kwargs["cache"] = None
        return self._gradient_checkpointing_func(partial(_fused_decoder_body, self, **kwargs), hidden_states)
    return _fused_decoder_body(self, hidden_states, **kwargs)


def _fused_decoder_body(
    self: nn.Module,
    hidden_states,
    attention_mask=None,
    position_ids=None,
    cache=None,
    use_cache=False,
    position_embeddings=None,
    **kwargs,
):
    """HF's Llama/Mistral/Qwen2/Qwen3 decoder layer forward, with the fused Functions."""
    state = self.__dict__["_grit_fused"]
    attn = self.self_attn
    cache = kwargs.pop("past_key_values", cache)
    cos, sin = position_embeddings
    x, norm = state.input_norm(0, hidden_states)
    inner_rope = state.inner_rope
    rope = (cos, sin) if inner_rope else (None, None)
    q, k, v = FusedQKV.apply(x, *norm, state.qkv, state.heads, *rope, *state.qkv.lora_weights())
    if state.qk_norms is not None:  # Qwen3: RMSNorm over the head dim before RoPE
        q_norm, k_norm = state.qk_norms
        q = rms_norm(q, q_norm._parameters["weight"], q_norm.variance_epsilon)
        k = rms_norm(k, k_norm._parameters["weight"], k_norm.variance_epsilon)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    if not inner_rope:
        q, k = rotary(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    impl = attn.config._attn_implementation
    segments = None
    if (
        (impl == "eager" or (impl == "sdpa" and state.softcap is None))  # SDPA has no logit soft-capping
        and cache is None
        and q.device.type == "cpu"
        and (attn.attention_dropout == 0 or not attn.training)
        and not torch.compiler.is_compiling()  # the segment check reads the mask on the host
    ):
        segments = packed_segments(attention_mask, position_ids)
    if segments is not None:  # padding-free packed rows: attention per sequence (varlen), no S x S mask
        if impl == "eager":  # HF's eager math (Gemma2: with its soft-capping) per sequence
            out = packed_eager_attention(q, k, v, segments, attn.scaling, state.softcap)
        else:
            out = packed_causal_attention(q, k, v, segments, attn.scaling)
        return _fused_decoder_tail(state, hidden_states, out)
    attention = state.attention_functions.get_interface(impl, state.eager_attention)
    out, _ = attention(
        attn,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        position_ids=position_ids,
        use_cache=use_cache,
        **state.attention_kwargs(attn),
        **kwargs,
    )
    return _fused_decoder_tail(state, hidden_states, out)


def _fused_decoder_tail(state: _DecoderState, hidden_states, out):
    """o projection + residual, RMSNorm, SwiGLU MLP + residual, from the attention output ``out [B, S, H, D]``."""
    out = out.reshape(*hidden_states.shape[:-1], -1)
    if state.sandwich:
        return _sandwich_tail(state, hidden_states, out)
    hidden = FusedProjections.apply(out, hidden_states, state.o, *state.o.lora_weights())  # residual + o(out)
    x, norm = state.input_norm(1, hidden)
    return FusedSwiGLU.apply(  # hidden + mlp(norm(hidden))
        x,
        True if x is hidden else hidden,
        *norm,
        state.gate_up,
        state.down,
        *state.gate_up.lora_weights(),
        *state.down.lora_weights(),
    )


def _sandwich_tail(state: _DecoderState, hidden_states, out):
    """Gemma2's tail from the attention output ``out [B, S, Hq * D]``: ``h = residual + post_norm(o(out))``,
    then ``h + post_ff_norm(mlp(pre_ff_norm(h)))``; each norm (and the residual add after it) one node."""
    _, post_attention, pre_feedforward, post_feedforward = state.norms
    attention = FusedProjections.apply(out, None, state.o, *state.o.lora_weights())
    hidden = gemma_rms_norm(
        attention, post_attention._parameters["weight"], post_attention.eps, hidden_states
    )
    x = gemma_rms_norm(hidden, pre_feedforward._parameters["weight"], pre_feedforward.eps)
    mlp = FusedSwiGLU.apply(
        x,
        None,
        None,
        None,
        state.gate_up,
        state.down,
        *state.gate_up.lora_weights(),
        *state.down.lora_weights(),
    )
    return gemma_rms_norm(mlp, post_feedforward._parameters["weight"], post_feedforward.eps, hidden)


def _install(module: nn.Module, state, forward) -> None:
    module._grit_fused = state
    module._grit_previous_forward = module.forward
    module.forward = types.MethodType(forward, module)


def _uninstall(module: nn.Module) -> None:
    d = module.__dict__
    d.pop("_grit_fused", None)
    previous = d.pop("_grit_previous_forward", None)
    d.pop("forward", None)
    if previous is not None and getattr(previous, "__func__", None) is not type(module).forward:
        module.forward = previous


def _blocks(model: nn.Module):
    for name, module in model.named_modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if isinstance(attn, nn.Module) and isinstance(mlp, nn.Module):
            yield name, module, attn, mlp


def is_fused(model: nn.Module) -> bool:
    """Whether :func:`fuse` has patched any module of ``model``."""
    return any("_grit_fused" in m.__dict__ for m in model.modules())


def fuse(model: nn.Module) -> FusionReport:
    """Route every supported decoder block of ``model`` through the fused LoRA Functions.

    Args:
        model: a PEFT model (or any module) with Llama-family decoder blocks (Llama, Mistral,
            Qwen2/Qwen3, Gemma, Gemma2; the whole block forward of those six, attention and MLP parts
            of any block with the same module names) and PEFT LoRA layers (plain ``nn.Linear`` or
            bitsandbytes 4-bit base weights, one active adapter, dropout 0, no DoRA). Parts that do not
            qualify (other MLP activations than SiLU / exact GELU included) keep PEFT's path; the report
            says why.
    Returns:
        a :class:`FusionReport` (``print(report)`` for the summary and the reasons).
    """
    if is_fused(model):
        raise RuntimeError("this model is already fused; call grit_kernels.unfuse(model) first")
    report = FusionReport(lora_modules=sum(1 for m in model.modules() if is_lora_layer(m)))
    for name, block, attn, mlp in _blocks(model):
        report.num_blocks += 1
        attn_reason = _part_reason(attn, ATTENTION_PROJECTIONS)
        if attn_reason is None and not _same_rank([getattr(attn, n) for n in ATTENTION_PROJECTIONS[:3]]):
            attn_reason = "q/k/v LoRA ranks differ"
        mlp_reason = _part_reason(mlp, MLP_PROJECTIONS)
        activation = _activation(getattr(mlp, "act_fn", None))
        if mlp_reason is None and activation is None:
            mlp_reason = (
                f"activation {type(getattr(mlp, 'act_fn', None)).__name__} "
                "(the fused gated MLP computes SiLU or GELU, tanh or erf, exactly)"
            )
        if mlp_reason is None and not _same_rank([mlp.gate_proj, mlp.up_proj]):
            mlp_reason = "gate/up LoRA ranks differ"
        parts = {}
        if attn_reason is None:
            parts["qkv"] = [attn.q_proj, attn.k_proj, attn.v_proj]
            parts["o"] = [attn.o_proj]
        if mlp_reason is None:
            parts["gate_up"] = [mlp.gate_proj, mlp.up_proj]
            parts["down"] = [mlp.down_proj]
        if parts:
            reason = weights_unsupported_reason(
                [layer.base_layer for layers in parts.values() for layer in layers]
            )
            if reason is not None:
                attn_reason = attn_reason or reason
                mlp_reason = mlp_reason or reason
                parts = {}
        if parts:
            weights = BlockWeights({k: [layer.base_layer for layer in v] for k, v in parts.items()})
            groups = {k: ProjectionGroup(k, v, v[0].active_adapters[0], weights) for k, v in parts.items()}
            if "gate_up" in groups:
                groups["gate_up"].activation = activation
            if "qkv" in groups:
                stashes = [_StashedOutput() for _ in range(3)]
                for layer, stash in zip(parts["qkv"], stashes):
                    layer._grit_fused = stash
                    install_dispatch_forward(layer)
                attn.o_proj._grit_fused = _FusedSingle(groups["o"])
                install_dispatch_forward(attn.o_proj)
                _install(attn, _AttentionState(groups["qkv"], stashes), _fused_attention_forward)
                report.fused_modules += 4
            if "gate_up" in groups:
                _install(mlp, (groups["gate_up"], groups["down"]), _fused_mlp_forward)
                report.fused_modules += 3
            if len(groups) == 4 and _base_stack_reason(block) is None:
                _install(block, _DecoderState(block, groups), _fused_decoder_forward)
                report.base_stack_blocks += 1
        if attn_reason is None and mlp_reason is None:
            report.fused_blocks.append(name)
        else:
            if attn_reason is not None:
                report.unfused[f"{name}.self_attn"] = attn_reason
            if mlp_reason is not None:
                report.unfused[f"{name}.mlp"] = mlp_reason
    if report.fused_modules:
        for module in model.modules():
            kind = _model_class(module).__name__
            if kind in RMS_NORMS and "_grit_fused" not in module.__dict__:
                gemma = kind in GEMMA_RMS_NORMS
                _install(
                    module, _NormState(), _fused_gemma_rms_norm_forward if gemma else _fused_rms_norm_forward
                )
                report.rms_norms += 1
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        report.kernels = "liger" if uses_liger(device) else "torch"
    if report.num_blocks == 0:
        report.unfused["model"] = (
            "no Llama-family decoder block (a module with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)"
        )
    return report


def unfuse(model: nn.Module) -> None:
    """Restore PEFT's path in every block :func:`fuse` patched (a preconditioner keeps its capture)."""
    for module in model.modules():
        d = module.__dict__
        if "_grit_fused" not in d:
            continue
        if is_lora_layer(module):
            del d["_grit_fused"]
            release_dispatch_forward(module)
        else:
            state = d["_grit_fused"]
            if isinstance(state, (_AttentionState, tuple)):
                groups = (state.qkv,) if isinstance(state, _AttentionState) else state
                for group in groups:
                    group.weights.release()
            _uninstall(module)
    clear_cache()
