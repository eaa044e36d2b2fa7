"""Feature lists to batches: padding to the longest row (:class:`DynamicPaddingCollator`) or padding-free
packing into one row (:class:`PackedCollator`, with :func:`block_causal_mask` for models that need an explicit
mask), and the real-token fraction of a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .formatting import IGNORE_INDEX


def _as_list(x: Any) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


class DynamicPaddingCollator:
    """Pad a list of features to the longest row of the batch (optionally rounded up to a multiple).

    ``DynamicPaddingCollator(pad_token_id, pad_to_multiple_of=None, padding_side="right")(features)``
    takes ``[{"input_ids": [...], "labels": [...] (optional)}, ...]`` and returns ``input_ids`` and
    ``attention_mask`` ``[B, T]`` (int64) and ``labels`` ``[B, T]`` with ``-100`` on padding (labels
    default to a copy of ``input_ids`` when absent). ``T = max length`` rounded up to
    ``pad_to_multiple_of`` (8 suits tensor cores).
    """

    def __init__(
        self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None, padding_side: str = "right"
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id, self.pad_to_multiple_of, self.padding_side = (
            pad_token_id,
            pad_to_multiple_of,
            padding_side,
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DynamicPaddingCollator: empty batch")
        ids = [_as_list(f["input_ids"]) for f in features]
        labels = [_as_list(f["labels"]) if "labels" in f else list(i) for f, i in zip(features, ids)]
        width = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            if len(row_labels) != len(row_ids):
                raise ValueError(
                    f"DynamicPaddingCollator: row {row} has {len(row_ids)} input_ids "
                    f"but {len(row_labels)} labels"
                )
            n = len(row_ids)
            span = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            out_ids[row, span] = torch.tensor(row_ids, dtype=torch.long)
            out_labels[row, span] = torch.tensor(row_labels, dtype=torch.long)
            mask[row, span] = 1
        return {"input_ids": out_ids, "attention_mask": mask, "labels": out_labels}


class PackedCollator:
    """Padding-free packing: all features of the batch concatenated into one row ``[1, sum(L_i)]``.

    Returns ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0 for each sequence) as
    ``[1, T]`` int64 tensors, ``use_cache=False``, and **no** ``attention_mask``: transformers then
    derives the sequence boundaries from ``position_ids`` and attends block-diagonally (see the module
    docstring for why ``use_cache=False`` is required). The label of each sequence's first token is
    -100, so the last token of one sequence never learns to predict the next sequence.

    Features are text: ``input_ids`` and optionally ``labels`` (default: a copy of ``input_ids``) and a
    1D ``attention_mask``, whose 0 positions (padding of pre-padded features, either side) are dropped.
    Any other key (``pixel_values``, ...) raises ``ValueError``: packing would silently lose it.

    ``PackedCollator(return_attention_mask_4d=False)``: with True, also returns an explicit additive
    block-diagonal causal ``attention_mask`` ``[1, 1, T, T]`` (float32, 0 / -inf) from
    :func:`block_causal_mask`, for models that do not detect packing from ``position_ids``
    (costs O(T^2) memory).
    """

    TEXT_KEYS = frozenset({"input_ids", "labels", "attention_mask"})

    def __init__(self, return_attention_mask_4d: bool = False):
        self.return_attention_mask_4d = return_attention_mask_4d

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PackedCollator: empty batch")
        ids, labels, positions = [], [], []
        for f in features:
            extra = set(f) - self.TEXT_KEYS
            if extra:
                raise ValueError(
                    f"PackedCollator packs text features (input_ids, labels, attention_mask); this one "
                    f"also has {sorted(extra)}, which packing would drop: use another data collator"
                )
            seq_ids = _as_list(f["input_ids"])
            seq_labels = _as_list(f["labels"]) if "labels" in f else list(seq_ids)
            if len(seq_labels) != len(seq_ids):
                raise ValueError(
                    f"PackedCollator: a feature has {len(seq_ids)} input_ids but {len(seq_labels)} labels"
                )
            if "attention_mask" in f:  # pre-padded features: keep the real tokens only
                keep = _as_list(f["attention_mask"])
                if len(keep) != len(seq_ids):
                    raise ValueError(
                        f"PackedCollator: a feature has {len(seq_ids)} input_ids but an attention_mask "
                        f"of {len(keep)} (a 1D 0/1 mask per token is expected)"
                    )
                seq_ids = [t for t, k in zip(seq_ids, keep) if k]
                seq_labels = [t for t, k in zip(seq_labels, keep) if k]
            if not seq_ids:
                continue
            ids += seq_ids
            labels += [IGNORE_INDEX] + seq_labels[1:]
            positions += range(len(seq_ids))
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "use_cache": False,
        }
        if self.return_attention_mask_4d:
            batch["attention_mask"] = block_causal_mask(batch["position_ids"])
        return batch


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask ``[B, 1, T, T]`` (0 where allowed, dtype-min elsewhere): token ``q`` attends to
    ``k <= q`` of the same packed sequence. Sequences start where ``position_ids`` is 0 (or drops)."""
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    seq = starts.long().cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def real_token_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the batch's ``input_ids`` positions that hold real (non-padding) tokens.

    Uses a 2D ``attention_mask`` when present; a batch without one (or with a 4D packing mask) has
    no padding and gives 1.0. One host read: call it for reporting, not inside the training step.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return 1.0
    return float(mask.sum().item()) / max(1, mask.numel())
