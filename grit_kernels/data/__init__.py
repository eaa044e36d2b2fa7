"""Instruction data for causal-LM fine-tuning (Alpaca records, chat "messages"): formatting, masked labels,
padding and packing.

Everything here runs offline. The pieces, in the order a pipeline uses them::

    records = load_alpaca_json("data.json")            # or generate_alpaca_sample(n, seed)
    tok = ByteTokenizer()                               # or any HF tokenizer
    features = tokenize_alpaca(records, tok, max_length=1024)
    # chat "messages" data: load_chat_json + tokenize_chat (via the tokenizer's chat template);
    # load_records(path) detects the format, tokenize_records(records, tok, format) dispatches
    batch = DynamicPaddingCollator(tok.pad_token_id)(features[:8])      # pad to the longest row
    batch = PackedCollator()(features[:8])              # or: one row, no padding at all

Labels: only response (assistant) tokens and the final eos are supervised; prompt tokens and padding are -100,
so they contribute nothing to the loss (docs/design.md, lessons: unmasked padding gave a meaningless loss).

Padding-free packing relies on transformers (>= 4.54; checked on 5.23) detecting packed rows from
``position_ids``: its mask builder then makes attention block-diagonal causal for the ``eager`` and
``sdpa`` implementations (flash-attention uses the same position_ids). It does so **only** when no
``attention_mask`` is passed **and no KV cache exists** -- and Llama creates a ``DynamicCache`` even in
training when ``use_cache`` is on (the config default), which silently turns the detection off and
lets packed sequences attend to each other. :class:`PackedCollator` therefore puts
``use_cache=False`` into every batch. ``tests/test_data.py`` verifies on CPU that a packed row gives
the same logits as the sequences run one by one (and that with the cache on it does not). Models or
versions without the detection need an explicit 4D mask: :func:`block_causal_mask` builds one.
:func:`packing_isolates` tells them apart at run time (OPT is one: it leaks); ``tests/test_packing.py``
checks that packed per-token losses, LoRA gradients and GRIT statistics equal the unpacked run's.

The rooms (every public name is importable from ``grit_kernels.data`` itself)::

    records.py      reading and validating data files (Alpaca, chat "messages"; JSON array or JSON lines)
    tokenizer.py    ByteTokenizer (no vocabulary file) and encode_text (ids of a text, any tokenizer)
    formatting.py   the Alpaca prompt and chat templates -> token rows with masked labels (IGNORE_INDEX)
    synthetic.py    generate_alpaca_sample: offline records with Alpaca-GPT4-like lengths
    collate.py      DynamicPaddingCollator, PackedCollator, block_causal_mask, real_token_fraction
    sampling.py     length_grouped_indices, LengthGroupedBatchSampler
    probe.py        packing_isolates: runs a model to check that packed sequences stay apart
"""

from __future__ import annotations

from .collate import DynamicPaddingCollator, PackedCollator, block_causal_mask, real_token_fraction
from .formatting import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE_INDEX,
    format_alpaca,
    tokenize_alpaca,
    tokenize_chat,
    tokenize_records,
)
from .probe import packing_isolates
from .records import CHAT_ROLES, load_alpaca_json, load_chat_json, load_records
from .sampling import LengthGroupedBatchSampler, length_grouped_indices
from .synthetic import generate_alpaca_sample
from .tokenizer import ByteTokenizer

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "ByteTokenizer",
    "CHAT_ROLES",
    "DynamicPaddingCollator",
    "IGNORE_INDEX",
    "LengthGroupedBatchSampler",
    "PackedCollator",
    "block_causal_mask",
    "format_alpaca",
    "generate_alpaca_sample",
    "length_grouped_indices",
    "load_alpaca_json",
    "load_chat_json",
    "load_records",
    "packing_isolates",
    "real_token_fraction",
    "tokenize_alpaca",
    "tokenize_chat",
    "tokenize_records",
]
