"""Model shapes used by the demos, tests and benchmarks, and PEFT LoRA wrapping of them.

No weights are downloaded: models are built from a config with random weights (enough for speed
measurements and for tests); real checkpoints are accepted from the user elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama_config(num_layers: int = 32, hidden: int = 64, vocab: int = 512, max_positions: int = 1024):
    """A tiny Llama: 32 layers x 7 projections = 224 LoRA modules, small enough for CPU tests."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def llama3_8b_config(num_layers: int = 32):
    """Llama-3-8B shapes: 4096 hidden, 14336 MLP, 32 heads, GQA with 8 KV heads, 128256 vocab."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def build_lora_model(
    config,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = LLAMA_TARGETS,
    quantize_4bit: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    fast_init: bool = False,
    **lora_kwargs,
):
    """Random-weight causal LM from ``config`` wrapped by PEFT LoRA on ``targets``.

    ``quantize_4bit`` replaces the base linears by bitsandbytes NF4 ``Linear4bit`` (QLoRA; works on
    CPU with bitsandbytes >= 0.44), quantized on ``device`` one projection at a time. LoRA weights stay fp32. ``quant_storage``: the dtype the
    packed 4-bit data is stored as (``bnb_4bit_quant_storage``; a float dtype lets FSDP2 shard it like the other
    weights).

    ``fast_init``: skip transformers' weight initialisation and fill every linear and embedding weight with
    ``N(0, config.initializer_range)`` (biases 0) on ``device`` in one pass: the same distribution as HF's
    Llama init, other random numbers. For the Llama-3-8B-shape benchmarks (seconds instead of minutes of
    initialisation); the default keeps HF's init, whose numbers the CPU tests were written against.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), _no_hf_init() if fast_init else contextlib.nullcontext():
        # built on the device: an 8B model in seconds, not minutes of a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if fast_init:
        _fill_random(model, getattr(config, "initializer_range", 0.02))
    if quantize_4bit:
        # from_config cannot quantize; replace the target linears of the random-weight model by NF4 ones.
        # (Real checkpoints: from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True)).)
        _quantize_linears_nf4(model, targets, compute_dtype=dtype, device=device, quant_storage=quant_storage)
        model.is_loaded_in_4bit = True  # what PEFT reads to pick its bitsandbytes LoRA layer
    model.to(device)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    return get_peft_model(model, lora)


def _no_hf_init():
    """transformers' context that skips weight initialisation (``torch.nn.init`` and ``init_weights``)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@torch.no_grad()
def _fill_random(model: torch.nn.Module, std: float) -> None:
    """``N(0, std)`` linear and embedding weights, zero biases (HF's Llama init), on the weights' device."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def _quantize_linears_nf4(model, targets, compute_dtype, device, quant_storage=torch.uint8):
    """Each target ``nn.Linear`` -> NF4 ``Linear4bit``: the layer is made on the meta device (no weight of its
    own is allocated or initialised), takes the linear's weight, and is quantized on ``device``; the
    full-precision weight is freed as soon as its layer is replaced."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    quant_storage=quant_storage,
                    device="meta",
                )
                # module=q: bitsandbytes keeps the quantisation state on the layer too (as transformers' loading
                # does), where it finds it again when FSDP2 has replaced the Params4bit by a plain tensor
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", quant_storage=quant_storage, module=q
                )
                if child.bias is not None:
                    q.bias = child.bias
                setattr(module, child_name, q.to(device))  # moving to a device quantizes
                del child, q
