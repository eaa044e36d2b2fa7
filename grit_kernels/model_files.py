"""Real models from local files: a Hugging Face model directory or a single ``.gguf`` file.

``resolve_model_path(path)`` returns a Hugging Face model directory for either. A ``.gguf`` file is
dequantized once (transformers' GGUF loader, float32) into a cache directory outside any checkout and
reused afterwards; the cache key is the file's absolute path, size and modification time, so an edited
file is converted again. The conversion writes to a temporary directory and renames it into place, so
an interrupted conversion never leaves a half-written model behind.

``load_causal_lm(path)`` is the small Python helper: ``(model, tokenizer)`` for either kind of path.

Cache directory: ``$GRIT_KERNELS_CACHE`` if set, else ``$XDG_CACHE_HOME/grit-kernels``, else
``~/.cache/grit-kernels``. Converted models live under ``<cache>/gguf/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_SUFFIX = ".gguf"
_SOURCE_FILE = "grit_gguf_source.json"


class ModelPathError(ValueError):
    """A model path that is neither a model directory nor a readable ``.gguf`` file."""


def cache_dir() -> Path:
    """Where grit-kernels keeps converted models (see the module docstring)."""
    if os.environ.get("GRIT_KERNELS_CACHE"):
        return Path(os.environ["GRIT_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "grit-kernels"


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(GGUF_SUFFIX)


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelPathError(
            "reading a .gguf model needs the `gguf` package: pip install 'grit-kernels[gguf]' "
            "(or pip install gguf)"
        ) from None


def _cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def gguf_cache_path(path: str | os.PathLike) -> Path:
    """The directory a ``.gguf`` file is (or will be) converted into."""
    return cache_dir() / "gguf" / _cache_key(Path(path))


def _forget_gguf_quantization(model) -> None:
    """transformers marks a model loaded from GGUF as "quantized with gguf" (not serializable), though its
    weights are plain dequantized tensors: drop the mark so it saves as an ordinary model."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, name):
            delattr(model.config, name)


def _convert_gguf(src: Path, dest: Path, log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log(f"dequantizing {src.name} into {dest} (once; later runs reuse it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelPathError(f"{src}: transformers cannot load this GGUF file ({type(exc).__name__}: {exc})")
        _forget_gguf_quantization(model)
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(tmp)
            has_tokenizer = True
        except Exception as exc:  # noqa: BLE001 -- a GGUF without tokenizer metadata is still a model
            log(f"note: {src.name} carries no usable tokenizer ({type(exc).__name__}); saved the model only")
            has_tokenizer = False
        (tmp / _SOURCE_FILE).write_text(
            json.dumps({"gguf": str(src.resolve()), "size": src.stat().st_size, "tokenizer": has_tokenizer})
        )
        try:
            tmp.rename(dest)
        except OSError:  # another process converted it first: keep theirs
            if not (dest / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.perf_counter() - t0:.1f} s")


def resolve_model_path(path: str | os.PathLike, log=None) -> Path:
    """A Hugging Face model directory for ``path`` (a model directory, or a ``.gguf`` file converted once).

    Raises :class:`ModelPathError` with a one-line reason for anything else.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelPathError(f"{path}: a directory without config.json is not a Hugging Face model")
        return p.resolve()
    if not p.is_file():
        raise ModelPathError(f"{path}: no such file or directory")
    if not is_gguf(p):
        raise ModelPathError(f"{path}: expected a Hugging Face model directory or a {GGUF_SUFFIX} file")
    _require_gguf()
    dest = gguf_cache_path(p)
    if not (dest / _SOURCE_FILE).is_file():
        _convert_gguf(p.resolve(), dest, log)
    return dest


def load_causal_lm(path: str | os.PathLike, dtype=None, log=None, **kwargs):
    """``(model, tokenizer)`` from a model directory or a ``.gguf`` file.

    ``dtype`` defaults to float32. The tokenizer is ``None`` when the files carry none. Extra keyword
    arguments go to ``AutoModelForCausalLM.from_pretrained`` (``quantization_config=...``, ...).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_path(path, log=log)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
