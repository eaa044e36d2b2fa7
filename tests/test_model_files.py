"""Real models from local files: a tiny Llama written as GGUF by the test loads with the same logits."""

import builtins
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from grit_kernels import model_files  # noqa: E402


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script reorders q/k rows for its rotary layout; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, seed=0, tie=False, vocab_size=96):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a dropped norm weight shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[pre + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[pre + "post_attention_layernorm.weight"])
        for hf, gg in names.items():
            t = sd[pre + hf + ".weight"]
            if gg == "attn_q":
                t = _permute_for_gguf(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute_for_gguf(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIT_KERNELS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_loads_with_the_same_logits_and_is_converted_once(tmp_path, cache, tie):
    src = tmp_path / "tiny.gguf"
    ref = write_tiny_llama_gguf(src, seed=int.from_bytes(os.urandom(2), "little"), tie=tie)
    logs = []
    model, tok = model_files.load_causal_lm(src, log=logs.append)
    assert tok is None  # the test file carries no tokenizer metadata
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert (got - want).norm() / want.norm() < 1e-6
    converted = model_files.gguf_cache_path(src)
    assert converted.is_relative_to(cache) and (converted / "config.json").is_file()
    assert any("dequantizing" in m for m in logs)
    # second resolve: no conversion, same directory
    logs.clear()
    assert model_files.resolve_model_path(src, log=logs.append) == converted
    assert logs == []
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no temporary left behind


def test_an_edited_gguf_is_converted_again(tmp_path, cache):
    src = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(src, seed=1)
    first = model_files.resolve_model_path(src, log=lambda m: None)
    write_tiny_llama_gguf(src, seed=2)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    assert model_files.resolve_model_path(src, log=lambda m: None) != first


def test_hf_directory_passes_through(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    assert model_files.resolve_model_path(tmp_path / "m") == (tmp_path / "m").resolve()


@pytest.mark.parametrize("make, match", [
    (lambda p: p, "no such file"),
    (lambda p: (p.mkdir(), p)[1], "without config.json"),
    (lambda p: (p.write_text("x"), p)[1], "expected a Hugging Face model directory or a .gguf"),
])
def test_bad_paths_are_clear(tmp_path, make, match):
    with pytest.raises(model_files.ModelPathError, match=match):
        model_files.resolve_model_path(make(tmp_path / "thing"))


def test_missing_gguf_package_names_the_extra(tmp_path, cache, monkeypatch):
    src = tmp_path / "tiny.gguf"
    src.write_bytes(b"GGUF")
    real_import = builtins.__import__

    def no_gguf(name, *a, **k):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(model_files.ModelPathError, match=r"grit-kernels\[gguf\]"):
        model_files.resolve_model_path(src)


def test_a_broken_gguf_is_a_clear_error_and_leaves_no_cache(tmp_path, cache):
    src = tmp_path / "broken.gguf"
    src.write_bytes(b"not a gguf file at all")
    with pytest.raises(model_files.ModelPathError, match="cannot load this GGUF"):
        model_files.resolve_model_path(src, log=lambda m: None)
    assert not model_files.gguf_cache_path(src).exists()
