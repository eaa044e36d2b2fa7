"""Model shapes used by the demos, tests and benchmarks, and PEFT LoRA wrapping of them.

No weights are downloaded: models are built from a config with random weights (enough for speed
measurements and for tests); real checkpoints are accepted from the user elsewhere.
"""

from __future__ import annotations

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
    **lora_kwargs,
):
    """Random-weight causal LM from ``config`` wrapped by PEFT LoRA on ``targets``.

    ``quantize_4bit`` replaces the base linears by bitsandbytes NF4 ``Linear4bit`` (QLoRA; works on
    CPU with bitsandbytes >= 0.44). LoRA weights stay fp32. ``quant_storage``: the dtype the packed 4-bit data is
    stored as (``bnb_4bit_quant_storage``; a float dtype lets FSDP2 shard it like the other weights).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if quantize_4bit:
        # from_config cannot quantize; replace the target linears of the random-weight model by NF4 ones.
        # (Real checkpoints: from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True)).)
        with torch.device(device):  # random init on the device: an 8B model in seconds, not minutes on a CPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _quantize_linears_nf4(model, targets, compute_dtype=dtype, device=device, quant_storage=quant_storage)
        model.is_loaded_in_4bit = True  # what PEFT reads to pick its bitsandbytes LoRA layer
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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


def _quantize_linears_nf4(model, targets, compute_dtype, device, quant_storage=torch.uint8):
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
                )
                # module=q: bitsandbytes keeps the quantisation state on the layer too (as transformers' loading
                # does), where it finds it again when FSDP2 has replaced the Params4bit by a plain tensor
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(), requires_grad=False, quant_type="nf4", quant_storage=quant_storage, module=q
                )
                if child.bias is not None:
                    q.bias = child.bias
                setattr(module, child_name, q.to(device))  # moving to a device quantizes
