"""Reading and validating data files: Alpaca records and chat ("messages") records, from a JSON array or a
JSON-lines file. Every error names the file, and for a bad record its index (and field or message)."""

from __future__ import annotations

import json
import os


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
