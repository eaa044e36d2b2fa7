"""Instruction records to token rows with masked labels: the Alpaca prompt template and chat templates.

Only response (assistant) tokens and the final eos are supervised; prompt tokens are ``IGNORE_INDEX``
(-100), so they contribute nothing to the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .tokenizer import ByteTokenizer, encode_text

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
        prompt_ids = ([bos] if bos is not None else []) + encode_text(tokenizer, prompt)
        response_ids = encode_text(tokenizer, response) + [eos]
        input_ids = (prompt_ids + response_ids)[:max_length]
        n_prompt = min(len(prompt_ids), len(input_ids))
        labels = [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
        if drop_unsupervised and n_prompt == len(input_ids):
            continue
        features.append({"input_ids": input_ids, "labels": labels})
    return features


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
        piece = encode_text(tokenizer, text[a:b])
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
        header = encode_text(tokenizer, header_text)
        content = encode_text(tokenizer, msg["content"])
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
