"""The convergence benchmark's byte-level task: a small byte-level Llama pretrained here on the Python standard
library's sources (cached), fine-tuned on the reference-manual prose of ``pydoc_data/topics.py``, held out by
topic. See ``bench_convergence.py`` for the protocol; ``convergence_real.py`` is the real-model task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HELDOUT_EVERY = 8  #: every 8th pydoc topic (sorted by name) is held out


# ----------------------------------------------------------------------------------------- base model
@dataclass(frozen=True)
class BaseConfig:
    """The pretrained base: model shape (bytes vocabulary) and its pretraining run."""

    hidden: int = 128
    layers: int = 2
    intermediate: int = 344
    heads: int = 4
    seq_len: int = 128
    corpus_bytes: int = 4_000_000  #: first bytes of the sorted stdlib sources
    pretrain_steps: int = 600
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    seed: int = 0

    def digest(self, corpus: bytes) -> str:
        key = json.dumps(dataclasses.asdict(self), sort_keys=True) + torch.__version__
        return hashlib.sha256(key.encode() + hashlib.sha256(corpus).digest()).hexdigest()[:12]


def llama_config(cfg: BaseConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
    )


def pretrain_corpus(max_bytes: int) -> bytes:
    """The Python standard library's top-level ``.py`` files, sorted by name, concatenated."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(lib.glob("*.py")):
        text = path.read_bytes()
        out.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def default_cache_dir() -> Path:
    root = os.environ.get("GRIT_KERNELS_CACHE") or Path.home() / ".cache" / "grit-kernels"
    return Path(root) / "convergence"


def _windows(tokens: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def build_base(cache_dir: str | Path | None = None, config: BaseConfig | None = None, progress: bool = True):
    """The pretrained base model (eval mode, frozen), from the cache or pretrained now (deterministic).

    Returns ``(model, info)``; ``info`` has the cache path, the hash, pretraining time and loss curve.
    """
    from transformers import AutoModelForCausalLM

    cfg = config or BaseConfig()
    corpus = pretrain_corpus(cfg.corpus_bytes)
    digest = cfg.digest(corpus)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"base-{digest}.pt"
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(llama_config(cfg))
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["state_dict"])
        info = dict(saved["info"], cache=str(path), cached=True)
    else:
        info = _pretrain(model, cfg, corpus, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
        tmp.replace(path)
        info = dict(info, cache=str(path), cached=False)
    model.eval()
    model.requires_grad_(False)
    return model, info


def _pretrain(model, cfg: BaseConfig, corpus: bytes, progress: bool) -> dict:
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.pretrain_steps, warmup=max(1, cfg.pretrain_steps // 20))
    model.train()
    curve, started = [], time.perf_counter()
    for step in range(1, cfg.pretrain_steps + 1):
        x = _windows(tokens, cfg.pretrain_batch, cfg.seq_len, gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 50 == 0 or step == cfg.pretrain_steps:
            curve.append((step, loss.item()))
            if progress:
                print(f"  pretrain step {step}/{cfg.pretrain_steps}: loss {curve[-1][1]:.3f}", flush=True)
    return {
        "config": dataclasses.asdict(cfg),
        "digest": cfg.digest(corpus),
        "corpus": f"Python {sys.version.split()[0]} stdlib top-level .py files, first {len(corpus)} bytes",
        "pretrain_s": time.perf_counter() - started,
        "pretrain_curve": curve,
    }


# ----------------------------------------------------------------------------------------- fine-tuning data
def load_finetune_data(seq_len: int = 128, max_heldout_windows: int = 24) -> dict:
    """Documentation prose shipped with Python (``pydoc_data.topics``), split by topic.

    Returns ``{"train": uint8 [n_train_bytes], "heldout": long [n, seq_len], "train_topics",
    "heldout_topics"}``; held-out windows are non-overlapping, evenly spread over the held-out text.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = set(names[HELDOUT_EVERY // 2 :: HELDOUT_EVERY])
    train_text = "\n\n".join(topics[n] for n in names if n not in held).encode("utf-8")
    held_text = "\n\n".join(topics[n] for n in names if n in held).encode("utf-8")
    held_tokens = torch.frombuffer(bytearray(held_text), dtype=torch.uint8).long()
    n_windows = held_tokens.numel() // seq_len
    pick = torch.linspace(0, n_windows - 1, min(n_windows, max_heldout_windows)).round().long().unique()
    heldout = held_tokens[: n_windows * seq_len].view(n_windows, seq_len)[pick]
    return {
        "train": torch.frombuffer(bytearray(train_text), dtype=torch.uint8),
        "heldout": heldout,
        "train_topics": len(names) - len(held),
        "heldout_topics": len(held),
    }


def train_batches(data: dict, steps: int, batch_size: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches ``[batch_size, seq_len]`` of random training windows; fixed by ``seed``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return [_windows(data["train"], batch_size, seq_len, gen) for _ in range(steps)]


def heldout_batches(data: dict, batch_size: int = 16) -> list[torch.Tensor]:
    return list(data["heldout"].split(batch_size))


def _schedule(opt, steps: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps`` (pretraining and fine-tuning)."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
