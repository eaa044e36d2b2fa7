"""Small models for the property tests (tiny, random weights, built from configs)."""

from __future__ import annotations

import torch
from torch import nn

from grit_kernels.models import build_lora_model, tiny_llama_config

#: a tiny OPT (``OPTConfig(**TINY_OPT)``): OPT derives positions and masks from attention_mask only, so
#: padding-free packed rows attend across sequences there (the negative case of the packing tests)
TINY_OPT = dict(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=1,
    ffn_dim=64,
    num_attention_heads=2,
    max_position_embeddings=600,
    word_embed_proj_dim=32,
)

#: a tiny Gemma (``GemmaConfig(**TINY_GEMMA)``; test_fused's tiny Llama shapes, head_dim 16): (1 + w)
#: RMSNorm in fp32, GeGLU MLP (tanh-approximate GELU), embeddings scaled by sqrt(hidden)
TINY_GEMMA = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
}
#: a tiny Gemma2 (``Gemma2Config(**TINY_GEMMA2)``): as TINY_GEMMA plus pre/post feed-forward norms,
#: attention logit soft-capping, a sliding-window first layer (window 8: shorter than the test rows, so
#: it bites) and query_pre_attn_scalar != head_dim
TINY_GEMMA2 = {**TINY_GEMMA, "sliding_window": 8, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 50.0}


class TwoLayer(nn.Module):
    """y = fc2(tanh(fc1(x))): two LoRA targets of different shapes."""

    def __init__(self, d_in=7, d_hidden=6, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def two_layer_lora(r=3, seed=0, **lora_kwargs):
    """PEFT LoRA over :class:`TwoLayer` with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = TwoLayer()
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc1", "fc2"], init_lora_weights=False, **lora_kwargs)
    return get_peft_model(base, cfg)


class OneLayer(nn.Module):
    """A single ``fc`` linear layer: the smallest model PEFT can wrap."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x)


def one_layer_lora(seed, d_in, d_out, rank):
    """``OneLayer`` with LoRA of rank ``rank`` (alpha 2r) on ``fc``, A and B both random."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["fc"], init_lora_weights=False)
    return get_peft_model(OneLayer(d_in, d_out), cfg)


def small_llama(num_layers=2, seed=0, random_b=True, **kwargs):
    """A few-layer tiny Llama with LoRA on all 7 projections (B random unless ``random_b=False``)."""
    if random_b:
        kwargs.setdefault("init_lora_weights", False)
    return build_lora_model(tiny_llama_config(num_layers=num_layers), seed=seed, **kwargs)


def lora_pairs(model):
    """[(lora_A.weight, lora_B.weight, scaling)] of every LoRA layer, in module order."""
    out = []
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out.append((module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]))
    return out


def gemma_config(arch: str, num_layers: int = 2, **overrides):
    from transformers import Gemma2Config, GemmaConfig

    if arch == "gemma":
        return GemmaConfig(**{**TINY_GEMMA, "num_hidden_layers": num_layers, **overrides})
    return Gemma2Config(**{**TINY_GEMMA2, "num_hidden_layers": num_layers, **overrides})


def gemma_model(arch="gemma", num_layers=2, seed=0, config_overrides=None, **kwargs):
    """Tiny Gemma/Gemma2 with LoRA on all 7 projections, random B, and random RMSNorm weights (Gemma
    initialises them to 0, i.e. scale 1 + 0: a norm that ignored the ``1 +`` would pass unnoticed)."""
    kwargs.setdefault("init_lora_weights", False)
    model = build_lora_model(gemma_config(arch, num_layers, **(config_overrides or {})), seed=seed, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model
