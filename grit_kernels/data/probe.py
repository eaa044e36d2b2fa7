"""A run-time check on a model: whether it keeps the sequences of a packed row apart. It runs forwards, so it
lives apart from the data-only modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .collate import PackedCollator


def packing_isolates(model: torch.nn.Module, lengths: Sequence[int] = (6, 5), seed: int = 0) -> bool:
    """Whether ``model`` keeps the sequences of a :class:`PackedCollator` row apart.

    Runs two packed rows that differ only in their first sequence and checks that the second
    sequence's logits do not change (relative change < 1e-3: rounding only; a leak changes them by
    O(0.1)). True for Llama, Mistral, Qwen2, Gemma2, Phi3 and GPT-2 under transformers' ``sdpa`` and
    ``eager`` attention (their mask builder detects packing from ``position_ids``); False for OPT,
    which derives positions and masks from ``attention_mask`` only. Two forwards of ``sum(lengths)``
    tokens, no gradient, in eval mode (the training mode is restored); one host read.
    """
    if len(lengths) != 2 or min(lengths) < 2:
        raise ValueError(f"packing_isolates: lengths must be two lengths >= 2, got {tuple(lengths)}")
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    first, other, second = (
        torch.randint(0, vocab, (n,), generator=g).tolist() for n in (lengths[0], *lengths)
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = []
            for head in (first, other):
                batch = PackedCollator()([{"input_ids": head}, {"input_ids": second}])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                outs.append(model(**batch).logits[0, len(head) :].float())
    finally:
        model.train(was_training)
    change = (outs[0] - outs[1]).norm() / outs[1].norm().clamp_min(1e-30)
    return bool(change < 1e-3)
