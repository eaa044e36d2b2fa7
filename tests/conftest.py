"""Shared helpers. Without CUDA the Triton kernels run on the CPU interpreter, so the variable must be
set before anything imports triton; with CUDA they compile for the GPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The suite is many tiny ops: one intra-op thread avoids oversubscription stalls on small CI boxes
    (measured up to 90x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0/0 counts as 0)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


@pytest.fixture
def fresh_seed():
    """A fresh seed per test run (printed so a failure can be replayed)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed


@pytest.fixture
def model_dir(tmp_path):
    """A tiny 1-layer Llama saved with weights (no tokenizer: the byte-level fallback is used)."""
    from transformers import AutoModelForCausalLM

    from grit_kernels.models import tiny_llama_config

    torch.manual_seed(0)
    path = tmp_path / "model"
    AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=1)).save_pretrained(path)
    return path
