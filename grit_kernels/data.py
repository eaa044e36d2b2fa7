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
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


# --------------------------------------------------------------------------------------------- tokenizer
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


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without special tokens, for a ByteTokenizer or a Hugging Face tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------- Alpaca
def format_alpaca(record: Mapping[str, Any]) -> tuple[str, str]:
    """``(prompt, response)`` of an Alpaca record ``{"instruction", "input" (optional), "output"}``
    with the standard Alpaca template (the no-input variant when ``input`` is empty)."""
    instruction, context = record["instruction"], record.get("input") or ""
    if context.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return prompt, record["output"]


def tokenize_alpaca(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int = 1024,
    drop_unsupervised: bool = True,
) -> list[dict[str, list[int]]]:
    """Tokenize Alpaca records into ``{"input_ids": list[int], "labels": list[int]}`` features.

    Row layout: ``[bos] + prompt + response + [eos]`` (bos only if the tokenizer has one), truncated
    to ``max_length`` tokens from the end. ``labels`` equals ``input_ids`` on the response and eos
    tokens and is ``-100`` on bos and prompt tokens (the model shifts labels by one internally).

    Args:
        records: dicts with ``instruction``, optional ``input``, ``output`` (see :func:`load_alpaca_json`).
        tokenizer: :class:`ByteTokenizer` or a Hugging Face tokenizer (needs ``eos_token_id``).
        max_length: maximum tokens per row (>= 2).
        drop_unsupervised: drop rows whose prompt fills ``max_length`` so that no response token is
            left (they would make a loss of 0/0); if False they are kept with all labels -100.

    Returns:
        one feature dict per kept record, in order (lists of Python ints, ready for the collators).
    """
    if max_length < 2:
        raise ValueError(f"tokenize_alpaca: max_length must be >= 2, got {max_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenize_alpaca: the tokenizer has no eos_token_id")
    bos = getattr(tokenizer, "bos_token_id", None)
    features = []
    for record in records:
        prompt, response = format_alpaca(record)
        prompt_ids = ([bos] if bos is not None else []) + _encode(tokenizer, prompt)
        response_ids = _encode(tokenizer, response) + [eos]
        input_ids = (prompt_ids + response_ids)[:max_length]
        n_prompt = min(len(prompt_ids), len(input_ids))
        labels = [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
        if drop_unsupervised and n_prompt == len(input_ids):
            continue
        features.append({"input_ids": input_ids, "labels": labels})
    return features


def _read_json_records(path: str | os.PathLike) -> tuple[str, list]:
    """``(path, raw records)`` of a JSON array file or a JSON-lines file (``.jsonl``, or any file whose
    first non-blank character is not ``[``). Raises ``ValueError`` naming the file (and line)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the data file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    stripped = text.lstrip()
    if path.endswith(".jsonl") or (stripped and not stripped.startswith("[")):
        raw = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(raw, list):
            raise ValueError(f"{path}: expected a JSON array of records, got a JSON {type(raw).__name__}")
    return path, raw


def _check_alpaca_records(path: str, raw: list) -> list[dict[str, str]]:
    records = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
        for field in ("instruction", "output"):
            if field not in rec:
                raise ValueError(f"{path}: record {i}: missing field {field!r}")
            if not isinstance(rec[field], str):
                raise ValueError(
                    f"{path}: record {i}: field {field!r} must be a string, got {type(rec[field]).__name__}"
                )
        context = rec.get("input")
        if context is not None and not isinstance(context, str):
            raise ValueError(
                f"{path}: record {i}: field 'input' must be a string, got {type(context).__name__}"
            )
        records.append({"instruction": rec["instruction"], "input": context or "", "output": rec["output"]})
    return records


def load_alpaca_json(path: str | os.PathLike) -> list[dict[str, str]]:
    """Load Alpaca records from a JSON array file or a JSON-lines file (``.jsonl``).

    Each record must be an object with string fields ``instruction`` and ``output`` and an optional
    string ``input`` (missing or null means ""). Returns ``[{"instruction", "input", "output"}, ...]``.

    Raises:
        ValueError: naming the file and, for a bad record, its index and field.
    """
    return _check_alpaca_records(*_read_json_records(path))


# --------------------------------------------------------------------------------------------- chat
CHAT_ROLES = ("system", "user", "assistant")


def _check_chat_records(path: str, raw: list) -> list[dict[str, list[dict[str, str]]]]:
    records = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
        messages = rec.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}: record {i}: field 'messages' must be a non-empty list of messages")
        clean = []
        for j, msg in enumerate(messages):
            where = f"{path}: record {i}: message {j}"
            if not isinstance(msg, dict):
                raise ValueError(f"{where}: expected an object, got {type(msg).__name__}")
            role, content = msg.get("role"), msg.get("content")
            if role not in CHAT_ROLES:
                raise ValueError(f"{where}: role must be one of {CHAT_ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"{where}: field 'content' must be a string, got {type(content).__name__}")
            clean.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in clean):
            raise ValueError(f"{path}: record {i}: no assistant message (nothing to learn)")
        records.append({"messages": clean})
    return records


def load_chat_json(path: str | os.PathLike) -> list[dict[str, list[dict[str, str]]]]:
    """Load chat records ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
    (OpenAI / TRL "messages" format) from a JSON array or JSON-lines file. Every record needs at least
    one assistant message. Extra fields are ignored.

    Raises:
        ValueError: naming the file and, for a bad record, its index (and the message's).
    """
    return _check_chat_records(*_read_json_records(path))


def load_records(path: str | os.PathLike, data_format: str = "auto") -> tuple[str, list[dict]]:
    """``(format, records)`` of a data file: ``data_format`` is ``"alpaca"``, ``"chat"`` or ``"auto"``
    (chat if the first record has a ``messages`` field, else Alpaca). See :func:`load_alpaca_json` and
    :func:`load_chat_json`; raises ``ValueError`` naming the file and the record."""
    if data_format not in ("auto", "alpaca", "chat"):
        raise ValueError(f"data_format must be 'auto', 'alpaca' or 'chat', got {data_format!r}")
    path, raw = _read_json_records(path)
    if data_format == "auto":
        data_format = "chat" if raw and isinstance(raw[0], dict) and "messages" in raw[0] else "alpaca"
    check = _check_chat_records if data_format == "chat" else _check_alpaca_records
    return data_format, check(path, raw)


CHAT_FALLBACK_HEADER = "### {role}:\n"  #: role header of the template used when a tokenizer has none


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template if template and hasattr(tokenizer, "apply_chat_template") else None


def _template_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the tokenizer's chat template, and the character spans of the
    assistant turns: from the end of the generation prompt before each assistant message to the end of
    the rendering that includes it (so the template's end-of-turn marker is supervised too)."""

    def render(msgs: list, generation_prompt: bool) -> str:
        try:
            out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2 TemplateError, e.g. "System role not supported"
            name = type(exc).__name__
            raise ValueError(f"the tokenizer's chat template fails on it ({name}: {exc})") from None
        return out if isinstance(out, str) else out[0]

    full = render(messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else 0
        end_text = render(messages[: i + 1], False)
        if not (full.startswith(end_text) and full.startswith(end_text[:start]) and start <= len(end_text)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation's prefixes as prefixes of "
                "the whole conversation, so assistant turns cannot be located for label masking"
            )
        spans.append((start, len(end_text)))
    return full, spans


def _tokenize_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (special tokens written in the text are parsed, none added) and, per token,
    whether it starts inside one of ``spans``. Fast tokenizers tokenize the whole text once (offsets);
    others tokenize the pieces between span boundaries one by one."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        supervised = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
        return ids, supervised
    cuts = sorted({0, len(text), *[p for span in spans for p in span]})
    ids, supervised = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = _encode(tokenizer, text[a:b])
        inside = any(s <= a < e for s, e in spans)
        ids += piece
        supervised += [inside] * len(piece)
    return ids, supervised


def _fallback_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """A plain template for tokenizers without a chat template: ``### System:/### User:/### Assistant:``
    headers, turns separated by a blank line, ``eos`` after each assistant turn (supervised)."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), tokenizer.eos_token_id
    ids, supervised = ([bos], [False]) if bos is not None else ([], [])
    for i, msg in enumerate(messages):
        header_text = ("\n\n" if i else "") + CHAT_FALLBACK_HEADER.format(role=msg["role"].title())
        header = _encode(tokenizer, header_text)
        content = _encode(tokenizer, msg["content"])
        ids += header + content
        learn = msg["role"] == "assistant"
        supervised += [False] * len(header) + [learn] * len(content)
        if learn:
            ids.append(eos)
            supervised.append(True)
    return ids, supervised


def tokenize_chat(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int = 1024,
    drop_unsupervised: bool = True,
) -> list[dict[str, list[int]]]:
    """Tokenize chat records into ``{"input_ids", "labels"}`` features; only assistant tokens are supervised.

    With a tokenizer that has a chat template (``tokenizer.chat_template``), the conversation is rendered
    by it; the labels of each assistant turn cover its content and the template's end-of-turn marker,
    everything else (system and user turns, role headers, the generation prompt) is ``-100``. Without a
    chat template (or with :class:`ByteTokenizer`), a plain fallback is used: ``[bos] "### User:\\n"
    content "\\n\\n### Assistant:\\n" content [eos] ...`` with the assistant content and its eos supervised.
    Rows are truncated to ``max_length`` tokens from the end.

    Args:
        records: ``{"messages": [{"role", "content"}, ...]}`` dicts (see :func:`load_chat_json`).
        tokenizer: :class:`ByteTokenizer` or a Hugging Face tokenizer (needs ``eos_token_id``).
        max_length: maximum tokens per row (>= 2).
        drop_unsupervised: drop rows with no assistant token left after truncation.
    """
    if max_length < 2:
        raise ValueError(f"tokenize_chat: max_length must be >= 2, got {max_length}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("tokenize_chat: the tokenizer has no eos_token_id")
    templated = _chat_template(tokenizer) is not None and not isinstance(tokenizer, ByteTokenizer)
    features = []
    for index, record in enumerate(records):
        messages = list(record["messages"])
        if templated:
            try:
                ids, supervised = _tokenize_spans(tokenizer, *_template_spans(messages, tokenizer))
            except ValueError as exc:
                raise ValueError(f"record {index}: {exc}") from None
        else:
            ids, supervised = _fallback_chat(messages, tokenizer)
        ids, supervised = ids[:max_length], supervised[:max_length]
        labels = [i if s else IGNORE_INDEX for i, s in zip(ids, supervised)]
        if drop_unsupervised and not any(supervised):
            continue
        features.append({"input_ids": ids, "labels": labels})
    return features


def tokenize_records(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, data_format: str, max_length: int = 1024
) -> list[dict[str, list[int]]]:
    """:func:`tokenize_alpaca` or :func:`tokenize_chat`, by ``data_format`` (``"alpaca"`` | ``"chat"``)."""
    if data_format == "chat":
        return tokenize_chat(records, tokenizer, max_length=max_length)
    if data_format == "alpaca":
        return tokenize_alpaca(records, tokenizer, max_length=max_length)
    raise ValueError(f"data_format must be 'alpaca' or 'chat', got {data_format!r}")


# --------------------------------------------------------------------------------------------- synthetic data
_WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an which not have has but "
    "model data time system value number result method function process example first new used two can "
    "each more also when would other such these some only most about into than its then them over any "
    "write explain describe list give summarize compare create suggest answer question following text "
    "water energy light city river market health science history music language computer network "
    "student teacher family research design climate policy story answer plan list reason step simple"
).split()


def _text(rng: random.Random, n_bytes: int, unit: str) -> str:
    """Space-separated words from ``_WORDS`` totalling ``n_bytes`` bytes ("bytes") or words ("words")."""
    words, size = [], 0
    target = max(1, n_bytes)
    while size < target:
        w = rng.choice(_WORDS)
        words.append(w)
        size += (len(w) + 1) if unit == "bytes" else 1
    text = " ".join(words)
    if unit == "bytes":  # exactly ``target`` bytes including the final period
        text = text[: target - 1].rstrip() or words[0][: max(1, target - 1)]
        text = text + "." * (target - len(text))
        return text[0].upper() + text[1:]
    return text[0].upper() + text[1:] + "."


def generate_alpaca_sample(
    n: int,
    seed: int = 0,
    response_median: float = 180.0,
    response_sigma: float = 0.75,
    instruction_median: float = 18.0,
    instruction_sigma: float = 0.5,
    input_fraction: float = 0.4,
    input_median: float = 25.0,
    input_sigma: float = 0.9,
    max_response: int = 1024,
    unit: str = "bytes",
) -> list[dict[str, str]]:
    """``n`` synthetic Alpaca records with an Alpaca-GPT4-like length distribution, deterministic in ``seed``.

    Lengths are lognormal: ``length = median * exp(sigma * N(0, 1))``. Defaults: responses median 180,
    sigma 0.75 (p90 ~470, p99 ~1000, clipped to ``max_response``); instructions median 18; 40% of
    records have an ``input`` of median 25. Text is drawn from a fixed small word list.

    ``unit`` says what a length counts: ``"bytes"`` (default) makes each field that many UTF-8 bytes,
    i.e. that many :class:`ByteTokenizer` tokens, so tokenized lengths follow the distribution exactly;
    ``"words"`` makes it that many words (a BPE tokenizer gives ~1.3 tokens per word). The constant
    Alpaca template adds ~140-190 prompt tokens per row under :class:`ByteTokenizer`.

    Returns:
        ``[{"instruction": str, "input": str, "output": str}, ...]`` of length ``n``.
    """
    if unit not in ("bytes", "words"):
        raise ValueError(f"generate_alpaca_sample: unit must be 'bytes' or 'words', got {unit!r}")
    if n < 0:
        raise ValueError(f"generate_alpaca_sample: n must be >= 0, got {n}")
    rng = random.Random(seed)

    def draw(median: float, sigma: float, cap: int | None = None) -> int:
        length = int(round(median * math.exp(sigma * rng.gauss(0.0, 1.0))))
        return max(2, min(length, cap) if cap else length)

    records = []
    for _ in range(n):
        instruction = _text(rng, draw(instruction_median, instruction_sigma), unit)
        context = _text(rng, draw(input_median, input_sigma), unit) if rng.random() < input_fraction else ""
        output = _text(rng, draw(response_median, response_sigma, max_response), unit)
        records.append({"instruction": instruction, "input": context, "output": output})
    return records


# --------------------------------------------------------------------------------------------- batching
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


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50
) -> list[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` chunks hold similar lengths.

    Shuffles, cuts into mega-batches of ``batch_size * mega_batch_mult``, sorts each by length
    (longest first) and shuffles the order of the resulting batches, keeping the longest batch
    first (an out-of-memory surfaces at step 1). Deterministic in ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * max(1, mega_batch_mult)
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    if not batches:
        return []
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    first = batches.pop(longest)
    rng.shuffle(batches)
    return [i for b in [first] + batches for i in b]


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batch sampler over :func:`length_grouped_indices`; ``set_epoch(e)`` reshuffles (seed + e).

    ``LengthGroupedBatchSampler(lengths, batch_size, seed=0, mega_batch_mult=50, drop_last=False)``;
    use as ``DataLoader(features, batch_sampler=..., collate_fn=DynamicPaddingCollator(...))``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_mult: int = 50,
        drop_last: bool = False,
    ):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.mega_batch_mult, self.drop_last, self.epoch = mega_batch_mult, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = length_grouped_indices(
            self.lengths, self.batch_size, self.seed + self.epoch, self.mega_batch_mult
        )
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def real_token_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the batch's ``input_ids`` positions that hold real (non-padding) tokens.

    Uses a 2D ``attention_mask`` when present; a batch without one (or with a 4D packing mask) has
    no padding and gives 1.0. One host read: call it for reporting, not inside the training step.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return 1.0
    return float(mask.sum().item()) / max(1, mask.numel())


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
