"""A byte-level tokenizer that needs no vocabulary file, and the one encoding call that works for it and for
any Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class ByteTokenizer:
    """A byte-level tokenizer with no vocabulary file: token id = UTF-8 byte + ``offset``.

    Ids ``0..offset-1`` are special: ``pad_token_id = 0``, ``bos_token_id = 1``, ``eos_token_id = 2``,
    ``unk_token_id = 3``; bytes map to ``offset .. offset+255``, so ``vocab_size = 260`` by default and any
    model with a vocabulary of at least 260 ids (the tiny Llama has 512, Llama-3 128256) can use it.
    One token per byte: ASCII text gives about 4x as many tokens as a BPE tokenizer would.

    ``encode(text, add_bos=False, add_eos=False) -> list[int]``; ``decode(ids, skip_special_tokens=True)
    -> str`` (invalid UTF-8 is replaced); ``tok(text_or_texts, add_special_tokens=True)`` returns
    ``{"input_ids": ..., "attention_mask": ...}`` like a Hugging Face tokenizer (``add_special_tokens``
    prepends bos).
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 3

    def __init__(self, offset: int = 4):
        if not isinstance(offset, int) or offset < 4:
            raise ValueError(
                f"ByteTokenizer offset must be an integer >= 4 (ids 0-3 are special), got {offset!r}"
            )
        self.offset = offset
        self.vocab_size = offset + 256
        self.pad_token = "<pad>"
        self.bos_token = "<s>"
        self.eos_token = "</s>"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out, names = bytearray(), {0: self.pad_token, 1: self.bos_token, 2: self.eos_token}
        for i in ids:
            i = int(i)
            if i >= self.offset and i < self.vocab_size:
                out.append(i - self.offset)
            elif not skip_special_tokens:
                out += names.get(i, "<unk>").encode()
        return out.decode("utf-8", errors="replace")

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, **_: Any) -> dict:
        if isinstance(text, str):
            ids = self.encode(text, add_bos=add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        batch = [self.encode(t, add_bos=add_special_tokens) for t in text]
        return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without special tokens, for a ByteTokenizer or a Hugging Face tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
